"""The analysis executor: serial and Ray runs give the same report, an interrupted analysis
resumes from its journalled tasks, Hutchinson stops on its standard error whatever the rounds,
pairs are chosen by structure and priced safely."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.sensitivity.analysis import SensitivityConfig, analyze, analyze_cached
from dyadiq.passes.sensitivity.estimators import hutchinson_stop, hutchinson_trace
from dyadiq.passes.sensitivity.executor import SerialExecutor, Task, WorkerSpec
from dyadiq.passes.sensitivity.pairs import PairModel, pairs_to_measure, safe_cross_term
from dyadiq.passes.sensitivity.perturbable_model import OutputKind
from tests.builders import with_weights

# two branches from h meet at an Add: Gemm_2 and Gemm_3 are siblings
BRANCHES = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[8, 6] x) => (float[8, 3] y) {
    a = Gemm <transB = 1> (x, w1)
    h = Relu (a)
    b = Gemm <transB = 1> (h, w2)
    c = Gemm <transB = 1> (h, w3)
    s = Add (b, c)
    r = Relu (s)
    y = Gemm <transB = 1> (r, w4)
}
"""
CONFIG = SensitivityConfig(
    weight_bits=(2, 4, 8),
    pairs=True,
    hutchinson_max_iters=24,
    hutchinson_rtol=0.05,
    activation_trace=True,
)
ONE_WIDTH = SensitivityConfig(weight_bits=(4,), trace=False, entropy=False, activations=False)


def _graph_and_batches() -> tuple[Any, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    shapes = {"w1": (5, 6), "w2": (5, 5), "w3": (5, 5), "w4": (3, 5)}
    weights = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    graph = load_onnx(with_weights(BRANCHES, **weights), simplify=False)
    batches = [{"x": rng.normal(size=(8, 6)).astype(np.float32)} for _ in range(3)]
    return graph, batches


def _comparable(report: Any) -> dict[str, Any]:
    data = report.to_json()
    data.pop("seconds")
    return data


class _Counting(SerialExecutor):
    """Serial, counting the tasks it runs; raises KeyboardInterrupt after ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.ran = 0
        self.stop_after = stop_after

    def imap(self, spec: WorkerSpec, tasks: Sequence[Task]) -> Iterator[tuple[int, Any]]:
        for item in super().imap(spec, tasks):
            if self.stop_after is not None and self.ran == self.stop_after:
                raise KeyboardInterrupt
            self.ran += 1
            yield item


def test_an_interrupted_analysis_resumes_with_only_the_remaining_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache"))
    graph, batches = _graph_and_batches()
    whole = _Counting()
    reference = analyze(graph, batches, OutputKind.LOGITS, CONFIG, executor=whole)
    total = whole.ran
    interrupted = _Counting(stop_after=17)
    with pytest.raises(KeyboardInterrupt):
        analyze_cached(graph, batches, OutputKind.LOGITS, CONFIG, executor=interrupted)
    assert interrupted.ran == 17
    resumed = _Counting()
    report, cached = analyze_cached(graph, batches, OutputKind.LOGITS, CONFIG, executor=resumed)
    assert not cached and resumed.ran == total - 17
    assert _comparable(report) | {"fingerprint": ""} == _comparable(reference)
    # stored: the journal is gone and a third run reads the cache
    assert not list((tmp_path / "cache").rglob("*.partial.jsonl"))
    assert analyze_cached(graph, batches, OutputKind.LOGITS, CONFIG)[1]


def test_the_ray_executor_gives_the_serial_report():
    """Run in a fresh interpreter: Ray leaves about ten native threads in the process that
    started it, even after ray.shutdown(), and the fuzz tests later fork this pytest process
    (a fork of a threaded process can deadlock in the child: seen as a 60 s 'hang')."""
    pytest.importorskip("ray")
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from tests.test_analysis_executor import _ray_matches_serial; _ray_matches_serial()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _ray_matches_serial() -> None:
    import ray

    from dyadiq.passes.sensitivity.executor import RayExecutor

    graph, batches = _graph_and_batches()
    serial = analyze(graph, batches, OutputKind.LOGITS, CONFIG)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor(workers=2) as executor:
            assert executor.workers == 2
            parallel = analyze(graph, batches, OutputKind.LOGITS, CONFIG, executor=executor)
            # a second analysis (a new worker spec) on the same executor: its workers must
            # not wait for CPUs the first analysis' idle workers hold
            again = analyze(graph, batches[:1], OutputKind.LOGITS, ONE_WIDTH, executor=executor)
    finally:
        ray.shutdown()
    assert _comparable(parallel) == _comparable(serial)
    assert _comparable(again) == _comparable(
        analyze(graph, batches[:1], OutputKind.LOGITS, ONE_WIDTH)
    )
    assert parallel.pairs and all(layer.trace for layer in parallel.layers.values())
    assert all(site.trace for site in parallel.activations.values())


def test_hutchinson_stops_on_its_standard_error_at_the_sample_a_loop_would():
    rng = np.random.default_rng(1)
    values = list(rng.normal(10.0, 3.0, size=400))
    n = hutchinson_stop(values, min_iters=8, rtol=0.02)
    assert n is not None and 8 <= n < 400
    head = np.asarray(values[:n])
    assert head.std(ddof=1) / np.sqrt(n) <= 0.02 * head.mean()
    # rounds that already looked at a prefix find the same sample
    assert hutchinson_stop(values[: n + 30], min_iters=8, rtol=0.02, checked=n - 1) == n
    assert hutchinson_stop(values[: n - 1], min_iters=8, rtol=0.02) is None
    # the sequential estimator stops there too
    it = iter(values)
    estimate = hutchinson_trace(
        lambda v: next(it), (1,), rng=rng, max_iters=400, min_iters=8, rtol=0.02
    )
    assert estimate.samples == n and estimate.relative_stderr <= 0.02


def test_pairs_by_structure_are_neighbours_and_siblings():
    graph, _ = _graph_and_batches()
    layers = [n.name for n in graph.weighted_layers()]
    first, left, right, last = layers
    chosen = pairs_to_measure(graph, layers, {}, all_pairs_up_to=0, top_k=0)
    assert set(chosen) == {
        (first, left),
        (first, right),
        (left, right),  # siblings: both reach the last layer through the Add
        (left, last),
        (right, last),
    }
    # the most sensitive layers are paired whatever the structure
    damage = {first: 1.0, last: 2.0}
    assert (first, last) in pairs_to_measure(graph, layers, damage, all_pairs_up_to=0, top_k=2)


def test_the_safe_pair_model_zeroes_noise_and_never_buys_cancellation():
    # within two standard errors of zero: noise
    assert safe_cross_term(-0.05, 0.03, 1.0, 1.0) == 0.0
    # a real negative term: never below the larger single damage, never negative by default
    assert safe_cross_term(-5.0, 0.1, 1.0, 3.0) == 0.0
    assert safe_cross_term(-5.0, 0.1, 1.0, 3.0, model=PairModel.FLOOR) == -1.0
    assert safe_cross_term(-5.0, 0.1, 1.0, 3.0, model=PairModel.RAW) == -5.0
    assert safe_cross_term(0.4, 0.1, 1.0, 3.0) == 0.4


def test_the_activation_hessian_trace_matches_the_closed_form():
    """h feeds the last Gemm only: per row, H_h = W2^T (diag(p) - p p^T) W2 exactly."""
    from dyadiq.passes.sensitivity.perturbable_model import softmax
    from tests.test_sensitivity import _mlp

    rng = np.random.default_rng(11)
    model, w1, w2 = _mlp(rng)
    graph = load_onnx(model, simplify=False)
    batches = [{"x": rng.normal(size=(8, 6)).astype(np.float32)} for _ in range(2)]
    config = SensitivityConfig(
        weight_bits=(4, 8),
        trace=False,
        entropy=False,
        activation_trace=True,
        hutchinson_max_iters=400,
        hutchinson_rtol=0.02,
    )
    report = analyze(graph, batches, OutputKind.LOGITS, config)
    site = report.activations["h"]
    assert site.trace is not None
    traces = []
    for x in batches:
        h = np.maximum(x["x"].astype(np.float64) @ w1.T, 0)
        for p in softmax(h @ w2.T.astype(np.float64)):
            traces.append(np.trace(w2.T @ (np.diag(p) - np.outer(p, p)) @ w2) / 5)
    expected = float(np.mean(traces))
    assert abs(site.trace.mean - expected) <= 3 * site.trace.stderr + 0.02 * expected
    # fewer bits, more predicted damage; the layer reading h carries it
    assert site.hessian_damage[4] > site.hessian_damage[8] > 0
    assert report.layers["Gemm_2"].activation_hessian_damage == site.hessian_damage
    # same order of magnitude as the measured damage at 8 bits (the quadratic regime)
    assert 0.2 < site.hessian_damage[8] / site.damage[8] < 5
    # the trace proxy prices activation widths by it, the empirical one by the measurement
    from dyadiq.passes.allocation import report_activation_damage

    assert report_activation_damage(report, "trace")["Gemm_2"] == site.hessian_damage
    assert report_activation_damage(report, "empirical")["Gemm_2"] == site.damage
