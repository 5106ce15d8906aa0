"""Bit allocation: is the ILP fast, and do its plans beat a hand heuristic and random plans?

1. Solver speed. Synthetic problems: 200 layers x 10 formats (W2/3/4/6/8 x A4/8), random
   damages that fall with both widths, sizes from random parameter counts, a size budget at 5
   average weight bits, 20 tie groups of 2-3 layers; then with 50 random pair terms, with 20
   activation-tie groups (one A, free W), with 200 pair terms, and with every budget at once
   (size, BOPs, latency cost model, flash, peak RAM over a chain schedule). ``solve`` wall
   time, median of 3; instances with pairs also with the earlier McCormick linearisation.
   ``--solver-only`` runs just this part and updates the solver section of the results.
2. Per zoo model (fashion_cnn, ppocr_cls, mobilenet_v2, minilm):
   - heuristic: uniform W4 with the first and last weighted layer at W8 (activations 8 bits);
     its weight size S = sum(params x bits / 8);
   - ILP, per proxy (``--proxies``: empirical, trace, snr, entropy, each alone and +pairs; the
     reverse-mode ones with ``--gradients``) at the budgets S and 0.9 S:
     ``solve(problem_from_report(..., proxy), Budget(size_bytes=budget))``, sensitivity from
     ``analyze_cached`` (weight bits 2/3/4/6/8, trace, entropy, pair terms; 256 samples for
     fashion_cnn, 8 for the others: the settings of ``proxy_quality``, so the two benchmarks
     share one cached analysis);
   - random: plans with per-layer widths drawn uniformly from {2, 3, 4, 6, 8} (shared-weight
     layers alike), kept only when their size is in [0.97 S, S] (rejection sampling, seed 0).
   Every plan becomes a real QDQ model on the same calibration samples (256 for fashion_cnn,
   16 otherwise) and is measured on the held-out split: accuracy (fashion_cnn on 2000 images,
   ppocr_cls on 400), top-1 agreement with float (mobilenet_v2, 248 crops).

Models are built the way ``quantize_graph`` builds them, but the activation statistics are
collected once per model and reused: with 8-bit activations everywhere the activation sites
and ranges do not depend on the weight widths (checked per plan; a plan whose sites differ
falls back to ``quantize_graph``).

Results: ``results/allocation.json`` and ``allocation.md``, written atomically after the
solver part and after every model.

    .venv/bin/python -m benchmarks.allocation
    .venv/bin/python -m benchmarks.allocation --models fashion_cnn --skip-solver
    .venv/bin/python -m benchmarks.allocation --quick --output-dir /tmp/alloc   # smoke test
    .venv/bin/python -m benchmarks.allocation --solver-only   # solver part, into the results
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
ALL_MODELS = ("fashion_cnn", "ppocr_cls", "mobilenet_v2", "minilm")
BITS = (2, 3, 4, 6, 8)
SEED = 0
PROXY = "empirical+pairs"  # the proxy of the solver timing section (pair terms)
PROXIES = (
    "empirical",
    "empirical+pairs",
    "empirical+pairs[raw]",  # the measured cross terms unfiltered: what the safe model avoids
    "trace",
    "trace+pairs",
    "snr",
    "snr+pairs",
    "entropy",
    "entropy+pairs",
)
GRADIENT_PROXIES = ("eigenvalue", "eigenvalue+pairs", "fisher", "fisher+pairs")
BUDGET_SCALES = (1.0, 0.9)  # ILP budgets as fractions of the heuristic's size S
WINDOW = 0.97  # random plans: size in [WINDOW * S, S]
OUTPUT_KIND = {
    "fashion_cnn": "LOGITS",
    "mobilenet_v2": "LOGITS",
    "ppocr_cls": "PROBABILITIES",
    "minilm": "EMBEDDING",
}
ANALYSIS_SAMPLES = {"fashion_cnn": 256, "ppocr_cls": 8, "mobilenet_v2": 8, "minilm": 8}
CALIBRATION_SAMPLES = {"fashion_cnn": 256, "ppocr_cls": 16, "mobilenet_v2": 16, "minilm": 16}
# minilm: 128 of its 256 held-out sentences (each QDQ MiniLM takes ~15-30 s per 64 on 2 shared
# cores, and a model section measures ~30 plans)
EVAL_SAMPLES = {"fashion_cnn": 2000, "ppocr_cls": 400, "mobilenet_v2": 248, "minilm": 128}
QUICK_ANALYSIS_SAMPLES = {"fashion_cnn": 64, "ppocr_cls": 4, "mobilenet_v2": 4, "minilm": 2}
QUICK_CALIBRATION_SAMPLES = {"fashion_cnn": 64, "ppocr_cls": 8, "mobilenet_v2": 8, "minilm": 4}
QUICK_EVAL_SAMPLES = {"fashion_cnn": 500, "ppocr_cls": 64, "mobilenet_v2": 32, "minilm": 16}
EVAL_CHUNK = 8  # models per evaluate() call (onnxruntime sessions held at once)
SOLVER_LIMIT_S = 2.0

log = logging.getLogger("benchmarks.allocation")


# --- 1. solver speed ---------------------------------------------------------------------------


def synthetic_problem(
    n_layers: int = 200,
    n_ties: int = 20,
    n_pairs: int = 0,
    seed: int = SEED,
    *,
    n_act_ties: int = 0,
    resources: bool = False,
) -> Any:
    """A random allocation problem shaped like a real one (see the module docstring)."""
    from dyadiq.passes.allocation import AllocationProblem, PairCost, RamModel
    from dyadiq.plan import LayerFormat

    rng = np.random.default_rng(seed)
    formats = [LayerFormat(w, a) for w in BITS for a in (4, 8)]
    layers = [f"layer{i:03d}" for i in range(n_layers)]
    params = np.round(10 ** rng.uniform(2.5, 6.0, n_layers))
    w_sens = 10 ** rng.uniform(-3.0, 1.0, n_layers)
    a_sens = 10 ** rng.uniform(-3.0, 0.0, n_layers)
    candidates = {i: list(formats) for i in layers}
    damage: dict[str, dict[Any, float]] = {}
    size: dict[str, dict[Any, float]] = {}
    for k, i in enumerate(layers):
        noise = rng.uniform(0.8, 1.25, len(formats))
        damage[i] = {
            f: float(w_sens[k] * 4.0 ** (2 - f.weight_bits) + a_sens[k] * 4.0 ** (2 - f.act_bits))
            * float(noise[j])
            for j, f in enumerate(formats)
        }
        # keep damage monotone in each width despite the noise
        for f in formats:
            for g in formats:
                if g.weight_bits >= f.weight_bits and g.act_bits >= f.act_bits:
                    damage[i][g] = min(damage[i][g], damage[i][f])
        size[i] = {f: float(params[k] * f.weight_bits / 8) for f in formats}
    order = rng.permutation(n_layers)
    ties: list[list[str]] = []
    pos = 0
    for _ in range(n_ties):
        k = int(rng.integers(2, 4))
        ties.append([layers[j] for j in order[pos : pos + k]])
        pos += k
    pairs = []
    for _ in range(n_pairs):
        a, b = rng.choice(n_layers, 2, replace=False)
        # |cross term| ~ 20% of the geometric mean of the two single-layer damages at W3
        delta = float(rng.normal(0.0, 0.2) * np.sqrt(w_sens[a] * w_sens[b]) / 4)
        pairs.append(
            PairCost(
                layers[a],
                layers[b],
                {
                    (fa, fb): delta * 2.0 ** (3 - fa.weight_bits) * 2.0 ** (3 - fb.weight_bits)
                    for fa in formats
                    for fb in formats
                },
            )
        )
    # activation ties: layers reading one activation (e.g. branches of an inception block)
    act_order = rng.permutation(n_layers)
    act_ties = [
        [layers[j] for j in act_order[3 * g : 3 * g + int(rng.integers(2, 4))]]
        for g in range(n_act_ties)
    ]
    if not resources:
        return AllocationProblem(
            candidates, damage, size, pairs=pairs, ties=ties, act_ties=act_ties
        )
    # resources: MACs ~ 50 x params; latency MACs x w x a / 64 with +-20% noise; flash packed
    # weights + 9 B per channel (~sqrt(params) channels); RAM: a chain schedule, tensor k read
    # by layer k, live with its successor, A4 codes packed two per byte
    macs = params * rng.uniform(10, 100, n_layers)
    channels = np.ceil(np.sqrt(params))
    elements = np.round(10 ** rng.uniform(3.0, 5.5, n_layers + 1))
    bops = {
        i: {f: float(macs[k] * f.weight_bits * f.act_bits) for f in formats}
        for k, i in enumerate(layers)
    }
    latency = {
        i: {
            f: float(macs[k] * f.weight_bits * f.act_bits / 64) * rng.uniform(0.8, 1.2)
            for f in formats
        }
        for k, i in enumerate(layers)
    }
    flash = {
        i: {f: float(np.ceil(params[k] * f.weight_bits / 8) + 9 * channels[k]) for f in formats}
        for k, i in enumerate(layers)
    }
    tensors = [f"t{k:03d}" for k in range(n_layers + 1)]
    ram = RamModel(
        live_sets=tuple((tensors[k], tensors[k + 1]) for k in range(n_layers)),
        bytes_by_width={
            t: {4: float(np.ceil(elements[k] / 2)), 8: float(elements[k])}
            for k, t in enumerate(tensors)
        },
        reader={tensors[k]: layers[k] for k in range(n_layers)},
    )
    return AllocationProblem(
        candidates,
        damage,
        size,
        bops,
        pairs,
        ties,
        act_ties,
        latency=latency,
        flash=flash,
        ram=ram,
        latency_measured=False,
    )


def time_solver(
    problem: Any,
    budget_text: str = "avg-wbits=5",
    *,
    linearisation: str = "marginal",
    repeats: int = 3,
    time_limit: float = 60.0,
) -> dict[str, Any]:
    from dyadiq.passes.allocation import parse_budget, solve, totals

    budget = parse_budget(budget_text, problem)
    times = []
    allocation = None
    cpu = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        allocation = solve(problem, budget, time_limit=time_limit, linearisation=linearisation)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if times[-1] > 5 * SOLVER_LIMIT_S:
            break  # far over the target already: do not spend minutes repeating it
    assert allocation is not None
    tie_ok = all(len({allocation.formats[i] for i in g}) == 1 for g in problem.ties)
    tie_ok &= all(len({allocation.formats[i].act_bits for i in g}) == 1 for g in problem.act_ties)
    values = totals(problem, allocation.formats)
    within = all(values[r] <= limit * (1 + 1e-9) for r, limit in budget.limits().items())
    params = 0.0
    for table in problem.size_bytes.values():
        fmt, nbytes = next(iter(table.items()))
        params += nbytes * 8 / fmt.weight_bits
    return {
        "layers": len(problem.candidates),
        "formats_per_layer": len(next(iter(problem.candidates.values()))),
        "tie_groups": len(problem.ties),
        "act_tie_groups": len(problem.act_ties),
        "pair_terms": len(problem.pairs),
        "budget": budget_text,
        "linearisation": linearisation,
        "budget_bytes": budget.size_bytes,
        "solve_s": times,
        "median_s": statistics.median(times),
        "cpu_s": cpu,  # process CPU time: less sensitive to other jobs on the machine
        "hit_time_limit": max(times) >= time_limit * 0.99,
        "proven_optimal": allocation.optimal,
        "under_limit": statistics.median(times) < SOLVER_LIMIT_S,
        "size_bytes": allocation.size_bytes,
        "avg_weight_bits": allocation.size_bytes * 8 / params,
        "within_budget": within,
        "ties_honoured": tie_ok,
        "predicted_damage": allocation.predicted_damage,
        "format_counts": _counts(f.label for f in allocation.formats.values()),
    }


def _counts(labels: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items()))


ALL_BUDGETS = "avg-wbits=5,bops=0.5x,latency=0.6x,flash=0.7x,ram=0.75x"


def solver_instances(quick: bool) -> dict[str, dict[str, Any]]:
    """name -> synthetic_problem keyword arguments and budget (the quick mode scales down)."""
    n, ties, pairs, act = (40, 5, 10, 5) if quick else (200, 20, 50, 20)
    base = {"n_layers": n, "n_ties": ties}
    return {
        "no_pairs": {**base, "budget": "avg-wbits=5"},
        "pairs": {**base, "n_pairs": pairs, "budget": "avg-wbits=5"},
        "pairs_act_ties": {**base, "n_pairs": pairs, "n_act_ties": act, "budget": "avg-wbits=5"},
        "pairs_x4_act_ties": {
            **base,
            "n_pairs": 4 * pairs,
            "n_act_ties": act,
            "budget": "avg-wbits=5",
        },
        "all_budgets": {
            **base,
            "n_pairs": pairs,
            "n_act_ties": act,
            "resources": True,
            "budget": ALL_BUDGETS,
        },
    }


def solver_benchmark(quick: bool, compare: bool = True) -> dict[str, Any]:
    """Every instance with the marginal linearisation; with ``compare``, the instances that
    have pair terms with the earlier McCormick linearisation too."""
    out = {}
    for key, spec in solver_instances(quick).items():
        spec = dict(spec)
        budget = spec.pop("budget")
        problem = synthetic_problem(**spec)
        variants = ["marginal"] + (["mccormick"] if compare and problem.pairs else [])
        for linearisation in variants:
            name = key if linearisation == "marginal" else f"{key}/mccormick"
            out[name] = time_solver(problem, budget, linearisation=linearisation)
            log.info(
                "solver %s: %d layers, %d pairs, median %.3fs",
                name,
                spec["n_layers"],
                len(problem.pairs),
                out[name]["median_s"],
            )
    return out


def sensitivity_config(hutchinson_max_iters: int | None = None) -> Any:
    """benchmarks.proxy_quality's analysis settings (one cached analysis for both; give both
    the same ``--hutchinson-max-iters``)."""
    import dataclasses

    from dyadiq.passes.sensitivity.analysis import SensitivityConfig

    config = SensitivityConfig(weight_bits=BITS, pairs=True, seed=SEED, activations=False)
    if hutchinson_max_iters is not None:
        config = dataclasses.replace(config, hutchinson_max_iters=hutchinson_max_iters)
    return config


def real_problem_timing(name: str, quick: bool) -> dict[str, Any]:
    """The ILP of a zoo model as the model part poses it (proxy with pair terms, budget S of
    the heuristic), timed with both pair linearisations; sensitivity from the cache."""
    from dyadiq import zoo
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import Budget, problem_from_report, solve
    from dyadiq.passes.sensitivity.analysis import analyze_cached
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from dyadiq.pipeline import prepare_graph
    from dyadiq.plan import LayerFormat

    artifacts = zoo.get(name)
    graph = prepare_graph(load_onnx(artifacts.model_path))
    layers = [n.name for n in graph.weighted_layers()]
    analysis_n = (QUICK_ANALYSIS_SAMPLES if quick else ANALYSIS_SAMPLES)[name]
    t = time.perf_counter()
    report, cached = analyze_cached(
        graph,
        list(artifacts.calibration_batches(analysis_n)),
        OutputKind[OUTPUT_KIND[name]],
        sensitivity_config(),
    )
    analysis_s = time.perf_counter() - t
    heuristic = {i: 4 for i in layers}
    heuristic[layers[0]] = heuristic[layers[-1]] = 8
    budget = Budget(size_bytes=sum(report.layers[i].params * b / 8 for i, b in heuristic.items()))
    problem = problem_from_report(graph, report, [LayerFormat(b, 8) for b in BITS], PROXY)
    out: dict[str, Any] = {
        "layers": len(layers),
        "pair_terms": len(problem.pairs),
        "analysis_s": analysis_s,
        "analysis_cached": cached,
        "budget_bytes": budget.size_bytes,
    }
    for linearisation in ("marginal", "mccormick"):
        t, c = time.perf_counter(), time.process_time()
        allocation = solve(problem, budget, linearisation=linearisation)
        out[linearisation] = {
            "solve_s": time.perf_counter() - t,
            "cpu_s": time.process_time() - c,
            "proven_optimal": allocation.optimal,
            "predicted_damage": allocation.predicted_damage,
            "size_bytes": allocation.size_bytes,
        }
        log.info("%s ILP (%s): %.3fs", name, linearisation, out[linearisation]["solve_s"])
    return out


# --- 2. plans on real models -------------------------------------------------------------------


def sample_random_plans(
    layers: list[str],
    params: dict[str, int],
    ties: list[list[str]],
    budget: float,
    n: int,
    seed: int = SEED,
) -> tuple[list[dict[str, int]], dict[str, Any]]:
    """``n`` plans, widths uniform over BITS per layer (tied layers alike), size in window."""
    rng = np.random.default_rng(seed)
    tied = {i for g in ties for i in g}
    groups = [list(g) for g in ties] + [[i] for i in layers if i not in tied]
    group_params = np.array([sum(params[i] for i in g) for g in groups], np.float64)
    bits = np.array(BITS)
    accepted: list[np.ndarray] = []
    drawn = 0
    while len(accepted) < n and drawn < 2_000_000:
        choice = bits[rng.integers(0, len(bits), size=(20_000, len(groups)))]
        drawn += choice.shape[0]
        size = choice @ group_params / 8
        ok = (size <= budget) & (size >= WINDOW * budget)
        accepted.extend(choice[ok][: n - len(accepted)])
    plans = [{i: int(row[k]) for k, g in enumerate(groups) for i in g} for row in accepted]
    info = {
        "drawn": drawn,
        "accepted": len(plans),
        "distinct": len({tuple(sorted(p.items())) for p in plans}),
    }
    return plans, info


def _plan_row(
    bits: dict[str, int], params: dict[str, int], report: Any, proxies: list[str]
) -> dict[str, Any]:
    from dyadiq.passes.sensitivity.analysis import MissingProxyError, predict_damage
    from dyadiq.passes.sensitivity.pairs import PairModel

    size = sum(params[i] * b / 8 for i, b in bits.items())
    predicted: dict[str, float | None] = {}
    for proxy in proxies:
        name, _, variant = proxy.partition("[")
        model = PairModel(variant.rstrip("]")) if variant else PairModel.NONNEGATIVE
        try:
            predicted[proxy] = predict_damage(report, bits, name, pair_model=model)
        except MissingProxyError:
            predicted[proxy] = None
    return {
        "bits": bits,
        "size_bytes": size,
        "avg_weight_bits": size * 8 / sum(params.values()),
        "predicted_damage": predicted,
    }


def _analysis(
    name: str, graph: Any, batches: list[Any], kind: Any, args: argparse.Namespace
) -> tuple[Any, float, bool]:
    """The cached analysis (proxy_quality's settings), plus the reverse-mode proxies when
    asked; (report, seconds, from cache)."""
    import dataclasses

    from dyadiq.passes.sensitivity.analysis import analyze_cached
    from dyadiq.passes.sensitivity.executor import make_executor

    t = time.perf_counter()
    with make_executor(workers=args.workers) as executor:
        report, cached = analyze_cached(
            graph, batches, kind, sensitivity_config(args.hutchinson_max_iters), executor=executor
        )
        if args.gradients:
            from benchmarks.proxy_quality import gradient_config, with_gradient_proxies

            grad_config = gradient_config(name, args.quick, len(batches))
            grad, grad_cached = analyze_cached(graph, batches, kind, grad_config, executor=executor)
            report = with_gradient_proxies(report, grad)
            cached = cached and grad_cached
            report = dataclasses.replace(report, notes=report.notes + grad.notes)
    return report, time.perf_counter() - t, cached


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from dyadiq import zoo
    from dyadiq.evaluation import evaluate
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.allocation import Budget, problem_from_report, shared_weight_ties, solve
    from dyadiq.passes.sensitivity.analysis import MissingProxyError
    from dyadiq.passes.sensitivity.pairs import PairModel
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from dyadiq.pipeline import PlanBuilder, prepare_graph
    from dyadiq.plan import LayerFormat, PrecisionPlan

    t_model = time.perf_counter()
    artifacts = zoo.get(name)
    kind = OutputKind[OUTPUT_KIND[name]]
    analysis_n = (QUICK_ANALYSIS_SAMPLES if args.quick else ANALYSIS_SAMPLES)[name]
    calib_n = (QUICK_CALIBRATION_SAMPLES if args.quick else CALIBRATION_SAMPLES)[name]
    eval_n = args.eval_limit or (QUICK_EVAL_SAMPLES if args.quick else EVAL_SAMPLES)[name]
    metric = artifacts.model.primary_metric
    proxies = list(args.proxies) + (list(GRADIENT_PROXIES) if args.gradients else [])

    raw = load_onnx(artifacts.model_path)
    graph = prepare_graph(raw)
    layers = [n.name for n in graph.weighted_layers()]
    batches = list(artifacts.calibration_batches(analysis_n))
    report, analysis_s, cached = _analysis(name, graph, batches, kind, args)
    if list(report.layers) != layers:
        raise RuntimeError("the sensitivity report does not cover the graph's weighted layers")
    log.info("%s: analysis %.1fs (cached: %s)", name, analysis_s, cached)
    params = {i: report.layers[i].params for i in layers}

    heuristic = {i: 4 for i in layers}
    heuristic[layers[0]] = heuristic[layers[-1]] = 8
    budget = sum(params[i] * b / 8 for i, b in heuristic.items())

    formats = [LayerFormat(b, 8) for b in BITS]
    plans: dict[str, dict[str, int]] = {"heuristic": heuristic}
    solves: dict[str, dict[str, Any]] = {}
    for proxy in proxies:
        base, _, variant = proxy.partition("[")  # empirical+pairs[raw]: the raw cross terms
        model = PairModel(variant.rstrip("]")) if variant else PairModel.NONNEGATIVE
        try:
            problem = problem_from_report(graph, report, formats, base, pair_model=model)
        except MissingProxyError as exc:
            solves[proxy] = {"error": str(exc)}
            continue
        for scale in BUDGET_SCALES:
            t = time.perf_counter()
            allocation = solve(problem, Budget(size_bytes=scale * budget))
            key = f"ilp:{proxy}@{scale:g}"
            solves[key] = {
                "solve_s": time.perf_counter() - t,
                "proven_optimal": allocation.optimal,
                "predicted_damage": allocation.predicted_damage,
                "pair_costs": len(problem.pairs),
            }
            plans[key] = {i: allocation.formats[i].weight_bits for i in layers}
    ties = shared_weight_ties(graph, layers)
    randoms, sampling = sample_random_plans(layers, params, ties, budget, args.random_plans)
    log.info("%s: %d ILP plans solved; %s", name, len(plans) - 1, sampling)
    plans.update({f"random_{k:02d}": p for k, p in enumerate(randoms)})
    rows = {key: _plan_row(bits, params, report, proxies) for key, bits in plans.items()}

    # build and measure each distinct plan once
    t = time.perf_counter()
    builder = PlanBuilder(raw, list(artifacts.calibration_batches(calib_n)))
    distinct: dict[tuple[tuple[str, int], ...], str] = {}
    for key, bits in plans.items():
        distinct.setdefault(tuple(sorted(bits.items())), key)
    build_s = eval_s = 0.0
    measured: dict[str, dict[str, float]] = {}
    reference: dict[str, float] = {}
    todo = list(distinct.values())
    with tempfile.TemporaryDirectory(prefix=f"alloc_{name}_") as tmp:
        for start in range(0, len(todo), EVAL_CHUNK):
            paths: dict[str, Path] = {}
            t = time.perf_counter()
            for key in todo[start : start + EVAL_CHUNK]:
                path = Path(tmp) / f"{key.replace(':', '_').replace('@', '_')}.onnx"
                onnx.save(builder.build(PrecisionPlan.from_weight_bits(plans[key])), str(path))
                paths[key] = path
            build_s += time.perf_counter() - t
            t = time.perf_counter()
            metrics = evaluate(artifacts, paths, limit=eval_n)
            eval_s += time.perf_counter() - t
            reference = metrics["float"]
            for key in paths:
                measured[key] = {k: v for k, v in metrics[key].items() if k != "samples"}
                paths[key].unlink()
            log.info("%s: %d/%d plans measured", name, len(measured), len(todo))
    for key, bits in plans.items():
        rows[key]["metrics"] = measured[distinct[tuple(sorted(bits.items()))]]
        rows[key]["metric"] = rows[key]["metrics"][metric]

    random_metric = [rows[k]["metric"] for k in rows if k.startswith("random_")]
    h = rows["heuristic"]["metric"]
    med = float(np.median(random_metric)) if random_metric else None
    best = float(np.max(random_metric)) if random_metric else None
    ilp = {
        proxy: {
            f"{scale:g}": rows[f"ilp:{proxy}@{scale:g}"]["metric"]
            for scale in BUDGET_SCALES
            if f"ilp:{proxy}@{scale:g}" in rows
        }
        for proxy in proxies
    }
    pairs_vs_alone = {
        proxy: {
            scale: _compare(ilp[f"{proxy}+pairs"].get(scale), value)
            for scale, value in ilp[proxy].items()
        }
        for proxy in proxies
        if "+" not in proxy and "[" not in proxy and f"{proxy}+pairs" in ilp
    }
    summary = {
        "metric": metric,
        "float": reference.get(metric),
        "heuristic": h,
        "ilp": ilp,
        "pairs_vs_alone": pairs_vs_alone,
        "random_median": med,
        "random_best": best,
        "random_worst": float(np.min(random_metric)) if random_metric else None,
        "random_n": len(random_metric),
        "budget_bytes": budget,
        "random_size_range": [
            min(rows[k]["size_bytes"] for k in rows if k.startswith("random_")),
            max(rows[k]["size_bytes"] for k in rows if k.startswith("random_")),
        ]
        if random_metric
        else None,
    }
    return {
        "output_kind": kind.value,
        "layers": len(layers),
        "params": sum(params.values()),
        "caps": {
            "analysis_samples": analysis_n,
            "calibration_samples": calib_n,
            "evaluation_samples": eval_n,
            "evaluated_samples": reference.get("samples"),
        },
        "sensitivity_config": sensitivity_config(args.hutchinson_max_iters).to_json(),
        "command": args.command,
        "date": args.date,
        "analysis": {
            "wall_s": analysis_s,
            "cached": cached,
            "forward_passes": report.forward_passes,
            "pairs": len({(p.a, p.b) for p in report.pairs}),
            "pair_width_terms": len(report.pairs),
            "notes": list(report.notes),
        },
        "solves": solves,
        "random_sampling": sampling,
        "ties": ties,
        "calibration_s": builder.calibration_s,
        "build_s": build_s,
        "build_fallbacks": builder.fallbacks,
        "evaluate_s": eval_s,
        "distinct_plans_measured": len(todo),
        "float_metrics": {k: v for k, v in reference.items() if k != "samples"},
        "summary": summary,
        "plans": rows,
        "wall_s": time.perf_counter() - t_model,
    }


def _compare(with_pairs: float | None, alone: float | None) -> str | None:
    if with_pairs is None or alone is None:
        return None
    return "better" if with_pairs > alone else "worse" if with_pairs < alone else "equal"


# --- machine info, output ----------------------------------------------------------------------


def _f(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _yes(x: bool | None) -> str:
    return "n/a" if x is None else ("yes" if x else "no")


def render_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# Bit allocation: ILP vs hand heuristic vs random plans",
        "",
        f"- command: `{data['command']}`",
        f"- date: {data['date']}; total wall time {_f(data.get('total_wall_s'), '.0f')} s",
        f"- machine: {m['cpu_model']}, {m['nproc']} CPUs; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_avg_start'])}"
        + (
            f", at end {', '.join(f'{x:.2f}' for x in data['load_avg_end'])}"
            if data.get("load_avg_end")
            else ""
        ),
        "",
    ]
    if data.get("notes"):
        lines += [f"- {n}" for n in data["notes"]] + [""]
    solver = data.get("solver")
    if solver:
        lines += [
            "## Solver speed (synthetic problems, 10 formats W2/3/4/6/8 x A4/8 per layer)",
            "",
            f"- command: `{data.get('solver_command', data['command'])}`; date "
            f"{data.get('solver_date', data['date'])}; load average at start "
            + ", ".join(f"{x:.2f}" for x in data.get("solver_load_avg", m["load_avg_start"])),
            f"- `all_budgets` budget: `{ALL_BUDGETS}` (latency: the MACs x w x a cost model "
            "with noise; RAM: a chain schedule, one live set per layer, A4 codes packed)",
            "- pair products: `marginal` = sum_g y[f, g] = x_a[f], sum_f y[f, g] = x_b[g] over "
            "classes of equal cost rows (the default); `mccormick` = the first formulation, "
            "three inequalities per nonzero product",
            "",
            "| instance | layers x formats | tie groups | A-tie groups | pair terms | budget | "
            f"solve s (runs) | median s | < {SOLVER_LIMIT_S:.0f} s | CPU s (median) | "
            "proven optimal | within budget, ties | avg W bits | predicted damage |",
            "|---|---|---:|---:|---:|---|---|---:|---|---:|---|---|---:|---:|",
        ]
        for key, r in solver.items():
            lines.append(
                f"| {key} | {r['layers']} x {r['formats_per_layer']} | {r['tie_groups']} | "
                f"{r.get('act_tie_groups', 0)} | {r['pair_terms']} | "
                f"{r.get('budget', 'avg-wbits=5').replace(',', ', ')} | "
                f"{', '.join(f'{t:.3f}' for t in r['solve_s'])} | "
                f"{r['median_s']:.3f} | {_yes(r['under_limit'])} | "
                f"{_f(statistics.median(r['cpu_s']) if r.get('cpu_s') else None, '.3f')} | "
                f"{_yes(r.get('proven_optimal'))} | "
                f"{_yes(r['within_budget'] and r['ties_honoured'])} | "
                f"{r['avg_weight_bits']:.2f} | {_f(r.get('predicted_damage'), '.5g')} |"
            )
        lines.append("")
    real = data.get("solver_real")
    if real:
        lines += [
            "### The zoo models' ILPs (proxy with pair terms, budget S as below)",
            "",
            "Same command and load. Wall and CPU seconds of one solve each; a McCormick solve "
            "that reaches solve()'s 60 s limit returns its incumbent (not proven optimal).",
            "",
            "| model | layers x formats | pair terms | marginal s (CPU) | optimal | "
            "McCormick s (CPU) | optimal | damage marginal | damage McCormick |",
            "|---|---|---:|---:|---|---:|---|---:|---:|",
        ]
        for name, r in real.items():
            a, b = r["marginal"], r["mccormick"]
            lines.append(
                f"| {name} | {r['layers']} x {len(BITS)} | {r['pair_terms']} | "
                f"{a['solve_s']:.3f} ({a['cpu_s']:.3f}) | {_yes(a['proven_optimal'])} | "
                f"{b['solve_s']:.3f} ({b['cpu_s']:.3f}) | {_yes(b['proven_optimal'])} | "
                f"{a['predicted_damage']:.5g} | {b['predicted_damage']:.5g} |"
            )
        lines.append("")
    lines += [
        "## Real models",
        "",
        "Heuristic: W4 everywhere, first and last weighted layer W8, activations 8 bits; its "
        "weight size S is the budget. ILP: each proxy at `Budget(size_bytes=S)` and "
        f"`0.9 S`. Random: widths uniform over {{{', '.join(map(str, BITS))}}} per layer, size "
        f"in [{WINDOW} S, S], seed {SEED}. Metric on the held-out split (higher is better). "
        "+pairs: the safe pair model (noise zeroed, floored, non-negative; "
        "`passes/sensitivity/pairs.py`).",
        "",
    ]
    models = {n: r for n, r in data["models"].items() if "error" not in r}
    for name, res in data["models"].items():
        if name not in models:
            lines.append(f"- {name}: error: {res['error']}")
    if models:
        header = " | ".join(f"{n} S | {n} 0.9 S" for n in models)
        lines += [
            f"| plan | {header} |",
            "|---|" + "---:|" * (2 * len(models)),
        ]

        def cells(get: Any) -> str:
            out = []
            for res in models.values():
                for scale in ("1", "0.9"):
                    out.append(_f(get(res, scale)))
            return " | ".join(out)

        lines.append(
            "| float | " + cells(lambda r, sc: r["summary"]["float"] if sc == "1" else None) + " |"
        )
        lines.append(
            "| heuristic | "
            + cells(lambda r, sc: r["summary"]["heuristic"] if sc == "1" else None)
            + " |"
        )
        lines.append(
            "| random median / best | "
            + " | ".join(
                f"{_f(r['summary']['random_median'])} / {_f(r['summary']['random_best'])} | n/a"
                for r in models.values()
            )
            + " |"
        )
        proxies = list(dict.fromkeys(p for r in models.values() for p in r["summary"]["ilp"]))
        for proxy in proxies:
            lines.append(
                f"| ILP {proxy} | "
                + cells(lambda r, sc, p=proxy: r["summary"]["ilp"].get(p, {}).get(sc))
                + " |"
            )
        lines += ["", "+pairs vs the same proxy alone (measured metric, S / 0.9 S):", ""]
        for name, res in models.items():
            verdicts = res["summary"].get("pairs_vs_alone") or {}
            lines.append(
                f"- {name}: "
                + ", ".join(f"{p} {v.get('1')} / {v.get('0.9')}" for p, v in verdicts.items())
            )
    lines += ["", "## Details", ""]
    for name, res in models.items():
        c, s, a = res["caps"], res["summary"], res["analysis"]
        lines += [
            f"### {name}",
            "",
            f"- run: `{res.get('command', data['command'])}` at {res.get('date', data['date'])}",
            f"- {res['layers']} weighted layers, {res['params']:,} weights; caps: analysis "
            f"{c['analysis_samples']}, calibration {c['calibration_samples']}, evaluation "
            f"{c['evaluation_samples']} samples ({_f(c['evaluated_samples'], '.0f')} evaluated)",
            f"- analysis {a['wall_s']:.1f} s (cached: {a['cached']}), {a['forward_passes']} "
            f"forward passes, {a['pairs']} layer pairs x width pairs = "
            f"{a.get('pair_width_terms', 'n/a')} pair terms",
            f"- S = {s['budget_bytes']:,.0f} bytes "
            f"({res['plans']['heuristic']['avg_weight_bits']:.2f} average weight bits)",
            f"- random plans: {res['random_sampling']['accepted']} accepted of "
            f"{res['random_sampling']['drawn']:,} drawn, "
            f"{res['random_sampling']['distinct']} distinct; sizes "
            + (
                f"{s['random_size_range'][0]:,.0f}..{s['random_size_range'][1]:,.0f} bytes"
                if s["random_size_range"]
                else "n/a"
            )
            + f"; random worst {_f(s['random_worst'])}",
            *[
                f"- {key}: widths {_counts(f'W{b}' for b in row['bits'].values())}, "
                f"avg {row['avg_weight_bits']:.2f} bits, metric {_f(row['metric'])}, "
                f"predicted damage {_f(res['solves'][key]['predicted_damage'], '.4g')}, "
                f"{res['solves'][key]['pair_costs']} pair costs in the ILP, solve "
                f"{res['solves'][key]['solve_s']:.2f} s"
                for key, row in res["plans"].items()
                if key.startswith("ilp:")
            ],
            *[f"- {key}: {v['error']}" for key, v in res["solves"].items() if "error" in v],
            f"- calibration statistics {res['calibration_s']:.1f} s, build {res['build_s']:.1f} s "
            f"({res['build_fallbacks']} fallbacks), evaluate {res['evaluate_s']:.1f} s "
            f"({res['distinct_plans_measured']} distinct models), model total "
            f"{res['wall_s']:.1f} s",
            "",
        ]
    return "\n".join(lines)


def write_results(data: dict[str, Any], output_dir: Path) -> None:
    common.write_results(data, output_dir, "allocation", render_markdown)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.allocation", description=__doc__)
    p.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None)
    p.add_argument("--random-plans", type=int, default=None, help="per model (20; quick 3)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: small solver instance, fashion_cnn only, 3 random plans, small caps",
    )
    p.add_argument(
        "--solver-only",
        action="store_true",
        help="only the solver part; replaces the solver section of an existing results file",
    )
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--eval-limit", type=int, default=None, help="override evaluation samples")
    p.add_argument("--proxies", nargs="+", default=list(PROXIES), help="ILP proxies compared")
    p.add_argument(
        "--gradients",
        action="store_true",
        help="also eigenvalue and fisher (+pairs): TVM reverse mode, proxy_quality's settings",
    )
    p.add_argument(
        "--skip-solver",
        action="store_true",
        help="keep the solver sections of the existing results file, run only the models",
    )
    p.add_argument("--workers", type=int, default=None, help="analysis on a local Ray")
    p.add_argument(
        "--hutchinson-max-iters",
        type=int,
        default=None,
        help="default: SensitivityConfig's; give proxy_quality's to share its cached analysis",
    )
    args = p.parse_args(argv)
    if args.models is None:
        args.models = ["fashion_cnn"] if args.quick else list(ALL_MODELS)
    if args.random_plans is None:
        args.random_plans = 3 if args.quick else 20
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    argv_used = sys.argv[1:] if argv is None else argv
    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.allocation " + " ".join(argv_used),
        "machine": common.machine_info(),
        "settings": {
            "models": args.models,
            "random_plans": args.random_plans,
            "quick": args.quick,
            "seed": SEED,
            "weight_bits": list(BITS),
            "act_bits": 8,
            "proxies": list(args.proxies),
            "gradients": args.gradients,
            "budget_scales": list(BUDGET_SCALES),
            "random_window": [WINDOW, 1.0],
        },
        "notes": [],
        "models": {},
    }
    if args.solver_only:
        return _solver_only(args, data["command"])
    args.command, args.date = data["command"], data["date"]
    if args.skip_solver:
        _merge_existing(args.output_dir, data, args.models)
    else:
        t = time.perf_counter()
        data["solver"] = solver_benchmark(args.quick, compare=not args.quick)
        data["solver_wall_s"] = time.perf_counter() - t
    data["total_wall_s"] = time.perf_counter() - start
    write_results(data, args.output_dir)
    for name in [m for m in ALL_MODELS if m in args.models]:
        try:
            data["models"][name] = benchmark_model(name, args)
        except Exception as exc:  # one model failing must not lose the others
            log.exception("%s failed", name)
            data["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        data["total_wall_s"] = time.perf_counter() - start
        data["load_avg_end"] = list(os.getloadavg())
        write_results(data, args.output_dir)
    return data


SOLVER_ONLY_NOTE = (
    "solver sections re-measured by --solver-only (their command, date and load are in the "
    "section) with the marginal pair linearisation; the Real models section below, its ILP "
    "solve times included, is from the earlier full run, which used the McCormick formulation"
)


SOLVER_KEYS = (
    "solver",
    "solver_real",
    "solver_wall_s",
    "solver_command",
    "solver_date",
    "solver_machine",
    "solver_load_avg",
)


def _merge_existing(output_dir: Path, data: dict[str, Any], models: list[str]) -> None:
    """--skip-solver: the solver sections (and their note) and the other models' entries of
    the existing results file (each model entry names the command and date of its run)."""
    import json

    path = output_dir / "allocation.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for name, res in old.get("models", {}).items():
        # entries of this version's format (per-proxy ILP results) only
        if name not in models and isinstance(res.get("summary", {}).get("ilp"), dict):
            data["models"][name] = res
    data.update({k: old[k] for k in SOLVER_KEYS if k in old})
    if "solver" in old and "solver_command" not in old:
        data["solver_command"], data["solver_date"] = old["command"], old["date"]
        data["solver_load_avg"] = old["machine"]["load_avg_start"]
    if "solver" in data:
        data["notes"].append(
            "solver sections: from the earlier run named in each section (its command, date "
            "and load); the Real models section: each model from the run named in its details"
        )


def _solver_only(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the solver part and put it into the existing results (the model part is slow)."""
    import json

    path = args.output_dir / "allocation.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if not data:
        data = {"date": None, "command": command, "machine": common.machine_info(), "models": {}}
    data["solver_load_avg"] = list(os.getloadavg())
    t = time.perf_counter()
    data["solver"] = solver_benchmark(args.quick, compare=not args.quick)
    data["solver_real"] = {
        name: real_problem_timing(name, args.quick) for name in ALL_MODELS if name in args.models
    }
    data["solver_wall_s"] = time.perf_counter() - t
    data["solver_command"] = command
    data["solver_date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    data["solver_machine"] = common.machine_info()
    data.pop("solver_under_load", None)  # measured with the earlier formulation
    data["notes"] = [n for n in data.get("notes", []) if not n.startswith("solver ")]
    data["notes"].append(SOLVER_ONLY_NOTE)
    write_results(data, args.output_dir)
    return data


if __name__ == "__main__":
    main()
