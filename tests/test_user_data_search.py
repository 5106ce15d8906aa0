"""--max-drop and frontier on any model with the user's own data (``--calib DIR --val DIR
[--test DIR]``), and the Python API's ``evaluate(model_path) -> float`` callback: the plan is
chosen on a search split and reported on a disjoint report split; bad input is one error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import with_weights

import dyadiq
from dyadiq.cli import main
from dyadiq.errors import CalibrationDataError, ConfigError
from dyadiq.evaluation import evaluate_on_data
from dyadiq.held_out import HeldOut, split_in_two

# Fast settings: two candidate widths, plain rounding (W2 then visibly hurts), few batches.
FAST = ["--analysis-samples", "2", "--wbits-candidates", "2,8", "--compensate", "none"]


def small_classifier() -> onnx.ModelProto:
    """x[N,3,8,8] -> conv1 -> Relu -> conv2 -> Relu -> GlobalAveragePool -> fc -> y[N,10],
    with a dynamic batch so that --val can be split by sample."""
    rng = np.random.default_rng(0)
    model = with_weights(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 3, 8, 8] x) => (float[N, 10] y) {
            c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            r1 = Relu (c1)
            c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
            r2 = Relu (c2)
            g = GlobalAveragePool (r2)
            f = Flatten (g)
            y = Gemm <transB = 1> (f, w3, b3)
        }
        """,
        w1=rng.normal(size=(8, 3, 3, 3)) * 0.3,
        b1=rng.normal(size=8) * 0.1,
        w2=rng.normal(size=(8, 8, 3, 3)) * 0.2,
        b2=rng.normal(size=8) * 0.1,
        w3=rng.normal(size=(10, 8)),
        b3=rng.normal(size=10) * 0.1,
    )
    names = iter(["conv1", "relu1", "conv2", "relu2", "pool", "flatten", "fc"])
    for node in model.graph.node:
        node.name = next(names)
    return model


def _batches(folder: Path, count: int, seed: int, rows: int = 8) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(rows, 3, 8, 8)).astype(np.float32) for _ in range(count)]
    for i, x in enumerate(arrays):
        np.savez(folder / f"b{i}.npz", x=x)
    return arrays


@pytest.fixture
def user(tmp_path: Path) -> dict[str, Path]:
    onnx.save(small_classifier(), str(tmp_path / "m.onnx"))
    _batches(tmp_path / "calib", 4, seed=1)
    _batches(tmp_path / "val", 3, seed=2)
    _batches(tmp_path / "test", 2, seed=3)
    return {"model": tmp_path / "m.onnx", **{k: tmp_path / k for k in ("calib", "val", "test")}}


def _rows(folder: Path, parity: int) -> list[dict[str, np.ndarray]]:
    """--val's samples at even (0) or odd (1) positions, computed here independently."""
    stacked = np.concatenate([np.load(p)["x"] for p in sorted(folder.glob("*.npz"))])
    return [{"x": stacked[parity::2]}]


def test_split_in_two_is_disjoint_and_deterministic() -> None:
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    batches = ({"x": x[:4]}, {"x": x[4:7]}, {"x": x[7:]})
    data = HeldOut(batches, np.arange(10), "--val V", tuple(range(10)))
    by_sample = split_in_two(data, fixed_batch=False)
    assert by_sample.search.positions == (0, 2, 4, 6, 8)
    assert by_sample.report.positions == (1, 3, 5, 7, 9)
    searched = np.concatenate([b["x"] for b in by_sample.search.batches])
    assert np.array_equal(searched, x[0::2]) and list(by_sample.search.labels) == [0, 2, 4, 6, 8]
    by_batch = split_in_two(data, fixed_batch=True)  # a fixed batch dim: whole batches alternate
    assert by_batch.search.positions == (0, 1, 2, 3, 7, 8, 9)
    assert by_batch.report.positions == (4, 5, 6)
    again = split_in_two(data, fixed_batch=False)  # deterministic
    assert again.search.positions == by_sample.search.positions and "split in two" in again.note
    assert set(by_sample.search.positions).isdisjoint(by_sample.report.positions)


def test_max_drop_on_user_data_searches_one_half_and_reports_the_other(
    user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["quantize", str(user["model"]), "--calib", str(user["calib"])]
    argv += ["--val", str(user["val"]), "--max-drop", "10%", "--bisect-steps", "3", "-o", str(out)]
    assert main([*argv, *FAST]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "report.json").read_text())
    held_out, allocation = report["held_out"], report["allocation"]
    # 24 --val samples: 12 at even positions searched, the 12 others reported on
    assert held_out["search"]["samples"] == 12 and "even" in held_out["search"]["source"]
    assert held_out["report"]["samples"] == 12 and "odd" in held_out["report"]["source"]
    assert "no --test" in held_out["note"] and "no --test" in printed
    assert held_out["metric"]["name"] == allocation["metric"] == "top1_agreement"
    assert "fraction of samples whose top-1 class is the float model's" in printed
    # the search measured plans on the even half: some failed, the chosen one passed
    assert allocation["float_metric"] == 1.0 and allocation["threshold"] == pytest.approx(0.9)
    assert any(not h["passed"] for h in allocation["history"])
    assert allocation["plan_metric"] >= 0.9
    assert allocation["weight_bytes"] < allocation["history"][0]["size"]  # smaller than all-W8
    qdq = out / "model.qdq.onnx"
    _, searched = evaluate_on_data(user["model"], {"q": qdq}, _rows(user["val"], 0))
    assert searched["q"]["top1_agreement"] == pytest.approx(allocation["plan_metric"])
    # ... and the reported figures are the written model's on the odd half
    _, reported = evaluate_on_data(user["model"], {"q": qdq}, _rows(user["val"], 1))
    metrics = report["metrics"]["dyadiq plan"]
    assert metrics["samples"] == 12
    assert metrics["logit_cosine"] == pytest.approx(reported["q"]["logit_cosine"])
    assert metrics["top1_agreement"] == pytest.approx(reported["q"]["top1_agreement"])
    assert metrics["logit_cosine"] != pytest.approx(searched["q"]["logit_cosine"])


def test_labels_search_accuracy_on_val_and_report_on_test(
    user: dict[str, Path], tmp_path: Path
) -> None:
    labels = np.arange(24) % 10
    made = dyadiq.quantize(
        user["model"],
        str(user["calib"]),
        validation=str(user["val"]),
        labels=labels,
        test=str(user["test"]),
        test_labels=np.arange(16) % 3,
        max_drop="0.2",
        **_fast_api(),
    )
    held_out = made.report["held_out"]
    assert held_out["search"] == {"source": f"--val {user['val']}", "samples": 24}
    assert held_out["report"] == {"source": f"--test {user['test']}", "samples": 16}
    assert made.allocation.info["metric"] == "accuracy"
    float_accuracy = made.allocation.info["float_metric"]
    assert made.allocation.info["plan_metric"] >= float_accuracy - 0.2
    assert made.metrics is not None and made.metrics["dyadiq plan"]["samples"] == 16
    assert "accuracy" in made.metrics["float"]


def _fast_api(**search: object) -> dict[str, object]:
    from dyadiq.api import SearchOptions

    options = SearchOptions(wbits_candidates=(2, 8), analysis_samples=2, bisect_steps=3)
    return {"compensate": "none", "search": options, **search}


def test_frontier_on_user_data_writes_its_outputs(user: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "frontier"
    argv = ["frontier", str(user["model"]), "--calib", str(user["calib"])]
    argv += ["--val", str(user["val"]), "--points", "3", "-o", str(out)]
    assert main([*argv, *FAST]) == 0
    data = json.loads((out / "frontier.json").read_text())
    assert data["metric"] == "top1_agreement" and data["float_metric"] == 1.0
    assert data["data"] == {"source": f"--val {user['val']}", "samples": 24}
    assert len(data["points"]) == 3 and all(0 <= p["metric"] <= 1 for p in data["points"])
    assert data["points"][-1]["metric"] == 1.0  # the largest plan (all W8) agrees everywhere
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _code_bits(model: onnx.ModelProto, layer: str) -> int:
    """The width of ``layer``'s weight codes in a QDQ model (from the codes' range)."""
    produced = {o: n for n in model.graph.node for o in n.output}
    codes = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == layer)
    array = codes[produced[node.input[1]].input[0]].astype(np.int64)
    return int(np.ceil(np.log2(array.max() - array.min() + 1)))


def test_an_evaluate_callback_drives_the_search(user: dict[str, Path]) -> None:
    """A callback that penalises conv2 at a low width: the plan keeps conv2 at 8 bits and
    narrows the others; every call gets a complete QDQ model (the first, the float model)."""
    calls: list[str] = []

    def evaluate(path: Path) -> float:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
            calls.append("float")
            return 1.0
        calls.append("qdq")
        narrow = {layer: _code_bits(model, layer) < 8 for layer in ("conv1", "conv2", "fc")}
        return 1.0 - 0.5 * narrow["conv2"] - 0.01 * (narrow["conv1"] + narrow["fc"])

    made = dyadiq.quantize(
        user["model"], str(user["calib"]), max_drop="0.1", evaluate=evaluate, **_fast_api()
    )
    formats = {k: v.weight_bits for k, v in made.plan.layers.items()}
    assert formats["conv2"] == 8 and min(formats["conv1"], formats["fc"]) == 2
    assert calls[0] == "float" and calls.count("qdq") >= 3
    assert calls[-2:] == ["float", "qdq"] and "float" not in calls[1:-2]  # then the report
    history = made.allocation.info["history"]
    assert any(h["metric"] < 0.6 and not h["passed"] for h in history)  # conv2 narrowed: fails
    assert made.report["held_out"]["metric"]["units"] == "the callback's own units"
    assert "same data the search measured on" in made.report["held_out"]["note"]
    assert made.metrics is not None
    assert made.metrics["dyadiq plan"]["evaluate"] == made.allocation.info["plan_metric"]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (
            RuntimeError("no labels here"),
            r"raised RuntimeError: no labels here \(while measuring plan W",
        ),
        ("good", r"returned 'good' \(str\), not a number \(while measuring plan W"),
    ],
)
def test_a_failing_callback_names_the_plan(
    user: dict[str, Path], result: object, expected: str
) -> None:
    def evaluate(path: Path) -> object:
        if not any(n.op_type == "DequantizeLinear" for n in onnx.load(str(path)).graph.node):
            return 1.0  # the float model's reference score
        if isinstance(result, Exception):
            raise result
        return result

    with pytest.raises(ConfigError, match=expected):
        dyadiq.quantize(
            user["model"], str(user["calib"]), max_drop="1%", evaluate=evaluate, **_fast_api()
        )


def test_bad_input_is_one_error_listing_every_problem(
    user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "quantize",
        str(user["model"]),
        "--calib",
        str(user["calib"]),
        "-o",
        str(tmp_path / "o"),
    ]
    assert (
        main([*base, "--max-drop", "a lot", "--labels", "l.txt", "--test", str(user["calib"])]) == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "--max-drop wants a drop >= 0" in err
    assert "measures plans on held-out data: give --val DIR" in err
    assert "--labels are --val's labels" in err
    assert "--calib and --test are the same folder" in err
    # --val (and --test) batches that do not fit the model: every bad batch, in one error
    for bad in (tmp_path / "bad_val", tmp_path / "bad_test"):
        bad.mkdir()
        np.savez(bad / "a.npz", x=np.zeros((2, 3, 9, 9), np.float32))
        np.savez(bad / "b.npz", x=np.zeros((2, 3, 8, 8), np.float32))
        np.savez(bad / "c.npz", y=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationDataError) as info:
        dyadiq.quantize(
            user["model"],
            str(user["calib"]),
            validation=str(tmp_path / "bad_val"),
            test=str(tmp_path / "bad_test"),
            max_drop="1%",
            **_fast_api(),
        )
    message = str(info.value)
    for option in ("--val", "--test"):
        assert f"{option} batch 0: input x has shape [2, 3, 9, 9]" in message
        assert f"{option} batch 2: inputs do not match the model" in message
    # ... and beside bad options, in the same error
    with pytest.raises(ConfigError) as both:
        dyadiq.quantize(
            user["model"], str(user["calib"]), validation=str(tmp_path / "bad_val"), max_drop="-1"
        )
    assert "--max-drop wants a drop >= 0" in str(both.value)
    assert "--val batch 0: input x has shape [2, 3, 9, 9]" in str(both.value)
    assert not (tmp_path / "o").exists()


def test_a_zoo_models_held_out_data_splits_into_disjoint_halves(tmp_path: Path) -> None:
    """evaluate(..., part=SEARCH / REPORT) reads the even / odd held-out positions only."""
    from types import SimpleNamespace

    import onnxruntime as ort

    from dyadiq.evaluation import evaluate
    from dyadiq.held_out import Part
    from dyadiq.zoo import Task

    onnx.save(small_classifier(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(21, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, size=21)
    bounds = [(0, 8), (8, 16), (16, 21)]

    def evaluation_batches(limit: int | None) -> object:
        return (({"x": x[a:b]}, labels[a:b]) for a, b in bounds)

    model = SimpleNamespace(task=Task.CLASSIFICATION, name="fake")
    fake = SimpleNamespace(model=model, model_path=tmp_path / "m.onnx")
    fake.evaluation_batches = evaluation_batches
    whole = evaluate(fake, {})["float"]
    halves = {part: evaluate(fake, {}, part=part)["float"] for part in (Part.SEARCH, Part.REPORT)}
    assert (halves[Part.SEARCH]["samples"], halves[Part.REPORT]["samples"]) == (11, 10)
    assert whole["samples"] == 21
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    predicted = np.asarray(session.run(None, {"x": x})[0]).argmax(axis=1)
    for part, parity in ((Part.SEARCH, 0), (Part.REPORT, 1)):
        expected = np.mean(predicted[parity::2] == labels[parity::2])
        assert halves[part]["accuracy"] == pytest.approx(expected)
