"""fashion-mlp on small IDX files written here (never the real data set in /usr/share/datasets)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from p2ptrain.errors import UserError
from p2ptrain.tasks import batch_indices, load_task
from p2ptrain.tasks.fashion import FILES, make_task, read_idx

IDX_TYPE = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, IDX_TYPE[array.dtype], array.ndim])
    return header + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(array)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_dataset(directory: Path, *, gz: bool, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(directory / FILES[key], array, gz=gz)
    return arrays


def error_of(data_dir: Path) -> str:
    with pytest.raises(UserError) as info:
        make_task(data_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_loads_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_dataset(tmp_path, gz=gz)
    task = load_task("fashion-mlp", tmp_path)
    assert task.train[0].dtype == torch.uint8 and task.train[0].shape == (12, 28, 28)
    assert np.array_equal(task.train[0].numpy(), arrays["train_images"])
    assert task.train[1].dtype == torch.int64 and task.train[1].tolist() == arrays["train_labels"].tolist()
    assert task.test[1].tolist() == arrays["test_labels"].tolist()
    assert (task.batch_size, task.lr, task.accuracy_bar, task.num_classes) == (100, 1e-3, 0.88, 10)


def test_prepare_and_model(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=True)
    task = make_task(tmp_path)
    x, y = task.batch("run", "peer", 0, 4)
    assert x.dtype == torch.float32 and x.shape == (4, 784) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    index = batch_indices("run", "peer", 0, 4, 12)
    assert torch.equal(x * 255, task.train[0][index].reshape(4, 784).float())
    assert torch.equal(y, task.train[1][index])
    model = task.make_model()
    assert model(x).shape == (4, 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_read_idx_other_types(tmp_path: Path, gz: bool) -> None:
    array = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    assert read_idx(write_idx(tmp_path / "ints", array, gz=gz)).tolist() == array.tolist()
    floats = np.linspace(0, 1, 5, dtype=">f4")
    assert torch.allclose(read_idx(write_idx(tmp_path / "floats", floats, gz=gz)), torch.from_numpy(floats.astype("f4")))


def test_missing_directory(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nowhere")
    assert f"directory {tmp_path / 'nowhere'} does not exist" in message
    assert "apt install dataset-fashion-mnist" in message and "--data-dir" in message


def test_missing_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    message = error_of(tmp_path)
    assert "files missing" in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message.split(";")[0]
    assert "apt install dataset-fashion-mnist" in message


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_corrupt_magic(tmp_path: Path, gz: bool) -> None:
    write_dataset(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    data = bytearray(idx_bytes(np.zeros((12, 28, 28), np.uint8)))
    data[0:2] = b"\x12\x34"
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    message = error_of(tmp_path)
    assert message.startswith(f"{path}: not an IDX file (magic bytes 12340803)")
    assert "apt install dataset-fashion-mnist" in message


def test_labels_where_images_belong(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    assert "expected uint8 images of N x 28 x 28 (IDX magic 2051), found uint8 of 5" in error_of(tmp_path)


def test_truncated_raw_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    message = error_of(tmp_path)
    assert f"{path}: truncated: header says 12x28x28 ({12 * 784} bytes of data), file holds {12 * 784 - 100}" in message


def test_truncated_gzip_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    assert f"{path}: corrupt or truncated gzip data" in error_of(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    assert "not an IDX file (magic bytes missing)" in error_of(tmp_path)


def test_image_and_label_counts_disagree(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=True)
    assert "holds 12 images but" in error_of(tmp_path) and "holds 11 labels" in error_of(tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10], np.uint8), gz=True)
    assert "label 10 is out of range 0..9" in error_of(tmp_path)
