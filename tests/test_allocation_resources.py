"""Allocation with activation widths and linear resource budgets: the ILP against brute force
with activation ties, latency, flash and peak-RAM constraints; budget parsing; infeasibility
messages; activation ties and damage derived from a graph; the measured-table loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dyadiq.errors import ConfigError
from dyadiq.passes.allocation import (
    AllocationProblem,
    Budget,
    PairCost,
    RamModel,
    brute_force,
    parse_budget,
    smallest_feasible,
    solve,
    totals,
)
from dyadiq.plan import LayerFormat

FORMATS = [LayerFormat(w, a) for w in (2, 3, 4, 6, 8) for a in (4, 8)]


def _problem(rng, layers=4, pairs=2, weight_only_pairs=True, ties=(), act_ties=(), ram=True):
    """Random damages falling with both widths; latency ~ MACs x w x a plus noise; flash ~
    weight bits; RAM: a chain schedule whose tensors are read at their reader's width."""
    names = [f"l{i}" for i in range(layers)]
    params = {n: int(rng.integers(100, 3000)) for n in names}
    w_sens = {n: rng.uniform(0.5, 2) for n in names}
    a_sens = {n: rng.uniform(0.1, 1) for n in names}
    damage = {
        n: {
            f: float(w_sens[n] * 4.0 ** (-f.weight_bits) + a_sens[n] * 4.0 ** (-f.act_bits))
            for f in FORMATS
        }
        for n in names
    }
    size = {n: {f: params[n] * f.weight_bits / 8 for f in FORMATS} for n in names}
    bops = {n: {f: params[n] * 10.0 * f.weight_bits * f.act_bits for f in FORMATS} for n in names}
    latency = {
        n: {f: params[n] * f.weight_bits * f.act_bits / 64 * rng.uniform(0.8, 1.2) for f in FORMATS}
        for n in names
    }
    flash = {n: {f: np.ceil(params[n] * f.weight_bits / 8) + 36 for f in FORMATS} for n in names}
    pair_costs = []
    for _ in range(pairs):
        a, b = (str(x) for x in rng.choice(names, size=2, replace=False))
        scale = float(rng.normal() * 0.02)
        noise = {(fa, fb): rng.uniform(0.5, 1.5) for fa in FORMATS for fb in FORMATS}
        cost = {
            (fa, fb): scale
            * 2.0 ** (-fa.weight_bits - fb.weight_bits)
            * (1.0 if weight_only_pairs else noise[(fa, fb)])
            for fa in FORMATS
            for fb in FORMATS
        }
        pair_costs.append(PairCost(a, b, cost))
    model = None
    if ram:
        tensors = [f"t{i}" for i in range(layers + 1)]
        elements = {t: int(rng.integers(200, 2000)) for t in tensors}
        model = RamModel(
            live_sets=tuple((tensors[i], tensors[i + 1]) for i in range(layers)),
            # packed codes: A4 halves a tensor; the last tensor is the model output (fixed)
            bytes_by_width={t: {4: elements[t] / 2, 8: float(elements[t])} for t in tensors},
            reader={tensors[i]: names[i] for i in range(layers)},
        )
    problem = AllocationProblem(
        {n: list(FORMATS) for n in names},
        damage,
        size,
        bops,
        pair_costs,
        ties,
        act_ties,
        latency=latency,
        flash=flash,
        ram=model,
    )
    return problem


def _check_against_brute_force(problem, budget):
    ilp, exact = solve(problem, budget), brute_force(problem, budget)
    assert ilp.predicted_damage == pytest.approx(exact.predicted_damage, rel=1e-7, abs=1e-12)
    values = totals(problem, ilp.formats)
    for resource, limit in budget.limits().items():
        assert values[resource] <= limit * (1 + 1e-9)
    for group in problem.ties:
        assert len({ilp.formats[i] for i in group}) == 1
    for group in problem.act_ties:
        assert len({ilp.formats[i].act_bits for i in group}) == 1
    assert ilp.peak_ram_bytes == pytest.approx(problem.ram.peak(ilp.formats))
    return ilp


@pytest.mark.parametrize("seed", range(8))
def test_ilp_with_activation_widths_and_all_budgets_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    act_ties = (("l1", "l2"),) if seed % 2 else ()
    ties = (("l0", "l3"),) if seed % 4 == 3 else ()
    problem = _problem(rng, weight_only_pairs=seed < 4, ties=ties, act_ties=act_ties)
    reference = totals(problem, {i: LayerFormat(8, 8) for i in problem.candidates})
    fraction = rng.uniform(0.35, 0.8, size=5)
    budgets = [
        Budget(size_bytes=reference["size"] * fraction[0]),
        Budget(latency=reference["latency"] * fraction[1], ram_bytes=reference["ram"] * 0.8),
        Budget(
            size_bytes=reference["size"] * fraction[0],
            bops=reference["bops"] * fraction[1],
            latency=reference["latency"] * fraction[2],
            flash_bytes=reference["flash"] * max(fraction[3], 0.6),
            ram_bytes=reference["ram"] * max(fraction[4], 0.6),
        ),
    ]
    for budget in budgets:
        try:
            exact = brute_force(problem, budget)
        except ConfigError:
            with pytest.raises(ConfigError, match="infeasible"):
                solve(problem, budget)
            continue
        ilp = _check_against_brute_force(problem, budget)
        assert ilp.predicted_damage == pytest.approx(exact.predicted_damage, rel=1e-7)


def test_activation_tie_shares_the_width_not_the_weight_width():
    rng = np.random.default_rng(3)
    problem = _problem(rng, pairs=0, ram=False)
    damage = {i: dict(problem.damage[i]) for i in problem.damage}
    # l0 wants A4 (A8 costs it 10) and W8; l1 wants A8 (A4 costs it 1): the tie makes l1
    # give way on the activation width but not on the weight width
    for f in FORMATS:
        damage["l0"][f] += (10.0 if f.act_bits == 8 else 0.0) + (5.0 if f.weight_bits < 8 else 0)
        damage["l1"][f] += 1.0 if f.act_bits == 4 else 0.0
    sizes = problem.size_bytes
    size_limit = sizes["l0"][LayerFormat(8, 8)] + sum(
        sizes[i][LayerFormat(3, 8)] for i in problem.candidates if i != "l0"
    )
    tied = AllocationProblem(
        problem.candidates, damage, problem.size_bytes, act_ties=(("l0", "l1"),)
    )
    ilp = _check_against_brute_force_no_ram(tied, Budget(size_bytes=size_limit))
    assert ilp.formats["l0"].act_bits == ilp.formats["l1"].act_bits == 4
    assert ilp.formats["l0"].weight_bits == 8 > ilp.formats["l1"].weight_bits
    free = solve(
        AllocationProblem(problem.candidates, damage, problem.size_bytes),
        Budget(size_bytes=size_limit),
    )
    assert free.formats["l1"].act_bits == 8  # untied, l1 keeps A8: the tie did the work


def _check_against_brute_force_no_ram(problem, budget):
    ilp, exact = solve(problem, budget), brute_force(problem, budget)
    assert ilp.predicted_damage == pytest.approx(exact.predicted_damage, rel=1e-7)
    return ilp


def test_contradictory_activation_pins_are_an_error():
    problem = _problem(np.random.default_rng(4), pairs=0, ram=False)
    candidates = dict(problem.candidates)
    candidates["l0"] = [LayerFormat(8, 8)]
    candidates["l1"] = [LayerFormat(4, 4), LayerFormat(8, 4)]
    with pytest.raises(ConfigError, match="no activation width in common"):
        AllocationProblem(candidates, problem.damage, problem.size_bytes, act_ties=(("l0", "l1"),))


def test_parse_budget_combinations_units_and_errors():
    problem = _problem(np.random.default_rng(5), pairs=0)
    w8 = totals(problem, {i: LayerFormat(8, 8) for i in problem.candidates})
    budget = parse_budget("size=2KB, bops=0.5x, latency=0.7x, flash=3KiB, ram=1.5KB", problem)
    assert budget.size_bytes == 2000
    assert budget.bops == pytest.approx(0.5 * w8["bops"])
    assert budget.latency == pytest.approx(0.7 * w8["latency"])
    assert budget.flash_bytes == 3 * 1024
    assert budget.ram_bytes == 1500
    assert parse_budget("ram=0.5x", problem).ram_bytes == pytest.approx(0.5 * w8["ram"])
    assert parse_budget("size=1x", problem).size_bytes == pytest.approx(w8["size"])
    for text, message in (
        ("speed=2", "unknown budget 'speed'"),
        ("size=2KB,size=1KB", "given twice"),
        ("size=", "needs a value"),
        ("flash=3furlongs", "unknown unit"),
        ("latency=3ms", "measured latency table"),
        ("size=-1KB", "must be positive"),
        ("bops=3MB", "plain number"),
        ("", "empty budget"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_budget(text, problem)
    measured = AllocationProblem(
        problem.candidates,
        problem.damage,
        problem.size_bytes,
        latency=problem.latency,
        latency_measured=True,
    )
    assert parse_budget("latency=3ms", measured).latency == 3.0
    assert parse_budget("latency=500us", measured).latency == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="memory plan"):
        parse_budget("ram=64KB", measured)
    with pytest.raises(ConfigError, match="no flash table"):
        parse_budget("flash=64KB", measured)


def test_infeasible_budgets_name_the_smallest_feasible_value_of_each_binding_resource():
    problem = _problem(np.random.default_rng(6), pairs=0)
    low = {i: LayerFormat(2, 4) for i in problem.candidates}
    floor = totals(problem, low)
    # one resource below its floor: named with its floor
    with pytest.raises(ConfigError) as info:
        solve(problem, Budget(size_bytes=floor["size"] * 0.9, latency=floor["latency"] * 10))
    text = str(info.value)
    assert f"size budget {floor['size'] * 0.9:,.0f} B is infeasible" in text
    assert f"smallest achievable size with the allowed formats is {floor['size']:,.0f} B" in text
    assert "latency budget" not in text
    # RAM below the smallest peak, with the smallest peak named
    with pytest.raises(ConfigError, match=rf"smallest achievable ram .* {floor['ram']:,.0f} B"):
        solve(problem, Budget(ram_bytes=floor["ram"] - 1))
    # two budgets each feasible alone but not together (latency that favours wide weights, as
    # when narrow codes must be unpacked): both named, each with its minimum within the other
    slow_narrow = {
        i: {f: problem.size_bytes[i][LayerFormat(8, 8)] * (10 - f.weight_bits) for f in FORMATS}
        for i in problem.candidates
    }
    traded = AllocationProblem(
        problem.candidates,
        problem.damage,
        problem.size_bytes,
        latency=slow_narrow,
        latency_measured=True,
    )
    fastest = totals(traded, {i: LayerFormat(8, 8) for i in problem.candidates})["latency"]
    budget = Budget(size_bytes=floor["size"] * 1.05, latency=fastest * 1.05)
    joint = smallest_feasible(traded, "latency", budget)
    assert joint is not None and joint > fastest * 1.05
    with pytest.raises(ConfigError) as info:
        solve(traded, budget)
    text = str(info.value)
    assert "size budget" in text and "latency budget" in text
    assert f"within the other budgets it is {joint:.4g} ms" in text
    # and that minimum is exact: reachable, and nothing below it is
    assert brute_force(traded, Budget(size_bytes=budget.size_bytes, latency=joint)).latency == (
        pytest.approx(joint)
    )
    with pytest.raises(ConfigError):
        brute_force(traded, Budget(size_bytes=budget.size_bytes, latency=joint * 0.999))


def test_marginal_linearisation_collapses_equal_rows_and_stays_exact():
    from dyadiq.passes.allocation.ilp import _Formulation

    rng = np.random.default_rng(7)
    weight_only = _problem(rng, pairs=3, weight_only_pairs=True, ram=False)
    general = _problem(rng, pairs=3, weight_only_pairs=False, ram=False)
    x = len(FORMATS) * 4
    # weight-only pair costs: 5 x 5 products per pair, not 10 x 10
    assert len(_Formulation(weight_only, with_pairs=True).cost) - x == 3 * 25
    assert len(_Formulation(general, with_pairs=True).cost) - x == 3 * 100
    for problem in (weight_only, general):
        exact = _check_against_brute_force_no_ram(problem, Budget(size_bytes=3000.0))
        mccormick = solve(problem, Budget(size_bytes=3000.0), linearisation="mccormick")
        assert mccormick.predicted_damage == pytest.approx(exact.predicted_damage, rel=1e-7)


# --- from a graph ------------------------------------------------------------------------------


def _branch_model(rng):
    """x -> conv1 -> relu -> r; r feeds conv2 and conv3 (one activation); conv2 + conv3 -> y."""
    from tests.builders import with_weights

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c1)
        c2 = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
        c3 = Conv (r, w3, b3)
        y = Add (c2, c3)
    }
    """
    return with_weights(
        text,
        w1=rng.normal(size=(4, 3, 3, 3)),
        b1=rng.normal(size=4),
        w2=rng.normal(size=(4, 4, 3, 3)) * 0.3,
        b2=rng.normal(size=4),
        w3=rng.normal(size=(4, 4, 1, 1)),
        b3=rng.normal(size=4),
    )


def _report(graph, rng, *, activations=False):
    from dyadiq.passes.sensitivity.analysis import SensitivityConfig, analyze
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind

    batches = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    config = SensitivityConfig(
        weight_bits=(4, 8), trace=False, pairs=False, entropy=False, activations=activations
    )
    return analyze(graph, batches, OutputKind.LOGITS, config)


def test_activation_ties_and_damage_from_a_graph():
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import activation_ties, problem_from_report
    from dyadiq.passes.sensitivity.analysis import layer_damage

    rng = np.random.default_rng(11)
    graph = load_onnx(_branch_model(rng))
    layers = [n.name for n in graph.weighted_layers()]
    conv1, conv2, conv3 = layers
    act = activation_ties(graph, layers, 8)
    assert act.ties == ((conv2, conv3),)  # both read r
    assert act.shared_with_others == frozenset()
    report = _report(graph, rng)
    formats = [LayerFormat(w, a) for w in (4, 8) for a in (4, 8)]
    # no activation damage in the report: activations stay at --abits
    fixed = problem_from_report(graph, report, formats, act_bits=8)
    assert {f.act_bits for fs in fixed.candidates.values() for f in fs} == {8}
    # with activation damage: weight damage + activation damage, r's damage counted once
    act_damage = {conv1: {4: 0.5, 8: 0.01}, conv2: {4: 0.3, 8: 0.02}, conv3: {4: 0.3, 8: 0.02}}
    problem = problem_from_report(graph, report, formats, act_bits=8, activation_damage=act_damage)
    assert problem.act_ties == ((conv2, conv3),)
    w4a4 = LayerFormat(4, 4)
    weight_part = layer_damage(report.layers[conv2], 4, "empirical")
    assert problem.damage[conv2][w4a4] == pytest.approx(weight_part + 0.3)
    assert problem.damage[conv3][w4a4] == pytest.approx(
        layer_damage(report.layers[conv3], 4, "empirical")
    )
    assert problem.bops[conv1][w4a4] * 4 == problem.bops[conv1][LayerFormat(8, 8)]
    # a budget that forces A4 somewhere moves conv2 and conv3 together
    allocation = solve(problem, parse_budget("bops=0.4x", problem))
    assert allocation.formats[conv2].act_bits == allocation.formats[conv3].act_bits
    assert allocation.bops <= 0.4 * totals(problem, {i: LayerFormat(8, 8) for i in layers})["bops"]
    # the report's own activation damage (per site, carried by the layer that reads it)
    measured = _report(graph, rng, activations=True)
    site = measured.layers[conv2].activation_damage
    assert set(site) == {4, 8} and site[4] > site[8] >= 0
    problem = problem_from_report(graph, measured, formats, act_bits=8)
    assert {f.act_bits for f in problem.candidates[conv2]} == {4, 8}
    assert problem.damage[conv2][w4a4] == pytest.approx(
        layer_damage(measured.layers[conv2], 4, "empirical") + site[4]
    )
    assert problem.damage[conv3][w4a4] == pytest.approx(
        layer_damage(measured.layers[conv3], 4, "empirical")  # r counted once, at conv2
    )


def test_a_layer_whose_input_an_op_outside_the_plan_reads_keeps_the_default_width():
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import activation_ties, problem_from_report
    from tests.builders import conv_relu_pool_fc

    rng = np.random.default_rng(12)
    graph = load_onnx(conv_relu_pool_fc(rng))
    conv, gemm = (n.name for n in graph.weighted_layers())
    # the Gemm reads Flatten(MaxPool(relu)): one scale group that MaxPool (not in the plan)
    # reads too, and find_activation_sites gives a group its widest consumer's width
    assert activation_ties(graph, [conv, gemm], 8).shared_with_others == {gemm}
    report = _report(graph, rng)
    formats = [LayerFormat(w, a) for w in (4, 8) for a in (4, 8)]
    act_damage = {conv: {4: 0.1, 8: 0.0}, gemm: {4: 0.1, 8: 0.0}}
    problem = problem_from_report(graph, report, formats, activation_damage=act_damage)
    assert {f.act_bits for f in problem.candidates[gemm]} == {8}
    assert {f.act_bits for f in problem.candidates[conv]} == {4, 8}
    with pytest.raises(ConfigError, match="also read by ops outside the plan"):
        problem_from_report(
            graph,
            report,
            formats,
            candidates={gemm: [LayerFormat(8, 4)]},
            activation_damage=act_damage,
        )


def test_flash_estimate_latency_model_and_ram_from_graph_shapes():
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import FLASH_ESTIMATE, INT8_CONTAINER_RAM, problem_from_report

    rng = np.random.default_rng(13)
    graph = load_onnx(_branch_model(rng))
    conv1, conv2, conv3 = (n.name for n in graph.weighted_layers())
    report = _report(graph, rng)
    formats = [LayerFormat(w, 8) for w in (4, 8)]
    live = [["x", "r"], ["r", "c2"], ["r", "c2", "c3"]]
    problem = problem_from_report(graph, report, formats, ram_live_sets=live)
    w4 = LayerFormat(4, 8)
    assert problem.flash[conv2][w4] == 4 * 4 * 9 * 4 / 8 + 4 * 9  # packed + 9 B per channel
    assert problem.flash_source == FLASH_ESTIMATE
    assert problem.latency[conv3][LayerFormat(8, 8)] == 4 * 4 * 8 * 8  # MACs at W8A8
    assert problem.ram is not None and problem.ram.source == INT8_CONTAINER_RAM
    everything = {i: LayerFormat(8, 8) for i in problem.candidates}
    assert problem.ram.peak(everything) == 3 * 256  # r, c2, c3: 1 x 4 x 8 x 8 codes each
    with pytest.raises(ConfigError, match=r"smallest achievable ram .* 768 B"):
        solve(problem, Budget(ram_bytes=700))
    table = {conv1: {w4: 1.0}}
    with pytest.raises(ConfigError, match="latency table has no entry"):
        problem_from_report(graph, report, formats, latency=table)
    # a backend's tables as they come: label-keyed latency (LatencyTable.layers), frozenset
    # live sets and plain byte counts (ArenaPlan)
    labelled = {i: {"W4A8": 2.0, "W8A8": 1.0} for i in (conv1, conv2, conv3)}
    measured = problem_from_report(
        graph,
        report,
        formats,
        latency=labelled,
        ram_live_sets=[frozenset({"r", "c2"}), frozenset({"y"})],
        tensor_bytes={"r": 100, "c2": 50, "y": 120},
    )
    assert measured.latency_measured and measured.latency[conv2][w4] == 2.0
    assert measured.ram is not None and measured.ram.peak(everything) == 150
    assert parse_budget("latency=2.5ms", measured).latency == 2.5


def test_measured_tables_load_from_json(tmp_path):
    from dyadiq.passes.allocation import load_latency_table, load_memory_plan

    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"layers": {"conv": {"W4A8": 0.5, "w8a8": 0.75}}}))
    assert load_latency_table(path) == {"conv": {LayerFormat(4, 8): 0.5, LayerFormat(8, 8): 0.75}}
    path.write_text(json.dumps({"conv": {"W9A8": 1.0}}))
    with pytest.raises(ConfigError, match="weight bits"):
        load_latency_table(path)
    path.write_text(json.dumps({"conv": {"fast": 1.0}}))
    with pytest.raises(ConfigError, match="format label"):
        load_latency_table(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read latency table"):
        load_latency_table(path)
    plan = tmp_path / "memory.json"
    plan.write_text(
        json.dumps(
            {
                "live_sets": [["a", "b"], ["b"]],
                "tensor_bytes": {"a": 100, "b": {"4": 50, "8": 100}},
                "flash": {"conv": {"W8A8": 1000}},
            }
        )
    )
    loaded = load_memory_plan(plan)
    assert loaded.live_sets == (("a", "b"), ("b",))
    assert loaded.tensor_bytes == {"a": {8: 100.0}, "b": {4: 50.0, 8: 100.0}}
    assert loaded.flash == {"conv": {LayerFormat(8, 8): 1000.0}}
    plan.write_text(json.dumps({"tensor_bytes": {}}))
    with pytest.raises(ConfigError, match="live_sets"):
        load_memory_plan(plan)
    with pytest.raises(ConfigError, match="without sizes"):
        RamModel(live_sets=(("a", "zzz"),), bytes_by_width={"a": {8: 1.0}})


def test_cli_budgets_activation_candidates_and_measured_tables(tmp_path, monkeypatch, capsys):
    """quantize --budget with latency / flash / RAM and --abits-candidates: the plan respects
    every budget, tied layers share A, the integer model of the mixed plan is bit-exact, and
    report.json carries the per-layer table."""
    import onnx

    from dyadiq.cli import main
    from dyadiq.frontends.onnx_frontend import load_onnx

    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(14)
    model = _branch_model(rng)
    conv1, conv2, conv3 = (n.name for n in load_onnx(model).weighted_layers())
    (tmp_path / "m").mkdir()
    onnx.save(model, str(tmp_path / "m" / "m.onnx"))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(3):
        np.savez(calib / f"{i}.npz", x=rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    latency = tmp_path / "latency.json"
    # every format the ILP may pick by default (weights 2-8 bits, activations 4 and 8)
    formats = [f"W{w}A{a}" for w in range(2, 9) for a in (4, 8)]
    layers = (conv1, conv2, conv3)
    table = {layer: {f: 0.6 if f.endswith("A4") else 1.0 for f in formats} for layer in layers}
    latency.write_text(json.dumps(table))
    memory = tmp_path / "memory.json"
    codes = 4 * 8 * 8
    memory.write_text(
        json.dumps(
            {
                "live_sets": [["x", "r"], ["r", "c2"], ["r", "c2", "c3"], ["y"]],
                "tensor_bytes": {
                    "x": 192,
                    "r": {"4": codes / 2, "8": codes},  # packed A4 codes halve r
                    "c2": codes,
                    "c3": codes,
                    "y": codes,
                },
            }
        )
    )
    base = ["quantize", str(tmp_path / "m" / "m.onnx"), "--calib", str(calib), "--integer"]
    tables = ["--latency-table", str(latency), "--memory-plan", str(memory)]
    budget = "bops=0.4x,latency=2.5ms,ram=640B,flash=0.6x"
    args = [*base, "-o", str(tmp_path / "ok"), "--abits-candidates", "4,8", *tables]
    assert main([*args, "--budget", budget]) == 0
    out = tmp_path / "ok"
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())["layers"]
    allocation = report["allocation"]
    assert allocation["latency"] <= 2.5 and allocation["peak_ram_bytes"] <= 640
    assert allocation["latency_source"] == "measured table"
    assert allocation["activation_ties"] == [[conv2, conv3]]
    assert plan[conv2]["act_bits"] == plan[conv3]["act_bits"] == 4  # r must shrink for RAM
    assert allocation["peak_ram_bytes"] == 640
    assert set(allocation["layers"]) == {conv1, conv2, conv3}
    for layer, row in allocation["layers"].items():
        assert row["format"] == plan[layer]["format"]
        assert row["latency"] == table[layer][row["format"]]
        assert {"damage", "size_bytes", "flash_bytes", "bops"} <= set(row)
    exact = report["integer"]["bit_exact_vs_reference"]
    assert exact["exact_tensors"] == exact["tensors"] > 0
    # an impossible RAM budget names the smallest peak: r at A4 + c2 + c3 = 128 + 2 x 256
    capsys.readouterr()
    args = [*base, "-o", str(tmp_path / "bad"), "--abits-candidates", "4,8", *tables]
    assert main([*args, "--budget", "ram=600B"]) == 2
    error = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "smallest achievable ram with the allowed formats is 640 B" in error
