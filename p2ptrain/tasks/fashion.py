"""fashion-mlp: Fashion-MNIST read from its four IDX files, the 784-500-500-10 ReLU MLP of the original write-up."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from p2ptrain.errors import UserError
from p2ptrain.tasks.base import Task

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
HINT = ("install the files with `apt install dataset-fashion-mnist` or pass --data-dir DIR containing the four "
        f"IDX files ({', '.join(FILES.values())}; gzipped or raw)")

# IDX element type codes; multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path | str) -> Tensor:
    """The array stored in one IDX file (gzipped or raw), checked against its own header.

    Raises:
        UserError: the file cannot be read, is not IDX, or its size disagrees with its header.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # sniff rather than trust the name: some mirrors gunzip but keep ".gz"
            data = gzip.decompress(data)
    except OSError as e:  # includes gzip.BadGzipFile
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    except (EOFError, zlib.error) as e:
        raise UserError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise UserError(f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        problem = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise UserError(f"{path}: {problem}: header says {'x'.join(map(str, shape))} "
                        f"({expected} bytes of data), file holds {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def make_model() -> nn.Module:
    """784-500-500-10 with ReLU, as in the original write-up."""
    return nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))


def to_input(images: Tensor) -> Tensor:
    """A batch of uint8 28x28 images as float32 rows of 784 values in [0, 1]."""
    return images.reshape(len(images), -1).float().div_(255.0)


def make_task(data_dir: Path | str | None = None) -> Task:
    """Fashion-MNIST from ``data_dir`` (default: /usr/share/datasets/fashion-mnist).

    Raises:
        UserError: the directory or a file is missing or corrupt; the message says how to get the files.
    """
    directory = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
    if not directory.is_dir():
        raise UserError(f"Fashion-MNIST directory {directory} does not exist; {HINT}")
    paths = {key: _find(directory, name) for key, name in FILES.items()}
    missing = [FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise UserError(f"Fashion-MNIST files missing from {directory}: {', '.join(missing)} (or .gz); {HINT}")
    try:
        train = _split(paths["train_images"], paths["train_labels"])
        test = _split(paths["test_images"], paths["test_labels"])
    except UserError as e:
        raise UserError(f"{e}; {HINT}") from e
    return Task(
        name="fashion-mlp",
        make_model=make_model,
        train=train,
        test=test,
        num_classes=10,
        # one process, Adam 1e-3, batch 100: 0.850 after 1 pass, 0.876 after 5, first 0.880 after 7
        accuracy_bar=0.88,
        batch_size=100,
        # Local updates (DiLoCo-style): each peer steps Adam 1e-3 on every batch of 100, the swarm averages
        # the change once per 60000 samples (one pass of the data between them). 2 peers, 1 thread each,
        # 2 shared cores at load ~25: 0.8824 at epoch 10-11 (163 s of training, 670k samples). Averaging
        # gradients instead (one Adam step per 16000-sample epoch, lr 3e-3) needed ~190 epochs (3-4M
        # samples, ~600 s) to pass 0.88, ending 0.8896-0.8917 at 250; its delayed updates ruined accuracy.
        target_batch_size=60000,
        max_epochs=15,
        lr=1e-3,
        local_updates=True,
        prepare=to_input,
    )


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    """(uint8 images N x 28 x 28, int64 labels N), checked against each other."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise UserError(f"{images_path}: expected uint8 images of N x 28 x 28 (IDX magic 2051), "
                        f"found {_describe(images)}")
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise UserError(f"{labels_path}: expected uint8 labels of N (IDX magic 2049), found {_describe(labels)}")
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
        raise UserError(f"{labels_path}: label {int(labels.max())} is out of range 0..{len(CLASS_NAMES) - 1}")
    return images, labels.long()


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} of {' x '.join(map(str, t.shape))}"
