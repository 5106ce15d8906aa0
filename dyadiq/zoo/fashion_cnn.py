"""Fashion-MNIST and the small CNN the project trained on it (``examples/train_fashion_cnn.py``).

The ONNX model is committed under ``dyadiq/zoo/data``; the images come from the Debian package
``dataset-fashion-mnist``. Calibration is a fixed random sample of 256 training images, evaluation
is the full 10,000-image test set with labels (disjoint by construction: different files).
"""

from __future__ import annotations

import gzip
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np

from dyadiq.errors import ZooError

DATA_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
PACKAGED_ONNX = pathlib.Path(__file__).parent / "data" / "fashion_cnn.onnx"
VERSION = "v1"
INPUT_NAME = "input"
MEAN = 0.2860
STD = 0.3530
CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 64
CALIBRATION_SEED = 1234
EVALUATION_BATCH = 500
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def load_idx(path: pathlib.Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ZooError(f"{path} is not an unsigned-byte IDX file; reinstall dataset-fashion-mnist")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ZooError(f"{path} is truncated; reinstall dataset-fashion-mnist")
    return data.reshape(dims)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 images Nx28x28 -> normalised float32 Nx1x28x28, as the CNN was trained."""
    x = images.astype(np.float32)[:, None, :, :]
    x *= 1.0 / 255.0
    x -= MEAN
    x *= 1.0 / STD
    return x


def data_file(key: str) -> pathlib.Path:
    path = DATA_DIR / _FILES[key]
    if not path.is_file():
        raise ZooError(
            f"Fashion-MNIST is missing ({path} not found); install it with "
            "`sudo apt-get install dataset-fashion-mnist`"
        )
    return path


def _try_apt_install() -> None:
    """As root, install the Debian dataset package if it is missing (best effort)."""
    import os
    import subprocess

    from dyadiq.zoo._install import log

    if (DATA_DIR / _FILES["test_images"]).is_file() or os.geteuid() != 0:
        return
    if shutil.which("apt-get") is None:
        return
    log.warning("zoo: running apt-get install -y dataset-fashion-mnist")
    subprocess.run(
        ["apt-get", "install", "-y", "dataset-fashion-mnist"], capture_output=True, check=False
    )


def materialise(cache: pathlib.Path) -> pathlib.Path:
    """Check the data is present and copy the committed ONNX into the cache."""
    _try_apt_install()
    for key in _FILES:
        data_file(key)
    if not PACKAGED_ONNX.is_file():
        raise ZooError(
            f"{PACKAGED_ONNX} is missing from this dyadiq install; reinstall dyadiq or run "
            "`python examples/train_fashion_cnn.py --out dyadiq/zoo/data`"
        )
    dst = cache / f"fashion_cnn-{VERSION}.onnx"
    if not dst.is_file() or dst.read_bytes() != PACKAGED_ONNX.read_bytes():
        from dyadiq.zoo._install import atomic_path

        with atomic_path(dst) as tmp:
            shutil.copyfile(PACKAGED_ONNX, tmp)
    return dst


def calibration_indices() -> np.ndarray:
    """The fixed training-set indices used for calibration (sorted, no repeats)."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    return np.sort(rng.choice(60000, size=CALIBRATION_SAMPLES, replace=False))


def calibration_batches(limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    images = load_idx(data_file("train_images"))
    idx = calibration_indices()
    if limit is not None:
        idx = idx[:limit]
    for i in range(0, len(idx), CALIBRATION_BATCH):
        yield {INPUT_NAME: preprocess(images[idx[i : i + CALIBRATION_BATCH]])}


def evaluation_batches(
    limit: int | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    images = load_idx(data_file("test_images"))
    labels = load_idx(data_file("test_labels")).astype(np.int64)
    n = len(images) if limit is None else min(limit, len(images))
    for i in range(0, n, EVALUATION_BATCH):
        j = min(i + EVALUATION_BATCH, n)
        yield {INPUT_NAME: preprocess(images[i:j])}, labels[i:j]
