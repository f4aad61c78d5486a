import sys

from p2ptrain.cli import main

sys.exit(main())
