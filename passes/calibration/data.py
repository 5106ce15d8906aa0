"""Calibration data sources and their validation against the model's inputs.

A source is anything that yields feeds (``{input name: array}``), one batch at a time:
- a folder of ``.npz`` files (arrays keyed by input name) or ``.npy`` files (single-input
  models; or ``NAME.npy`` files, one per input, for a single batch);
- a folder of images with a named preprocessing preset (:data:`IMAGE_PRESETS`);
- any Python iterable of feeds, or an onnxruntime-style ``CalibrationDataReader``
  (an object with ``get_next() -> dict | None``).
:func:`validated_batches` wraps a source and checks every batch as it streams past: names,
dtypes, static dims and finiteness, with errors that name the batch and the input.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dyadiq.errors import CalibrationDataError

Feeds = dict[str, np.ndarray]
InputSpecs = Mapping[str, tuple[np.dtype, tuple[int | str | None, ...]]]


@runtime_checkable
class CalibrationDataReader(Protocol):
    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


CalibrationSource = Iterable[Mapping[str, np.ndarray]] | CalibrationDataReader | str | Path


def _reader_batches(reader: CalibrationDataReader) -> Iterator[Feeds]:
    while (batch := reader.get_next()) is not None:
        yield dict(batch)


def _load_numpy(path: Path) -> Any:
    """``np.load`` without pickles; unreadable files become a :class:`CalibrationDataError`."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        if path.suffix.lower() == ".npz":
            raise ValueError("it holds a single .npy array, not a .npz archive")
        return loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(
            f"cannot read calibration file {path}: {exc} (expected a .npz/.npy file of numeric "
            "arrays written by numpy.savez/numpy.save, without object arrays)"
        ) from exc


def _numpy_folder_batches(folder: Path, input_names: list[str]) -> Iterator[Feeds]:
    npz = sorted(folder.glob("*.npz"))
    npy = sorted(folder.glob("*.npy"))
    if npz:
        for path in npz:
            yield _load_numpy(path)
        return
    by_stem = {p.stem: p for p in npy}
    if npy and set(input_names) <= set(by_stem):
        yield {name: _load_numpy(by_stem[name]) for name in input_names}
        return
    if npy and len(input_names) == 1:
        for path in npy:
            yield {input_names[0]: _load_numpy(path)}
        return
    if npy:
        raise CalibrationDataError(
            f"{folder} holds .npy files but the model has {len(input_names)} inputs "
            f"({input_names}): use .npz files keyed by input name, or one NAME.npy per input"
        )


def _imagenet(image: Any) -> np.ndarray:
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    scale = 256 / min(w, h)
    size = (max(224, round(w * scale)), max(224, round(h * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    pixels = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def _ppocr_cls(image: Any) -> np.ndarray:
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    new_w = min(192, max(1, round(48 * w / h)))
    img = img.resize((new_w, 48), Image.Resampling.BILINEAR)
    x = np.zeros((48, 192, 3), np.float32)
    x[:, :new_w] = (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None]


def _fashion_mnist(image: Any) -> np.ndarray:
    from PIL import Image

    img = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    x = (np.asarray(img, np.float32) / 255.0 - 0.286) / 0.353  # the zoo CNN's training stats
    return x[None, None].astype(np.float32)


IMAGE_PRESETS: dict[str, Callable[[Any], np.ndarray]] = {
    "imagenet": _imagenet,  # resize 256, centre crop 224, ImageNet mean/std, NCHW
    "ppocr-cls": _ppocr_cls,  # height 48, width <= 192 right-padded, (x/255 - 0.5)/0.5
    "fashion-mnist": _fashion_mnist,  # 28x28 grey, (x/255 - 0.286)/0.353
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _image_folder_batches(folder: Path, preset: str, input_names: list[str]) -> Iterator[Feeds]:
    from PIL import Image, UnidentifiedImageError

    if preset not in IMAGE_PRESETS:
        raise CalibrationDataError(
            f"unknown image preset {preset!r}; choose one of {sorted(IMAGE_PRESETS)}"
        )
    if len(input_names) != 1:
        raise CalibrationDataError("image folders can only feed single-input models")
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                yield {input_names[0]: IMAGE_PRESETS[preset](image)}
        except (UnidentifiedImageError, OSError) as exc:
            raise CalibrationDataError(f"cannot read calibration image {path}: {exc}") from exc


def open_source(
    source: CalibrationSource, input_names: list[str], *, image_preset: str | None = None
) -> Iterator[Feeds]:
    """Iterate feeds from any supported source (see the module docstring)."""
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.is_dir():
            raise CalibrationDataError(f"calibration folder not found: {folder}")
        if image_preset is not None:
            return _image_folder_batches(folder, image_preset, input_names)
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()) and not any(
            folder.glob("*.np[yz]")
        ):
            raise CalibrationDataError(
                f"{folder} holds images: name a preprocessing preset "
                f"(--calib-preset, one of {sorted(IMAGE_PRESETS)})"
            )
        return _numpy_folder_batches(folder, input_names)
    if isinstance(source, CalibrationDataReader):
        return _reader_batches(source)
    if isinstance(source, Mapping):
        raise CalibrationDataError(
            "calibration data must be an iterable of feed dicts, not a single dict: "
            "wrap it in a list"
        )
    return (dict(batch) for batch in source)


def check_batch(index: int, feeds: Mapping[str, Any], specs: InputSpecs) -> Feeds:
    """Validate one batch of feeds; returns it with arrays as numpy arrays."""
    if not isinstance(feeds, Mapping):
        raise CalibrationDataError(
            f"calibration batch {index} is a {type(feeds).__name__}, expected a dict of arrays"
        )
    missing = sorted(set(specs) - set(feeds))
    extra = sorted(set(feeds) - set(specs))
    if missing or extra:
        raise CalibrationDataError(
            f"calibration batch {index}: inputs do not match the model "
            f"(missing {missing}, unexpected {extra}; the model wants {sorted(specs)})"
        )
    checked: Feeds = {}
    for name, (dtype, shape) in specs.items():
        array = np.asarray(feeds[name])
        if array.dtype != dtype:
            if (
                np.can_cast(array.dtype, dtype, casting="same_kind")
                and array.dtype.kind == dtype.kind
            ):
                array = array.astype(dtype)
            else:
                raise CalibrationDataError(
                    f"calibration batch {index}: input {name} has dtype {array.dtype}, "
                    f"the model wants {dtype}"
                )
        if len(shape) != array.ndim or any(
            isinstance(d, int) and d != a for d, a in zip(shape, array.shape, strict=False)
        ):
            pretty = ["?" if not isinstance(d, int) else d for d in shape]
            raise CalibrationDataError(
                f"calibration batch {index}: input {name} has shape {list(array.shape)}, "
                f"the model wants {pretty}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise CalibrationDataError(
                f"calibration batch {index}: input {name} holds {bad} NaN/Inf value(s)"
            )
        checked[name] = array
    return checked


def validated_batches(
    source: CalibrationSource,
    specs: InputSpecs,
    *,
    image_preset: str | None = None,
    limit: int | None = None,
) -> Iterator[Feeds]:
    """Stream validated batches; raises when the source turns out to be empty."""
    count = 0
    for index, feeds in enumerate(open_source(source, list(specs), image_preset=image_preset)):
        if limit is not None and index >= limit:
            break
        yield check_batch(index, feeds, specs)
        count += 1
    if count == 0:
        raise CalibrationDataError("calibration data is empty: at least one batch is needed")
