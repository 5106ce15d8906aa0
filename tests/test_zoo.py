"""The model zoo: registry, errors, and the four real models (``-m realmodel``).

Real-model tests materialise into the default cache (``$DYADIQ_CACHE`` or
``~/.cache/dyadiq/zoo``): the first run installs packages and exports; later runs are warm.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dyadiq import zoo
from dyadiq.errors import ZooError
from dyadiq.evaluation import evaluate

NAMES = ["mobilenet_v2", "minilm", "fashion_cnn", "ppocr_cls"]


def _session(path: pathlib.Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --- cheap tests (no models) -------------------------------------------------------------------


def test_list_models() -> None:
    models = zoo.list_models()
    # the language model has its own (cheaper) tests: tests/test_llm_zoo.py
    assert [m.name for m in models if m.task is not zoo.Task.LANGUAGE_MODEL] == NAMES
    by_name = {m.name: m for m in models}
    assert by_name["minilm"].task is zoo.Task.EMBEDDING
    assert by_name["fashion_cnn"].has_labels and by_name["ppocr_cls"].has_labels
    assert not by_name["mobilenet_v2"].has_labels and not by_name["minilm"].has_labels
    assert all(m.description for m in models)


def test_unknown_model_is_a_zoo_error() -> None:
    with pytest.raises(ZooError, match="choose one of: mobilenet_v2"):
        zoo.get("resnet9000")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DYADIQ_CACHE")
    assert zoo.cache_dir() == pathlib.Path.home() / ".cache" / "dyadiq" / "zoo"


def test_missing_fashion_dataset_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    from dyadiq.zoo import fashion_cnn

    monkeypatch.setattr(fashion_cnn, "DATA_DIR", tmp_path / "nothing")
    monkeypatch.setattr(fashion_cnn, "_try_apt_install", lambda: None)
    with pytest.raises(ZooError, match="apt-get install dataset-fashion-mnist"):
        zoo.get("fashion_cnn", cache_dir=tmp_path / "cache")


def test_docstring_sentences_are_deterministic_prose() -> None:
    from dyadiq.zoo._text import stdlib_sentences

    s = stdlib_sentences()
    assert len(s) >= 768
    assert len({x.lower() for x in s}) == len(s)
    assert all(x[0].isupper() and x.endswith(".") for x in s)


# --- real models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts() -> dict[str, zoo.ZooArtifacts]:
    return {}


def _get(cache: dict[str, zoo.ZooArtifacts], name: str) -> zoo.ZooArtifacts:
    if name not in cache:
        cache[name] = zoo.get(name)
    return cache[name]


@pytest.mark.realmodel
@pytest.mark.parametrize("name", NAMES)
def test_get_is_cached_and_model_is_valid(
    name: str, artifacts: dict[str, zoo.ZooArtifacts]
) -> None:
    a = _get(artifacts, name)
    assert a.model.name == name
    assert a.model_path.is_file() and a.model_path.suffix == ".onnx"
    assert a.model_path.parent == zoo.cache_dir()
    t0 = time.perf_counter()
    again = zoo.get(name)
    assert time.perf_counter() - t0 < 5.0  # warm: nothing re-exported
    assert again.model_path == a.model_path
    model = onnx.load(str(a.model_path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version in (11, 17)
    assert not [n for n in model.graph.node if n.op_type == "Constant"]  # weights are initializers
    # Calibration feeds match the model inputs by name and dtype; limit counts samples.
    inputs = {i.name: i for i in model.graph.input}
    batches = list(a.calibration_batches(limit=3))
    assert sum(next(iter(b.values())).shape[0] for b in batches) == 3
    for b in batches:
        assert set(b) == set(inputs)
        for k, v in b.items():
            want = np.int64 if inputs[k].type.tensor_type.elem_type == 7 else np.float32
            assert v.dtype == want
            assert np.all(np.isfinite(v))
    feeds, labels = next(iter(a.evaluation_batches(limit=2)))
    assert next(iter(feeds.values())).shape[0] == len(labels) if labels is not None else True
    out = _session(a.model_path).run(None, feeds)[0]
    assert out.shape[0] == next(iter(feeds.values())).shape[0]
    assert np.all(np.isfinite(out))


@pytest.mark.realmodel
def test_fashion_cnn_float_accuracy(artifacts: dict[str, zoo.ZooArtifacts]) -> None:
    from dyadiq.zoo import fashion_cnn

    a = _get(artifacts, "fashion_cnn")
    shapes = [b["input"].shape for b in a.calibration_batches()]
    assert shapes == [(64, 1, 28, 28)] * 4
    idx = fashion_cnn.calibration_indices()
    assert len(np.unique(idx)) == 256 and idx.max() < 60000  # training images only
    # Deterministic.
    first = next(iter(a.calibration_batches()))["input"]
    assert np.array_equal(first, next(iter(a.calibration_batches()))["input"])
    result = evaluate(a, {})
    assert result["float"]["samples"] == 10000
    assert result["float"]["accuracy"] >= 0.88  # measured 0.9082 at training time
    assert result["float"]["top1_agreement"] == 1.0


@pytest.mark.realmodel
def test_ppocr_cls_float_accuracy(artifacts: dict[str, zoo.ZooArtifacts]) -> None:
    from dyadiq.zoo import ppocr_cls

    a = _get(artifacts, "ppocr_cls")
    model = onnx.load(str(a.model_path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 48, 192]
    # Calibration and evaluation text come from disjoint sentence sets.
    assert not set(ppocr_cls._sentences(0)) & set(ppocr_cls._sentences(1))
    result = evaluate(a, {})["float"]
    assert result["samples"] == 400
    assert 0.85 <= result["accuracy"] < 0.99  # measured 0.915: hard but mostly right
    # Clean calibration lines are nearly always right (index 1 = rotated by 180 degrees).
    sess = _session(a.model_path)
    preds = [int(sess.run(None, f)[0].argmax()) for f in a.calibration_batches(limit=64)]
    assert np.mean(np.array(preds) == np.arange(64) % 2) >= 0.93


@pytest.mark.realmodel
def test_mobilenet_v2_sanity_labels(artifacts: dict[str, zoo.ZooArtifacts]) -> None:
    from dyadiq.zoo import mobilenet_v2

    a = _get(artifacts, "mobilenet_v2")
    sess = _session(a.model_path)
    for name, feeds, labels in mobilenet_v2.sanity_batches():
        assert feeds["input"].shape == (1, 3, 224, 224)
        top1 = int(sess.run(None, feeds)[0].argmax())
        assert top1 in labels, f"{name}: predicted {top1}, expected one of {labels}"
    assert not set(mobilenet_v2.CALIBRATION_IMAGES) & set(mobilenet_v2.EVALUATION_IMAGES)
    assert sum(1 for _ in a.calibration_batches()) == 64
    assert sum(1 for _ in a.evaluation_batches()) == 248
    result = evaluate(a, {}, limit=8)["float"]
    assert result["samples"] == 8 and result["top1_agreement"] == 1.0
    assert "accuracy" not in result


@pytest.mark.realmodel
def test_minilm_embeddings(artifacts: dict[str, zoo.ZooArtifacts]) -> None:
    from dyadiq.zoo import minilm

    a = _get(artifacts, "minilm")
    calib, evalu = minilm.split()
    assert len(calib) == 512 and len(evalu) == 256
    assert not set(calib) & set(evalu)
    sess = _session(a.model_path)
    embs = [sess.run(None, f)[0] for f, _ in a.evaluation_batches(limit=8)]
    emb = np.concatenate(embs)
    assert emb.shape == (8, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)

    def embed(text: str) -> np.ndarray:
        ids, mask = next(minilm._encode([text]))
        return np.asarray(sess.run(None, {"input_ids": ids, "attention_mask": mask})[0][0])

    q = embed("Return the number of items in the list.")
    near = embed("Count how many elements a list contains.")
    far = embed("Open a network connection to the mail server.")
    assert float(q @ near) > float(q @ far) + 0.2
    result = evaluate(a, {}, limit=16)["float"]
    assert result["mean_cosine"] == pytest.approx(1.0)
    assert result["nn_agreement"] == 1.0
