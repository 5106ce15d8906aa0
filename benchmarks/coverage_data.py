"""Real calibration and held-out inputs for the support matrix's models.

Every maker returns ``(calibration, evaluation)`` lists of feeds (``{input name: array}``),
disjoint by source:
- photos: the zoo's photo sets (``dyadiq.zoo.mobilenet_v2``), its calibration photos for
  calibration and its evaluation photos for evaluation;
- text images: lines of real English (standard-library docstrings) rendered with the DejaVu
  fonts, the zoo's two disjoint sentence halves;
- speech: the nine recorded voice prompts in Debian's ``alsa-utils``
  (``/usr/share/sounds/alsa``, 48 kHz, resampled to 16 kHz); five clips calibrate, four evaluate;
- bytes: real files from this machine (Python's standard library, ``/usr/share/doc``).
The audio chain feeds openWakeWord's models with the float outputs of the model before it,
as the package itself does.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL.ImageFont import FreeTypeFont

from dyadiq.zoo import mobilenet_v2 as photos
from dyadiq.zoo import ppocr_cls
from dyadiq.zoo._install import cache_dir

Feeds = dict[str, np.ndarray]
Split = tuple[list[Feeds], list[Feeds]]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SPEECH_RATE = 16000
CALIBRATION_CLIPS = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Noise")
EVALUATION_CLIPS = ("Rear_Left", "Rear_Right", "Side_Left", "Side_Right")
CALIBRATION_COUNT = 16
EVALUATION_COUNT = 12


def _nchw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1)[None].astype(np.float32))


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def _photo_sets() -> tuple[list[np.ndarray], list[np.ndarray]]:
    calib = [photos.load_image(n) for n in photos.CALIBRATION_IMAGES[:CALIBRATION_COUNT]]
    evaluation = [photos.load_image(n) for n in photos.EVALUATION_IMAGES[:EVALUATION_COUNT]]
    return calib, evaluation


def photos_imagenet(input_name: str) -> Split:
    """Center 224 crops, ImageNet mean/std, NCHW RGB."""
    calib, evaluation = _photo_sets()
    return (
        [{input_name: photos.preprocess(p)} for p in calib],
        [{input_name: photos.preprocess(p)} for p in evaluation],
    )


def photos_yolo(input_name: str, size: str) -> Split:
    """Ultralytics' input: RGB scaled to [0, 1], square (stretched here, not letterboxed)."""
    side = int(size)
    calib, evaluation = _photo_sets()

    def feed(p: np.ndarray) -> Feeds:
        return {input_name: _nchw(_resize(p, side, side) / 255.0)}

    return [feed(p) for p in calib], [feed(p) for p in evaluation]


# --- rendered text --------------------------------------------------------------------------


def _sentences(part: int) -> list[str]:
    return ppocr_cls._sentences(part)


def _font(rng: np.random.Generator, size: int) -> FreeTypeFont:
    from PIL import ImageFont

    fonts = ppocr_cls.fonts()
    return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)


def _page(
    rng: np.random.Generator, part: int, width: int, height: int, photo: np.ndarray | None
) -> np.ndarray:
    """A document-like RGB page: a title, paragraphs of real sentences, maybe a photo figure."""
    from PIL import Image, ImageDraw

    sentences = _sentences(part)
    page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(8, 30))
    title = _font(rng, int(rng.integers(22, 34)))
    draw.text(
        (12, y), sentences[int(rng.integers(len(sentences)))][:40], font=title, fill=(0, 0, 0)
    )
    y += 50
    if photo is not None and rng.random() < 0.7:
        fig_w = width // 2
        fig_h = max(16, int(fig_w * photo.shape[0] / photo.shape[1]))
        if y + fig_h < height - 20:
            page.paste(Image.fromarray(_resize(photo, fig_w, fig_h)), (width // 4, y))
            y += fig_h + 12
    body = _font(rng, int(rng.integers(11, 18)))
    chars = max(10, width // 8)
    while y < height - 20:
        text = sentences[int(rng.integers(len(sentences)))]
        for start in range(0, len(text), chars):
            draw.text((12, y), text[start : start + chars], font=body, fill=(20, 20, 20))
            y += int(body.size * 1.5)
            if y >= height - 20:
                break
        y += int(rng.integers(4, 14))
    return np.asarray(page)


def _pages(width: int, height: int, transform: Callable[[np.ndarray, int], Feeds]) -> Split:
    calib_photos, eval_photos = _photo_sets()
    out: list[list[Feeds]] = []
    for part, (seed, sources) in enumerate(((101, calib_photos), (202, eval_photos))):
        rng = np.random.default_rng(seed)
        out.append(
            [transform(_page(rng, part, width, height, p), i) for i, p in enumerate(sources)]
        )
    return out[0], out[1]


def text_pages_det() -> Split:
    """PaddleOCR's DB detector input: BGR, /255, ImageNet mean/std, 320x320."""

    def feed(rgb: np.ndarray, _: int) -> Feeds:
        bgr = rgb[:, :, ::-1] / 255.0
        return {"x": _nchw((bgr - IMAGENET_MEAN) / IMAGENET_STD)}

    return _pages(320, 320, feed)


def text_pages_layout() -> Split:
    """PicoDet layout input: 608x800 page, RGB /255, ImageNet mean/std."""

    def feed(rgb: np.ndarray, _: int) -> Feeds:
        return {"image": _nchw((rgb / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)}

    return _pages(608, 800, feed)


def text_pages_orientation() -> Split:
    """Page crops rotated by 0/90/180/270 degrees (the classifier's four classes)."""

    def feed(rgb: np.ndarray, index: int) -> Feeds:
        rotated = np.ascontiguousarray(np.rot90(rgb, k=index % 4))
        img = _resize(rotated, 224, 224) / 255.0
        return {"x": _nchw((img - IMAGENET_MEAN) / IMAGENET_STD)}

    return _pages(448, 448, feed)


def text_lines_rec() -> Split:
    """PP-OCR recognizer input: one text line, height 48, width up to 320, (x/255-0.5)/0.5."""
    from PIL import Image

    def feed(bgr: np.ndarray) -> Feeds:
        h, w = bgr.shape[:2]
        new_w = min(320, int(np.ceil(48 * w / h)))
        img = np.asarray(Image.fromarray(bgr).resize((new_w, 48), Image.Resampling.BILINEAR))
        x = np.zeros((1, 3, 48, 320), dtype=np.float32)
        x[0, :, :, :new_w] = (img.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
        return {"x": x}

    out: list[list[Feeds]] = []
    for part, (seed, count) in enumerate(((303, CALIBRATION_COUNT), (404, EVALUATION_COUNT))):
        rng = np.random.default_rng(seed)
        sentences = _sentences(part)
        lines = [sentences[int(rng.integers(len(sentences)))][:30] for _ in range(count)]
        out.append([feed(ppocr_cls.render_line(rng, t, hard=part == 1)) for t in lines])
    return out[0], out[1]


def _captcha_image(rng: np.random.Generator, width: int, height: int, chars: int) -> np.ndarray:
    """Random letters and digits with jitter, lines and noise, RGB uint8."""
    from PIL import Image, ImageDraw

    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(img)
    step = width // (chars + 1)
    for i in range(chars):
        font = _font(rng, int(rng.integers(height // 2, int(height * 0.8))))
        ch = alphabet[int(rng.integers(len(alphabet)))]
        color = tuple(int(v) for v in rng.integers(0, 120, 3))
        draw.text(
            (step // 2 + i * step + int(rng.integers(-3, 4)), int(rng.integers(0, height // 4))),
            ch,
            font=font,
            fill=color,
        )
    for _ in range(3):
        pts = [
            tuple(int(v) for v in (rng.integers(0, width), rng.integers(0, height)))
            for _ in range(2)
        ]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=1)
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def captcha_text() -> Split:
    """captcha-whisperer's input: 160x60 BGR in 0..255, no normalisation."""

    def make(seed: int, count: int) -> list[Feeds]:
        rng = np.random.default_rng(seed)
        return [
            {"image": _nchw(_captcha_image(rng, 160, 60, int(rng.integers(4, 7)))[:, :, ::-1])}
            for _ in range(count)
        ]

    return make(505, CALIBRATION_COUNT), make(606, EVALUATION_COUNT)


def photos_text_yolox() -> Split:
    """ddddocr's YOLOX input: 416x416 BGR in 0..255; captcha-like characters over photos."""
    from PIL import Image

    calib, evaluation = _photo_sets()

    def make(seed: int, sources: list[np.ndarray]) -> list[Feeds]:
        rng = np.random.default_rng(seed)
        feeds = []
        for p in sources:
            base = _resize(p, 416, 416).astype(np.float64)
            text = _captcha_image(rng, 416, 140, int(rng.integers(4, 7))).astype(np.float64)
            top = int(rng.integers(0, 416 - 140))
            base[top : top + 140] = 0.4 * base[top : top + 140] + 0.6 * text
            feeds.append(
                {
                    "images": _nchw(
                        np.asarray(Image.fromarray(base.astype(np.uint8)))[:, :, ::-1].astype(
                            np.float32
                        )
                    )
                }
            )
        return feeds

    return make(707, calib), make(808, evaluation)


# --- bytes ----------------------------------------------------------------------------------


def _magika_features(content: bytes, size: int = 1024, padding: int = 256) -> np.ndarray:
    """Magika v3's features: the first and the last ``size`` bytes after stripping whitespace,
    padded with token 256 (the beginning on its right, the end on its left)."""
    beg = list(content.lstrip()[:size])
    end = list(content.rstrip()[-size:]) if content.rstrip() else []
    row = beg + [padding] * (size - len(beg)) + [padding] * (size - len(end)) + end
    return np.asarray(row, dtype=np.int32)[None]


def _sample_files() -> tuple[list[Path], list[Path]]:
    import email
    import json
    import sqlite3
    import xml

    roots = [Path(m.__file__).parent for m in (json, email, xml, sqlite3)]  # type: ignore[arg-type]
    roots.append(Path("/usr/share/doc/opencv-doc/examples/data"))
    roots.append(Path(np.__file__).parent / "core")
    files = sorted(
        p
        for root in roots
        if root.is_dir()
        for p in root.rglob("*")
        if p.is_file() and p.stat().st_size > 64
    )
    rng = np.random.default_rng(909)
    picked = [files[i] for i in rng.permutation(len(files))[: CALIBRATION_COUNT + EVALUATION_COUNT]]
    return picked[:CALIBRATION_COUNT], picked[CALIBRATION_COUNT:]


def file_bytes() -> Split:
    calib, evaluation = _sample_files()
    return (
        [{"bytes": _magika_features(p.read_bytes())} for p in calib],
        [{"bytes": _magika_features(p.read_bytes())} for p in evaluation],
    )


# --- speech ---------------------------------------------------------------------------------


def _alsa_sounds_dir() -> Path:
    """``/usr/share/sounds/alsa`` from Debian's alsa-utils, extracted once into the cache."""
    installed = Path("/usr/share/sounds/alsa")
    if installed.is_dir():
        return installed
    cached = cache_dir() / "coverage" / "data" / "alsa-sounds"
    if not (cached / "Front_Center.wav").is_file():
        with tempfile.TemporaryDirectory(prefix="dyadiq-alsa-") as tmp:
            subprocess.run(
                ["apt-get", "download", "alsa-utils"], cwd=tmp, check=True, capture_output=True
            )
            deb = next(Path(tmp).glob("alsa-utils_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(tmp) / "x/usr/share/sounds/alsa", cached, dirs_exist_ok=True)
    return cached


@functools.cache
def speech(clip: str) -> np.ndarray:
    """One voice prompt as 16 kHz float samples in int16 units (openWakeWord's convention)."""
    from math import gcd

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    rate, data = wavfile.read(_alsa_sounds_dir() / f"{clip}.wav")
    x = data.astype(np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if data.dtype != np.int16:
        x = x / np.abs(x).max() * 20000.0
    g = gcd(rate, SPEECH_RATE)
    return np.asarray(resample_poly(x, SPEECH_RATE // g, rate // g), dtype=np.float32)


def _stream(clips: tuple[str, ...]) -> np.ndarray:
    gap = np.zeros(SPEECH_RATE // 4, dtype=np.float32)
    return np.concatenate([np.concatenate([speech(c), gap]) for c in clips])


def speech_vad() -> Split:
    """512-sample chunks at 16 kHz in [-1, 1], with the recurrent state the float model carries."""
    import onnxruntime as ort

    from benchmarks.coverage_models import BY_NAME, fetch

    sess = ort.InferenceSession(
        str(fetch(BY_NAME["silero_vad"])), providers=["CPUExecutionProvider"]
    )

    def chunks(clips: tuple[str, ...], count: int) -> list[Feeds]:
        audio = _stream(clips) / 32768.0
        state = np.zeros((2, 1, 128), dtype=np.float32)
        sr = np.array(SPEECH_RATE, dtype=np.int64)
        feeds: list[Feeds] = []
        stride = max(1, (audio.size // 512) // count)
        for i in range(audio.size // 512):
            x = audio[None, i * 512 : (i + 1) * 512].astype(np.float32)
            if i % stride == 0 and len(feeds) < count:
                feeds.append({"input": x, "state": state.copy(), "sr": sr})
            _, state = sess.run(None, {"input": x, "state": state, "sr": sr})
        return feeds

    return chunks(CALIBRATION_CLIPS, 32), chunks(EVALUATION_CLIPS, 24)


def speech_mel() -> Split:
    """One-second windows (1x16000) of the voice prompts."""

    def windows(clips: tuple[str, ...], count: int) -> list[Feeds]:
        audio = _stream(clips)
        starts = np.linspace(0, audio.size - SPEECH_RATE, count).astype(int)
        return [{"input": audio[None, s : s + SPEECH_RATE].copy()} for s in starts]

    return windows(CALIBRATION_CLIPS, CALIBRATION_COUNT), windows(
        EVALUATION_CLIPS, EVALUATION_COUNT
    )


def _mel_frames(clips: tuple[str, ...]) -> np.ndarray:
    """openWakeWord's features: float log-mel frames of the whole stream, ``x / 10 + 2``."""
    import onnxruntime as ort

    from benchmarks.coverage_models import BY_NAME, fetch

    sess = ort.InferenceSession(
        str(fetch(BY_NAME["oww_melspectrogram"])), providers=["CPUExecutionProvider"]
    )
    audio = _stream(clips)
    mel = sess.run(None, {"input": audio[None]})[0]
    return np.asarray(mel.squeeze() / 10.0 + 2.0, dtype=np.float32)  # [frames, 32]


def _windows(frames: np.ndarray, size: int, step: int) -> list[np.ndarray]:
    return [frames[s : s + size] for s in range(0, frames.shape[0] - size + 1, step)]


def _pick(items: list[Feeds], count: int) -> list[Feeds]:
    index = np.linspace(0, len(items) - 1, min(count, len(items))).astype(int)
    return [items[i] for i in index]


def speech_embedding_in() -> Split:
    """76-frame mel windows, 8 frames apart, as the package slides them."""

    def make(clips: tuple[str, ...], count: int) -> list[Feeds]:
        wins = _windows(_mel_frames(clips), 76, 8)
        return _pick([{"input_1": w[None, :, :, None].copy()} for w in wins], count)

    return make(CALIBRATION_CLIPS, CALIBRATION_COUNT), make(EVALUATION_CLIPS, EVALUATION_COUNT)


def speech_wakeword_in() -> Split:
    """16 consecutive float speech embeddings (the wake-word heads' input)."""
    import onnxruntime as ort

    from benchmarks.coverage_models import BY_NAME, fetch

    sess = ort.InferenceSession(
        str(fetch(BY_NAME["oww_embedding"])), providers=["CPUExecutionProvider"]
    )

    def make(clips: tuple[str, ...], count: int) -> list[Feeds]:
        wins = _windows(_mel_frames(clips), 76, 8)
        emb = np.concatenate(
            [sess.run(None, {"input_1": w[None, :, :, None]})[0].reshape(1, 96) for w in wins]
        )
        seqs = _windows(emb, 16, 1)
        return _pick([{"x.1": s[None].astype(np.float32)} for s in seqs], count)

    return make(CALIBRATION_CLIPS, CALIBRATION_COUNT), make(EVALUATION_CLIPS, EVALUATION_COUNT)


MAKERS: dict[str, Callable[..., Split]] = {
    "photos_imagenet": photos_imagenet,
    "photos_yolo": photos_yolo,
    "photos_text_yolox": photos_text_yolox,
    "text_pages_det": text_pages_det,
    "text_pages_layout": text_pages_layout,
    "text_pages_orientation": text_pages_orientation,
    "text_lines_rec": text_lines_rec,
    "captcha_text": captcha_text,
    "file_bytes": file_bytes,
    "speech_vad": speech_vad,
    "speech_mel": speech_mel,
    "speech_embedding_in": speech_embedding_in,
    "speech_wakeword_in": speech_wakeword_in,
}


def make(spec: str) -> Split:
    """``name[:arg:arg]`` -> that maker's split."""
    name, *args = spec.split(":")
    return MAKERS[name](*args)


def write_split(
    spec: str, folder: Path, drop: tuple[str, ...] = ()
) -> tuple[Path, Path, list[Feeds]]:
    """Write ``folder/calib/NNN.npz`` and ``folder/eval/NNN.npz``; return both folders and the
    evaluation feeds. ``drop``: inputs the model file has as constants (bound inputs)."""
    calib, evaluation = make(spec)
    if drop:
        calib = [{k: v for k, v in f.items() if k not in drop} for f in calib]
        evaluation = [{k: v for k, v in f.items() if k not in drop} for f in evaluation]
    for sub, feeds in (("calib", calib), ("eval", evaluation)):
        target = folder / sub
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for i, feed in enumerate(feeds):
            np.savez(target / f"{i:03d}.npz", **feed)  # type: ignore[arg-type]
    return folder / "calib", folder / "eval", evaluation
