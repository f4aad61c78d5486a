"""A delay line on a TUN device: every IP packet read from it is written back ``--delay-ms`` later.

    python scripts/wan/delay.py --dev wan0 --delay-ms 50

Run inside the harness's router namespace (see harness.py), where policy routing sends every packet
forwarded between peers into the TUN device; what this program writes back re-enters the router and is
forwarded to its destination. The delay is constant, so a FIFO keeps release order and order of arrival.

It prints ``ready`` once attached and runs until SIGTERM/SIGINT. It asks for SCHED_FIFO when it may: on
shared cores a training process would otherwise delay the wake-ups and add jitter to every packet.
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MAX_PACKET = 65536
RT_PRIORITY = 10


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def realtime() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except (OSError, AttributeError):
        pass  # not permitted: the delay is still right, only less steady under CPU load


def run(fd: int, delay: float) -> None:
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable, _, _ = select.select([fd], [], [], timeout)
        now = time.monotonic()
        if readable:
            while True:  # drain: one wake-up per burst, not per packet
                try:
                    held.append((now + delay, os.read(fd, MAX_PACKET)))
                except BlockingIOError:
                    break
        while held and held[0][0] <= now:
            os.write(fd, held.popleft()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dev", required=True, help="TUN device to attach to (created if missing)")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to every packet")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        fd = open_tun(args.dev)
    except OSError as e:
        print(f"error: cannot attach to TUN device {args.dev}: {e.strerror}", file=sys.stderr)
        return 1
    realtime()
    print("ready", flush=True)
    try:
        run(fd, args.delay_ms / 1000.0)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
