"""ILP bit allocation: optimum against brute force, ties, pairs, impossible budgets."""

from __future__ import annotations

import numpy as np
import pytest

from dyadiq.errors import ConfigError
from dyadiq.passes.allocation import AllocationProblem, Budget, PairCost, brute_force, solve
from dyadiq.plan import LayerFormat

FORMATS = [LayerFormat(b, 8) for b in (2, 3, 4, 6, 8)]


def _random_problem(rng, layers=5, pairs=3, ties=()):
    names = [f"l{i}" for i in range(layers)]
    params = {n: int(rng.integers(100, 5000)) for n in names}
    damage = {
        n: {f: float(rng.uniform(0.5, 2) * 4.0 ** (-f.weight_bits)) for f in FORMATS} for n in names
    }
    size = {n: {f: params[n] * f.weight_bits / 8 for f in FORMATS} for n in names}
    bops = {n: {f: params[n] * 10 * f.weight_bits * f.act_bits for f in FORMATS} for n in names}
    pair_costs = []
    for _ in range(pairs):
        a, b = rng.choice(names, size=2, replace=False)
        scale = float(rng.normal() * 0.01)
        pair_costs.append(
            PairCost(
                str(a),
                str(b),
                {
                    (fa, fb): scale * 2.0 ** (-fa.weight_bits - fb.weight_bits)
                    for fa in FORMATS
                    for fb in FORMATS
                },
            )
        )
    candidates = {n: list(FORMATS) for n in names}
    problem = AllocationProblem(candidates, damage, size, bops, pair_costs, ties)
    return problem, sum(params.values())


@pytest.mark.parametrize("seed", range(6))
def test_ilp_reaches_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    ties = (("l0", "l1"),) if seed % 2 else ()
    problem, total_params = _random_problem(rng, ties=ties)
    budget = Budget(size_bytes=total_params * rng.uniform(3.0, 6.0) / 8)
    if seed >= 4:
        budget = Budget(size_bytes=budget.size_bytes, bops=total_params * 10 * 5 * 8)
    ilp, exact = solve(problem, budget), brute_force(problem, budget)
    assert ilp.predicted_damage == pytest.approx(exact.predicted_damage, rel=1e-6, abs=1e-12)
    assert ilp.size_bytes <= budget.size_bytes + 1e-6
    for group in problem.ties:
        assert len({ilp.formats[i] for i in group}) == 1


def test_tighter_budget_never_lowers_damage():
    problem, total = _random_problem(np.random.default_rng(7), layers=8, pairs=0)
    damages = [
        solve(problem, Budget(size_bytes=total * b / 8)).predicted_damage for b in (8, 6, 4, 3, 2)
    ]
    assert damages == sorted(damages)


def test_impossible_budget_names_the_smallest_feasible_one():
    problem, total = _random_problem(np.random.default_rng(8), pairs=0)
    with pytest.raises(ConfigError, match="smallest achievable size") as info:
        solve(problem, Budget(size_bytes=total * 1.5 / 8))
    assert f"{total * 2 / 8:,.0f}" in str(info.value)


def test_contradictory_pins_and_ties_are_errors():
    problem, _ = _random_problem(np.random.default_rng(9), pairs=0)
    candidates = dict(problem.candidates)
    candidates["l0"] = [LayerFormat(8, 8)]
    candidates["l1"] = [LayerFormat(4, 8)]
    with pytest.raises(ConfigError, match="no format in common"):
        AllocationProblem(candidates, problem.damage, problem.size_bytes, ties=(("l0", "l1"),))
    candidates["l2"] = []
    with pytest.raises(ConfigError, match="no allowed format"):
        AllocationProblem(candidates, problem.damage, problem.size_bytes)


def test_budgets_from_a_real_sensitivity_report_and_the_cli(tmp_path, monkeypatch, capsys):
    import json

    import onnx

    from dyadiq.cli import main
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import parse_budget, problem_from_report
    from dyadiq.passes.sensitivity.analysis import SensitivityConfig, analyze
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from tests.builders import conv_relu_pool_fc

    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(10)
    model = conv_relu_pool_fc(rng)
    graph = load_onnx(model)
    batches = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    report = analyze(graph, batches, OutputKind.LOGITS, SensitivityConfig(weight_bits=(2, 4, 8)))
    problem = problem_from_report(graph, report, [LayerFormat(b, 8) for b in (2, 4, 8)])
    params = 4 * 27 + 5 * 64
    assert parse_budget("avg-wbits=4", problem).size_bytes == pytest.approx(params * 4 / 8)
    assert parse_budget("size=1KB", problem).size_bytes == 1000
    w8_bops = parse_budget("bops=1x", problem).bops
    assert parse_budget("bops=0.5x", problem).bops == pytest.approx(w8_bops / 2)
    # without a measured table, latency is the MACs x w x a cost model: relative budgets only
    assert parse_budget("latency=0.5x", problem).latency == pytest.approx(w8_bops / 64 / 2)
    with pytest.raises(ConfigError, match="measured latency table"):
        parse_budget("latency=3ms", problem)
    allocation = solve(problem, parse_budget("avg-wbits=4", problem))
    assert allocation.size_bytes <= params * 4 / 8
    # the CLI end to end, and an impossible budget that names the feasible minimum
    (tmp_path / "m").mkdir()
    onnx.save(model, str(tmp_path / "m" / "m.onnx"))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feeds in enumerate(batches):
        np.savez(calib / f"{i}.npz", **feeds)
    base = ["quantize", str(tmp_path / "m" / "m.onnx"), "--calib", str(calib)]
    assert main([*base, "-o", str(tmp_path / "ok"), "--budget", "avg-wbits=5"]) == 0
    saved = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert saved["allocation"]["weight_bytes"] <= params * 5 / 8
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "bad"), "--budget", "avg-wbits=1"]) == 2
    assert "smallest achievable size" in capsys.readouterr().err


def test_override_priority_is_global_then_kind_then_pattern_then_id():
    from dyadiq.passes.allocation import Overrides

    w8, w4, w2 = LayerFormat(8, 8), LayerFormat(4, 8), LayerFormat(2, 8)
    rules = Overrides(
        default=(w4, w2),
        by_kind={"Gemm": (w8,)},
        by_pattern={"head*": (w4,), "head.fc": (w2,)},
        by_id={"head.fc2": ()},
    )
    all_formats = [w8, w4, w2]
    assert rules.formats_for("conv1", "Conv", all_formats) == (w4, w2)  # global
    assert rules.formats_for("fc", "Gemm", all_formats) == (w8,)  # kind beats global
    assert rules.formats_for("head.x", "Gemm", all_formats) == (w4,)  # pattern beats kind
    assert rules.formats_for("head.fc", "Gemm", all_formats) == (w2,)  # later pattern wins
    assert rules.formats_for("head.fc2", "Gemm", all_formats) == ()  # id beats all: float
    assert Overrides().formats_for("any", "Conv", all_formats) == tuple(all_formats)


def test_backend_capabilities_validate_plans_and_filter_candidates():
    from dyadiq.backends.capabilities import INTEGER_ONNX, ONNX_QDQ, allowed_formats, validate_plan
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.op_facts import OpKind
    from dyadiq.plan import PrecisionPlan
    from tests.builders import conv_relu_pool_fc

    graph = load_onnx(conv_relu_pool_fc(np.random.default_rng(0)))
    validate_plan(PrecisionPlan.uniform(graph, weight_bits=4), graph, ONNX_QDQ, INTEGER_ONNX)
    narrow = type(ONNX_QDQ)(
        "int8-only", frozenset({8}), frozenset({8}), ONNX_QDQ.weighted_kinds, True, "float"
    )
    with pytest.raises(ConfigError) as info:
        validate_plan(PrecisionPlan.uniform(graph, weight_bits=4), graph, narrow)
    assert str(info.value).count("int8-only") == 2  # both layers listed in one message
    assert allowed_formats(narrow, OpKind.CONV, FORMATS) == [LayerFormat(8, 8)]
    # ConvTranspose has an integer form (stride = kernel: a 1x1 Conv + Reshape/Transpose on
    # codes; any other runs as a float island), so a plan may quantize it; a backend without
    # the kind refuses every format of it
    assert INTEGER_ONNX.allows(OpKind.CONV_TRANSPOSE, LayerFormat(8, 8))
    kinds = INTEGER_ONNX.weighted_kinds - {OpKind.CONV_TRANSPOSE}
    no_deconv = type(ONNX_QDQ)("no-deconv", frozenset({8}), frozenset({8}), kinds, True, "float")
    assert not no_deconv.allows(OpKind.CONV_TRANSPOSE, LayerFormat(8, 8))
    assert no_deconv.allows(OpKind.CONV, LayerFormat(8, 8))


def _analyzed_small_model(config_bits=(2, 4, 8)):
    """A conv + fc model and its sensitivity report (empirical damage only: no trace)."""
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.sensitivity.analysis import SensitivityConfig, analyze
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from tests.builders import conv_relu_pool_fc

    rng = np.random.default_rng(10)
    graph = load_onnx(conv_relu_pool_fc(rng))
    batches = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    config = SensitivityConfig(
        weight_bits=config_bits, trace=False, pairs=False, entropy=False, activations=False
    )
    return graph, analyze(graph, batches, OutputKind.LOGITS, config)


def test_a_target_without_integer_offers_only_formats_every_backend_runs():
    """--target writes the integer model and compiles it for the target, so both backends'
    capabilities restrict the candidates even without --integer (the integer model's applied
    only with --integer, the target's never)."""
    from dataclasses import replace

    from dyadiq.backends.capabilities import INTEGER_ONNX, ONNX_QDQ
    from dyadiq.cli import build_parser
    from dyadiq.cli.allocation import mixed_precision_options
    from dyadiq.passes.allocation import model_problem
    from dyadiq.targets import TARGETS

    graph, report = _analyzed_small_model()
    base = ["quantize", "m.onnx", "-o", "out", "--budget", "size=0.5x"]
    widths = ["--wbits-candidates", "2,4,8"]
    for name in TARGETS:
        args = build_parser().parse_args([*base, *widths, "--target", name])
        options = mixed_precision_options(args).allocation
        assert INTEGER_ONNX in options.runs_on, name
        assert TARGETS[name].capabilities in options.runs_on, name
        problem = model_problem(graph, report, options).problem
        assert set(problem.candidates) == set(report.layers)
        for layer, formats in problem.candidates.items():
            kind = graph.kind(graph.node(layer))
            assert formats and all(b.allows(kind, f) for b in options.runs_on for f in formats)
    plain = mixed_precision_options(build_parser().parse_args([*base, *widths]))
    assert plain.allocation.runs_on == (ONNX_QDQ,)
    # the filter bites: a backend without 2-bit weights takes W2 off every layer
    no_w2 = replace(INTEGER_ONNX, name="no-w2", weight_bits=frozenset({4, 8}))
    narrowed = model_problem(graph, report, replace(options, runs_on=(ONNX_QDQ, no_w2)))
    assert all({f.weight_bits for f in fs} == {4, 8} for fs in narrowed.problem.candidates.values())


def test_a_proxy_the_report_lacks_is_an_error_not_zero_damage():
    from dyadiq.passes.allocation import problem_from_report
    from dyadiq.passes.sensitivity.analysis import MissingProxyError, layer_damage
    from dyadiq.passes.sensitivity.proxy import Proxy, UnknownProxyError

    graph, report = _analyzed_small_model()
    formats = [LayerFormat(b, 8) for b in (2, 4, 8)]
    layer = next(iter(report.layers.values()))
    assert layer_damage(layer, 2, Proxy.EMPIRICAL) > layer_damage(layer, 8, "empirical") >= 0
    with pytest.raises(MissingProxyError, match=r"no trace damage.*trace=True"):
        problem_from_report(graph, report, formats, Proxy.HESSIAN)
    with pytest.raises(MissingProxyError, match=r"no fisher damage.*--gradients"):
        layer_damage(layer, 4, "fisher")
    with pytest.raises(UnknownProxyError, match="unknown proxy 'astrology'"):
        layer_damage(layer, 4, "astrology")


def test_format_labels_read_by_one_parser_everywhere():
    from dyadiq.passes.allocation import overrides_from_pins

    every = [LayerFormat(w, a) for w in range(2, 9) for a in (4, 8)]
    assert [LayerFormat.parse(f.label) for f in every] == every
    assert LayerFormat.parse(" w4a8 ") == LayerFormat(4, 8)
    for bad in ("X4A8", "W4", "W4A", "WA8", "W4A8A", "W+4A8", ""):
        with pytest.raises(ConfigError, match="format label"):
            LayerFormat.parse(bad)
    with pytest.raises(ConfigError, match=r"weight bits must be 2\.\.8"):
        LayerFormat.parse("W9A8")
    pins = overrides_from_pins(["conv=W8A8,w4a8", "fc*=W2A8"], ["fc2"], ["conv", "fc1", "fc2"])
    assert pins.by_id == {"conv": (LayerFormat(8, 8), LayerFormat(4, 8)), "fc2": ()}
    assert pins.by_pattern == {"fc*": (LayerFormat(2, 8),)}
    with pytest.raises(ConfigError, match=r"--pin wants ID=W8A8\[,W4A8\], got 'conv=X4A8'"):
        overrides_from_pins(["conv=X4A8"], [], ["conv"])
