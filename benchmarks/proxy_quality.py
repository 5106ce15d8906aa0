"""How well do the sensitivity proxies rank real mixed-precision damage? (EMQ-style check)

For each zoo model:

1. ``analyze`` runs once on a small calibration subset (weight bits 2/3/4/6/8, trace, empirical
   damage, pair terms, feature entropy); its wall time and forward passes are recorded. A
   second ``analyze`` with ``gradients=True`` only (reverse mode through TVM: top Gauss-Newton
   eigenvalue, Fisher diagonal, Taylor with the float argmax as labels) runs on the first
   ``GRADIENT_SAMPLES`` of them and is timed separately (compile time included), so the
   trace analysis' own cost stays visible. The reverse passes run in a TVM module scheduled
   with the backend's default schedules (``vjp.py``). Both analyses go through the on-disk
   analysis cache (``--no-cache`` to bypass): a cached report's time is the recorded time of
   the run that computed it.
2. ``--configs`` random mixed-precision weight configurations are drawn with a fixed seed: per
   configuration a probability ``p`` of "low bits" is drawn uniformly from [0, 1), then each
   layer gets a low width (2/3/4) with probability ``p`` and a high one (6/8) otherwise;
   activations are 8 bits. Configurations with every layer at 2 bits are redrawn.
   ``CONFIG_SPACE`` overrides this per model: MobileNetV2 draws ``p`` from [0, 0.5) and low
   widths from 3/4, because in the full space nearly every configuration destroys the model
   (top-1 agreement ~0, see the comment at ``CONFIG_SPACE``) and the ranking is then noise.
3. Each configuration becomes a real QDQ model through the pipeline's own passes
   (``prepare_graph`` -> ``find_activation_sites`` -> ``insert_qdq`` -> ``export_qdq``). The
   activation statistics are collected once per model, on the same calibration samples, and
   reused for every configuration: the activation sites and ranges depend only on the
   activation bits, which are 8 everywhere (checked per configuration; a configuration whose
   sites differ falls back to ``quantize_graph``). The graph is prepared at the int4 opset for
   all configurations, so every model is built the same way. Each model is evaluated on the
   held-out split (``evaluate_configs``: :func:`dyadiq.evaluation.evaluate`'s metrics, plus
   for classifiers the mean KL divergence from the float model's output distribution, the
   label-free loss the proxies predict) and its damage is the drop of the model's primary
   metric against float. MobileNetV2 (no labels) uses 1 - top-1 agreement with float over
   all 248 held-out crops; its 1 - logit cosine and KL are reported alongside, since top-1
   agreement saturates for damaged models while the KL keeps growing.
4. For every proxy in ``PROXIES`` the predicted damage of each configuration is compared with
   the measured damage: Kendall tau and Spearman rho (scipy.stats).

Results: ``results/proxy_quality.json`` and ``proxy_quality.md``, written atomically after every
model so that partial results survive. A run replaces only its own models' entries in an
existing results file (``--no-merge`` starts afresh); each entry names the run (command, date,
machine, load) it came from. ``--reuse-measured MODEL`` keeps that model's configurations and
measured damage and recomputes every prediction from fresh analyses (the configurations are
redrawn with the same seed and checked to be identical); with ``--no-gradients`` too, the
eigenvalue / Fisher / Taylor predictions of the earlier run are kept (and their ``+pairs``
variants are n/a).

Every proxy is scored alone and ``+pairs`` (``damage_model.py``: the measured cross terms as a
relative interaction, safe model: noise zeroed, floored, non-negative). For the empirical and
trace proxies the pair terms are also scored as measured (``[raw]``: no noise filter, no
clamp, the formulation the "Augmenting Hessians" paper uses) and floored but signed
(``[floor]``), and each model's pair terms are counted by sign and significance, which is what
decides whether pairs can help.

    .venv/bin/python -m benchmarks.proxy_quality                       # all four models
    .venv/bin/python -m benchmarks.proxy_quality --models fashion_cnn --configs 60
    .venv/bin/python -m benchmarks.proxy_quality --quick --output-dir /tmp/pq   # smoke test
    .venv/bin/python -m benchmarks.proxy_quality --models minilm --reuse-measured minilm
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
ALL_MODELS = ("fashion_cnn", "ppocr_cls", "minilm", "mobilenet_v2")
BITS = (2, 3, 4, 6, 8)
LOW_BITS = (2, 3, 4)
HIGH_BITS = (6, 8)
SEED = 0
OUTPUT_KIND = {
    "fashion_cnn": "LOGITS",
    "mobilenet_v2": "LOGITS",
    "ppocr_cls": "PROBABILITIES",
    "minilm": "EMBEDDING",
}
# metric, and how damage is derived from it: "drop" = float - config, "one_minus" = 1 - config
DAMAGE_METRIC = {
    "fashion_cnn": ("accuracy", "drop"),
    "ppocr_cls": ("accuracy", "drop"),
    "mobilenet_v2": ("top1_agreement", "one_minus"),
    "minilm": ("mean_cosine", "one_minus"),
}
# Secondary, smoother metric recorded too (correlations reported for it as well).
SECONDARY_METRIC = {
    "fashion_cnn": "logit_cosine",
    "ppocr_cls": "logit_cosine",
    "mobilenet_v2": "logit_cosine",
    "minilm": "min_cosine",
}
ANALYSIS_SAMPLES = {"fashion_cnn": 256, "ppocr_cls": 8, "mobilenet_v2": 8, "minilm": 8}
CALIBRATION_SAMPLES = {"fashion_cnn": 16, "ppocr_cls": 16, "mobilenet_v2": 16, "minilm": 16}
# mobilenet_v2: all 248 held-out crops (128 before: coarser agreement steps)
EVAL_SAMPLES = {"fashion_cnn": 2000, "ppocr_cls": 200, "mobilenet_v2": 248, "minilm": 64}
QUICK_EVAL_SAMPLES = {"fashion_cnn": 500, "ppocr_cls": 64, "mobilenet_v2": 32, "minilm": 16}
QUICK_ANALYSIS_SAMPLES = {"fashion_cnn": 64, "ppocr_cls": 4, "mobilenet_v2": 4, "minilm": 4}
# reverse passes cost 0.4-0.5 s per sample on the large models even scheduled (idle machine;
# several times that under the shared load), so the gradient proxies use fewer samples and
# power-iteration steps there; mobilenet_v2's were sized to fit the session's last minutes
GRADIENT_SAMPLES = {"fashion_cnn": 64, "ppocr_cls": 8, "mobilenet_v2": 1, "minilm": 8}
EIGEN_MAX_ITERS = {"fashion_cnn": 20, "ppocr_cls": 20, "mobilenet_v2": 8, "minilm": 10}
QUICK_GRADIENT_SAMPLES = 16
# Per model: (upper bound of p(low), low widths, high widths). MobileNetV2 gets a milder space:
# with p(low) ~ U(0, 1) over 2/3/4 bits nearly every configuration destroys it (a pilot of 5
# configurations on the 248 held-out crops: top-1 agreement 0.000-0.008, KL 9-14 nats; the
# previous run's 30 configurations took 6 distinct damage values), so rank correlation only
# measured noise among wrecked models. p(low) ~ U(0, 0.5) over 3/4 bits spans agreement
# 0.74 -> 0.02 (pilot: 0.742, 0.637, 0.544, 0.028, 0.020).
CONFIG_SPACE: dict[str, tuple[float, tuple[int, ...], tuple[int, ...]]] = {
    "mobilenet_v2": (0.5, (3, 4), HIGH_BITS),
}
DEFAULT_CONFIG_SPACE = (1.0, LOW_BITS, HIGH_BITS)
EVAL_CHUNK = {"minilm": 5}  # configurations per evaluate() call (sessions held at once)
DEFAULT_EVAL_CHUNK = 10

log = logging.getLogger("benchmarks.proxy_quality")


# --- configurations ----------------------------------------------------------------------------


def sample_configs(
    layer_ids: list[str],
    n: int,
    seed: int = SEED,
    space: tuple[float, tuple[int, ...], tuple[int, ...]] = DEFAULT_CONFIG_SPACE,
) -> list[dict[str, Any]]:
    """``n`` random weight-width assignments spanning mild to severe (see module docstring);
    ``space`` = (upper bound of p(low), low widths, high widths)."""
    p_max, low_bits, high_bits = space
    rng = np.random.default_rng(seed)
    configs: list[dict[str, Any]] = []
    while len(configs) < n:
        p_low = float(rng.uniform(0.0, p_max))
        low = rng.uniform(size=len(layer_ids)) < p_low
        widths = [
            int(rng.choice(low_bits)) if is_low else int(rng.choice(high_bits)) for is_low in low
        ]
        if all(w == 2 for w in widths):
            continue
        configs.append({"p_low": p_low, "bits": dict(zip(layer_ids, widths, strict=True))})
    return configs


# --- correlations ------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def correlations(predicted: list[float | None], measured: list[float]) -> dict[str, float | None]:
    from scipy.stats import kendalltau, spearmanr

    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if p.size < 3 or np.all(p == p[0]) or np.all(m == m[0]) or not np.all(np.isfinite(p)):
        return {"kendall_tau": None, "kendall_p": None, "spearman_rho": None, "spearman_p": None}
    tau = kendalltau(p, m)
    rho = spearmanr(p, m)
    return {
        "kendall_tau": _finite_or_none(tau.statistic),
        "kendall_p": _finite_or_none(tau.pvalue),
        "spearman_rho": _finite_or_none(rho.statistic),
        "spearman_p": _finite_or_none(rho.pvalue),
    }


# --- per model ---------------------------------------------------------------------------------


def gradient_config(name: str, quick: bool, analysis_n: int) -> Any:
    """The gradient-only analysis settings (eigenvalue, Fisher, Taylor) for ``name``."""
    from dyadiq.passes.sensitivity.analysis import SensitivityConfig

    return SensitivityConfig(
        weight_bits=BITS,
        seed=SEED,
        trace=False,
        empirical=False,
        pairs=False,
        entropy=False,
        activations=False,
        gradients=True,
        gradient_samples=min(
            QUICK_GRADIENT_SAMPLES if quick else GRADIENT_SAMPLES[name], analysis_n
        ),
        eigen_max_iters=EIGEN_MAX_ITERS[name],
    )


def _damage(name: str, metrics: dict[str, float], reference: dict[str, float]) -> float:
    metric, how = DAMAGE_METRIC[name]
    if how == "drop":
        return float(reference[metric] - metrics[metric])
    return float(1.0 - metrics[metric])


def _log_probabilities(outputs: np.ndarray, kind: Any) -> np.ndarray:
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind

    rows = outputs.reshape(-1, outputs.shape[-1]).astype(np.float64)
    if kind is OutputKind.PROBABILITIES:
        return np.log(np.clip(rows, 1e-12, None))
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, outputs: np.ndarray, kind: Any) -> float:
    """Mean over samples of KL(float || config) in nats, the label-free loss the proxies model."""
    ref, out = _log_probabilities(reference, kind), _log_probabilities(outputs, kind)
    return float(np.mean(np.sum(np.exp(ref) * (ref - out), axis=-1)))


def evaluate_configs(
    artifacts: Any, kind: Any, paths: dict[str, Path], limit: int
) -> dict[str, dict[str, float]]:
    """:func:`dyadiq.evaluation.evaluate`'s metrics, plus ``kl`` (:func:`mean_kl`) for
    classifiers: the same loop over the held-out split, keeping the outputs for the KL."""
    from dyadiq.evaluation import _run, _session, classification_metrics, evaluate
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind

    if kind is OutputKind.EMBEDDING:
        return evaluate(artifacts, paths, limit=limit)
    sessions = {"float": _session(Path(artifacts.model_path))}
    sessions.update({k: _session(p) for k, p in paths.items()})
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    labels: list[np.ndarray] = []
    for feeds, lab in artifacts.evaluation_batches(limit):
        for key, sess in sessions.items():
            outputs[key].append(_run(sess, feeds, key))
        if lab is not None:
            labels.append(np.asarray(lab).reshape(-1))
    stacked = {k: np.concatenate(v, axis=0) for k, v in outputs.items()}
    reference = stacked["float"]
    all_labels = np.concatenate(labels) if labels else None
    results: dict[str, dict[str, float]] = {}
    for key, out in stacked.items():
        metrics = classification_metrics(reference, out, all_labels)
        metrics["kl"] = mean_kl(reference, out, kind)
        metrics["samples"] = float(out.shape[0])
        results[key] = metrics
    return results


def _timed_analysis(
    graph: Any, batches: list[Any], kind: Any, config: Any, use_cache: bool, workers: int | None
) -> tuple[Any, float, bool]:
    """(report, seconds, from cache). A cached report's seconds are those of the run that
    computed it (recorded in the report), not the instant read. ``workers`` > 1: on a local
    Ray (same report)."""
    from dyadiq.passes.sensitivity.analysis import analyze, analyze_cached
    from dyadiq.passes.sensitivity.executor import make_executor

    t = time.perf_counter()
    with make_executor(workers=workers) as executor:
        if use_cache:
            report, cached = analyze_cached(graph, batches, kind, config, executor=executor)
        else:
            report = analyze(graph, batches, kind, config, executor=executor)
            cached = False
    return report, (report.seconds if cached else time.perf_counter() - t), cached


PAIR_VARIANTS = ("empirical+pairs", "trace+pairs")


def proxy_columns() -> list[str]:
    """Every proxy alone and +pairs (safe model), then the raw and floored pair variants."""
    from dyadiq.passes.sensitivity.analysis import PROXIES

    return [
        *(p.value for p in PROXIES),
        *(f"{p}[{v}]" for p in PAIR_VARIANTS for v in ("raw", "floor")),
    ]


def with_gradient_proxies(report: Any, grad_report: Any) -> Any:
    """``report`` with the gradient analysis' per-layer eigenvalue / Fisher / Taylor damage,
    so that their +pairs variants use the main report's pair terms."""
    if report is None or grad_report is None:
        return report if report is not None else grad_report
    fields = ("top_eigenvalue", "eigen_damage", "fisher_damage", "taylor_damage")
    layers = {
        k: dataclasses.replace(v, **{f: getattr(grad_report.layers[k], f) for f in fields})
        for k, v in report.layers.items()
    }
    return dataclasses.replace(report, layers=layers)


def pair_statistics(report: Any) -> dict[str, Any]:
    """The measured pair terms by sign and significance (|delta| > z stderr), and how large
    they are next to the pair's single-layer damage: what decides whether pairs can help."""
    z = float(report.settings.get("pair_noise_z", 2.0))
    terms = list(report.pairs)
    if not terms:
        return {"terms": 0}
    significant = [t for t in terms if abs(t.delta) > z * t.stderr]
    negative = [t for t in significant if t.delta < 0]
    below_floor = [t for t in negative if t.delta < -min(t.single_a, t.single_b)]
    ratios = [
        t.delta / (t.single_a + t.single_b) for t in significant if t.single_a + t.single_b > 0
    ]
    return {
        "terms": len(terms),
        "noise_z": z,
        "within_noise": len(terms) - len(significant),
        "significant_positive": len(significant) - len(negative),
        "significant_negative": len(negative),
        "below_floor": len(below_floor),
        "relative_median": float(np.median(ratios)) if ratios else None,
        "relative_p10": float(np.percentile(ratios, 10)) if ratios else None,
        "relative_p90": float(np.percentile(ratios, 90)) if ratios else None,
    }


def benchmark_model(
    name: str,
    args: argparse.Namespace,
    deadline: float,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One model's result. ``previous`` (this model's entry in an earlier results file, given
    with ``--reuse-measured``): its configurations, measured damage and non-gradient proxy
    predictions are kept, and only the gradient analysis is run again."""

    from dyadiq import zoo
    from dyadiq.passes.calibration.observers import RangeMethod
    from dyadiq.passes.sensitivity.analysis import (
        MissingProxyError,
        SensitivityConfig,
        predict_damage,
    )
    from dyadiq.passes.sensitivity.pairs import PairModel
    from dyadiq.passes.sensitivity.perturbable_model import OutputKind
    from dyadiq.passes.sensitivity.proxy import Proxy
    from dyadiq.pipeline import CalibrationConfig

    t_model = time.perf_counter()
    artifacts = zoo.get(name)
    kind = OutputKind[OUTPUT_KIND[name]]
    analysis_n = (QUICK_ANALYSIS_SAMPLES if args.quick else ANALYSIS_SAMPLES)[name]
    calib_n = CALIBRATION_SAMPLES[name]
    eval_n = args.eval_limit or (QUICK_EVAL_SAMPLES if args.quick else EVAL_SAMPLES)[name]
    cal_cfg = (
        CalibrationConfig(method=RangeMethod.MINMAX) if name == "minilm" else CalibrationConfig()
    )
    sens_cfg = SensitivityConfig(weight_bits=BITS, pairs=True, seed=SEED, activations=False)
    if args.hutchinson_max_iters is not None:
        sens_cfg = dataclasses.replace(sens_cfg, hutchinson_max_iters=args.hutchinson_max_iters)
    grad_cfg = gradient_config(name, args.quick, analysis_n)
    space = CONFIG_SPACE.get(name, DEFAULT_CONFIG_SPACE)
    use_cache = not args.no_cache
    if previous is not None:
        # the configurations and their measured damage are kept; every prediction is new
        result = {k: v for k, v in previous.items() if k not in ("run", "notes")}
        result["gradient_config"] = grad_cfg.to_json()
        result["sensitivity_config"] = sens_cfg.to_json()
    else:
        result = {
            "output_kind": kind.value,
            "damage_metric": {
                "metric": DAMAGE_METRIC[name][0],
                "damage": "float - config"
                if DAMAGE_METRIC[name][1] == "drop"
                else "1 - config (vs float)",
            },
            "config_space": {"p_low_max": space[0], "low_bits": space[1], "high_bits": space[2]},
            "caps": {
                "analysis_samples": analysis_n,
                "calibration_samples": calib_n,
                "evaluation_samples": eval_n,
            },
            "calibration": {"method": cal_cfg.method.value, "percentile": cal_cfg.percentile},
            "sensitivity_config": sens_cfg.to_json(),
            "gradient_config": grad_cfg.to_json(),
        }

    # 1. analysis, once (the on-disk cache makes a rerun with the same settings instant)
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.pipeline import prepare_graph

    raw = load_onnx(artifacts.model_path)
    graph = prepare_graph(raw)
    analysis_batches = list(artifacts.calibration_batches(analysis_n))
    # the analysis runs (cached) with --reuse-measured too: every prediction is recomputed
    log.info("%s: analysing %d samples", name, analysis_n)
    report, seconds, cached = _timed_analysis(
        graph, analysis_batches, kind, sens_cfg, use_cache, args.workers
    )
    result["analysis"] = {
        "wall_s": seconds,
        "from_cache": cached,
        "report_seconds": report.seconds,
        "forward_passes": report.forward_passes,
        "layers": len(report.layers),
        "pairs": len({(p.a, p.b) for p in report.pairs}),
        "pair_width_terms": len(report.pairs),
        "workers": args.workers or 1,
    }
    result["pair_terms"] = pair_statistics(report)
    log.info("%s: analysis %.1fs, %d forward passes", name, seconds, report.forward_passes)
    grad_report = None
    if args.no_gradients:
        result["gradient_analysis"] = {
            "wall_s": 0.0,
            "samples": 0,
            "reverse_passes": 0,
            "forward_passes": 0,
            "eigen_iterations": {},
            "notes": ["not run (--no-gradients); rerun with --reuse-measured to add them"],
        }
    else:
        grad_report, seconds, cached = _timed_analysis(
            graph, analysis_batches, kind, grad_cfg, use_cache, None
        )
        result["gradient_analysis"] = {
            "wall_s": seconds,
            "from_cache": cached,
            "samples": grad_cfg.gradient_samples,
            "reverse_passes": grad_report.reverse_passes,
            "forward_passes": grad_report.forward_passes,
            "eigen_iterations": {
                k: v.top_eigenvalue.samples
                for k, v in grad_report.layers.items()
                if v.top_eigenvalue is not None
            },
            "notes": list(grad_report.notes),
        }
        log.info("%s: gradient proxies %.1fs", name, seconds)
    from_gradients = {"eigenvalue", "fisher", "taylor"}
    combined = with_gradient_proxies(report, grad_report)
    proxies = proxy_columns()

    def predict(column: str, bits: dict[str, int]) -> float | None:
        """None where the analysis has no data for the proxy (no gradients were computed, or
        a proxy such as taylor that needs labels on an embedding model): not a ranking of 0s."""
        proxy, _, variant = column.partition("[")
        if Proxy.parse(proxy).base.value in from_gradients and grad_report is None:
            return None
        model = PairModel(variant.rstrip("]")) if variant else PairModel.NONNEGATIVE
        try:
            return predict_damage(combined, bits, proxy, pair_model=model)
        except MissingProxyError:
            return None

    # 2. configurations
    assert combined is not None  # the main analysis always runs
    layer_ids = list(combined.layers)
    configs = sample_configs(layer_ids, args.configs, space=space)
    if previous is not None:
        kept = [c["bits"] for c in previous["configurations"]]
        if [c["bits"] for c in configs[: len(kept)]] != kept:
            raise RuntimeError(f"{name}: the configurations differ from the previous results'")
        n = len(kept)
        predicted = {p: [predict(p, c["bits"]) for c in configs[:n]] for p in proxies}
        if grad_report is None:  # --no-gradients: the earlier run's gradient predictions
            for p in from_gradients:
                if p in previous["predicted_damage"]:
                    predicted[p] = list(previous["predicted_damage"][p])
        measured = list(previous["measured_damage"])
        secondary = list(previous["measured_secondary"])
        extra = {k: list(v["measured"]) for k, v in previous.get("extra_metrics", {}).items()}
        result["predicted_damage"] = predicted
    else:
        predicted = {p: [predict(p, c["bits"]) for c in configs] for p in proxies}
        measured, secondary, extra = _measure(
            name, args, artifacts, kind, raw, cal_cfg, calib_n, eval_n, configs, deadline, result
        )
        n = len(measured)
        predicted = {p: v[:n] for p, v in predicted.items()}
        result.update(
            {
                "configs": n,
                "configs_requested": len(configs),
                "measured_damage": measured,
                "measured_secondary": secondary,
                "predicted_damage": predicted,
                "configurations": [
                    {"p_low": c["p_low"], "bits": c["bits"], "metrics": c.get("metrics")}
                    for c in configs[:n]
                ],
                "mean_bits": [float(np.mean(list(c["bits"].values()))) for c in configs[:n]],
            }
        )
    table = {p: correlations(predicted[p], measured) for p in proxies}
    result["correlations"] = table
    result["secondary_metric"] = {
        "metric": SECONDARY_METRIC[name],
        "damage": "1 - config",
        "correlations": {p: correlations(predicted[p], secondary) for p in proxies},
    }
    if extra:
        result["extra_metrics"] = {
            metric: {
                "damage": EXTRA_METRIC_DAMAGE[metric],
                "measured": values,
                "correlations": {p: correlations(predicted[p], values) for p in proxies},
            }
            for metric, values in extra.items()
        }
    result["verdict"] = _verdict(table)
    if previous is None:
        result["wall_s"] = time.perf_counter() - t_model
    else:
        result["gradient_rerun_wall_s"] = time.perf_counter() - t_model
    return result


EXTRA_METRIC_DAMAGE = {"kl": "mean KL(float || config) over the held-out samples, nats"}


def _measure(
    name: str,
    args: argparse.Namespace,
    artifacts: Any,
    kind: Any,
    raw: Any,
    cal_cfg: Any,
    calib_n: int,
    eval_n: int,
    configs: list[dict[str, Any]],
    deadline: float,
    result: dict[str, Any],
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """Real QDQ models for ``configs`` (until ``deadline``), evaluated on the held-out split:
    (primary damage, secondary damage, extra damages by metric). Fills timing fields of
    ``result`` and each configuration's ``metrics``."""
    import onnx

    from dyadiq.pipeline import PlanBuilder
    from dyadiq.plan import PrecisionPlan

    calibration = list(artifacts.calibration_batches(calib_n))
    builder = PlanBuilder(raw, calibration, cal_cfg)
    result["calibration"]["statistics_s"] = builder.calibration_s
    measured: list[float] = []
    secondary: list[float] = []
    extra: dict[str, list[float]] = {}
    reference: dict[str, float] = {}
    chunk = EVAL_CHUNK.get(name, DEFAULT_EVAL_CHUNK)
    build_s = eval_s = 0.0
    truncated = None
    with tempfile.TemporaryDirectory(prefix=f"pq_{name}_") as tmp:
        for start in range(0, len(configs), chunk):
            if time.time() > deadline and len(measured) >= 10:
                truncated = f"time budget reached after {len(measured)} configurations"
                log.warning("%s: %s", name, truncated)
                break
            paths: dict[str, Path] = {}
            t = time.perf_counter()
            for i in range(start, min(start + chunk, len(configs))):
                path = Path(tmp) / f"config_{i:03d}.onnx"
                onnx.save(
                    builder.build(PrecisionPlan.from_weight_bits(configs[i]["bits"])), str(path)
                )
                paths[f"config_{i:03d}"] = path
            build_s += time.perf_counter() - t
            t = time.perf_counter()
            metrics = evaluate_configs(artifacts, kind, paths, eval_n)
            eval_s += time.perf_counter() - t
            reference = metrics["float"]
            for key in paths:
                measured.append(_damage(name, metrics[key], reference))
                secondary.append(float(1.0 - metrics[key][SECONDARY_METRIC[name]]))
                for metric in EXTRA_METRIC_DAMAGE:
                    if metric in metrics[key]:
                        extra.setdefault(metric, []).append(float(metrics[key][metric]))
                configs[int(key.split("_")[1])]["metrics"] = {
                    k: v for k, v in metrics[key].items() if k != "samples"
                }
            for f in paths.values():
                f.unlink()
            log.info("%s: %d/%d configurations measured", name, len(measured), len(configs))
    result.update(
        {
            "truncated": truncated,
            "float_metrics": reference,
            "build_s": build_s,
            "build_fallbacks": builder.fallbacks,
            "evaluate_s": eval_s,
        }
    )
    return measured, secondary, extra


def _verdict(table: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """Do pair terms help (tau), per proxy; which proxy ranks best."""

    def tau(p: str) -> float | None:
        return table.get(p, {}).get("kendall_tau")

    def cmp(a: str, b: str) -> str | None:
        ta, tb = tau(a), tau(b)
        if ta is None or tb is None:
            return None
        return "better" if ta > tb + 1e-9 else "worse" if ta < tb - 1e-9 else "equal"

    taus = {p: tau(p) for p in table}
    valid = {p: v for p, v in taus.items() if v is not None}
    bases = [p for p in table if "+" not in p and "[" not in p]
    return {
        "pairs_vs_alone": {p: cmp(f"{p}+pairs", p) for p in bases},
        "raw_pairs_vs_alone": {
            p.split("+")[0]: cmp(f"{p}[raw]", p.split("+")[0]) for p in PAIR_VARIANTS
        },
        "best_proxy_by_tau": max(valid, key=lambda p: valid[p]) if valid else None,
    }


# --- machine info, output ----------------------------------------------------------------------


def _f(x: Any, spec: str = "+.3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _iters(iterations: dict[str, int]) -> str:
    if not iterations:
        return "n/a"
    values = list(iterations.values())
    return f"median {int(np.median(values))}, max {max(values)}"


def _load(values: list[float] | None) -> str:
    return ", ".join(f"{x:.2f}" for x in values) if values else "n/a"


def _space(res: dict[str, Any]) -> str:
    space = res.get("config_space") or dict(
        zip(("p_low_max", "low_bits", "high_bits"), DEFAULT_CONFIG_SPACE, strict=True)
    )
    return (
        f"p(low) ~ U(0, {space['p_low_max']:g}), each layer low "
        f"({'/'.join(map(str, space['low_bits']))} bits) with probability p, else high "
        f"({'/'.join(map(str, space['high_bits']))})"
    )


def render_markdown(data: dict[str, Any]) -> str:
    runs = data.get("runs") or [
        {**{k: data.get(k) for k in ("date", "command", "machine", "total_wall_s")}, "models": []}
    ]
    lines = ["# Sensitivity proxies vs real mixed-precision damage", ""]
    for i, run in enumerate(runs):
        m = run["machine"]
        lines.append(
            f"- run {i}: `{run['command']}` ({', '.join(run.get('models') or []) or 'all'}); "
            f"{run['date']}; wall time {_f(run.get('total_wall_s'), '.0f')} s; "
            f"{m['cpu_model']}, {m['nproc']} CPUs; commit {str(m.get('git_commit'))[:7]}; "
            f"load average at start {_load(m.get('load_avg_start'))}, at end "
            f"{_load(run.get('load_avg_end'))}"
        )
    lines += [
        f"- configurations: seed {data['settings']['seed']}; per configuration "
        f"{_space({})}, unless the model's details say otherwise; activations 8 bits",
        "- damage: accuracy drop vs float (fashion_cnn, ppocr_cls), 1 - top-1 agreement "
        "(mobilenet_v2), 1 - mean cosine (minilm), on the held-out split; the details give "
        "correlations for the smoother secondary metrics too",
        "- tau = Kendall, rho = Spearman, between predicted and measured damage over the "
        "configurations",
        "",
    ]
    if data.get("notes"):
        lines += [f"- {n}" for n in data["notes"]] + [""]
    models = {n: r for n, r in data["models"].items() if "error" not in r and "skipped" not in r}
    for name, res in data["models"].items():
        if name not in models:
            lines.append(f"- {name}: {res.get('skipped') or 'error: ' + res['error']}")
    columns = [
        p
        for p in data["settings"]["proxies"]
        if any(p in r["correlations"] for r in models.values())
    ]
    lines += [
        "| proxy | " + " | ".join(f"{n} tau / rho" for n in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for p in columns:
        cells = []
        for res in models.values():
            # results of earlier runs name the trace proxy by its older name, hessian
            c = res["correlations"].get(p) or res["correlations"].get(p.replace("trace", "hessian"))
            cells.append(f"{_f(c['kendall_tau'])} / {_f(c['spearman_rho'])}" if c else "n/a")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | N | analysis s | fwd passes | gradient s | rev passes | pair terms (layer "
        "pairs x width pairs) | within noise | significant + / - | below floor | "
        "relative cross term p10 / median / p90 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, res in models.items():
        st = res.get("pair_terms") or {}
        lines.append(
            f"| {name} | {res['configs']} | {res['analysis']['wall_s']:.1f} | "
            f"{res['analysis']['forward_passes']} | "
            f"{res['gradient_analysis']['wall_s']:.1f} | "
            f"{res['gradient_analysis']['reverse_passes']} | "
            f"{res['analysis']['pairs']} x {st.get('terms', 0)} | "
            f"{st.get('within_noise', 'n/a')} | {st.get('significant_positive', 'n/a')} / "
            f"{st.get('significant_negative', 'n/a')} | {st.get('below_floor', 'n/a')} | "
            f"{_f(st.get('relative_p10'))} / {_f(st.get('relative_median'))} / "
            f"{_f(st.get('relative_p90'))} |"
        )
    lines += ["", "## Details", ""]
    for name, res in data["models"].items():
        if "error" in res or "skipped" in res:
            continue
        c = res["caps"]
        md = np.asarray(res["measured_damage"])
        lines += [
            f"### {name}",
            "",
            f"- run {res.get('run', 0)}"
            + (
                f" (configurations and measured damage from run {res['measured_in_run']}; "
                "the predictions were recomputed in this run)"
                if res.get("measured_in_run") is not None
                else ""
            )
            + f"; configurations: {_space(res)}",
            f"- caps: analysis {c['analysis_samples']} samples, calibration "
            f"{c['calibration_samples']} samples (statistics collected once, "
            f"{res['calibration']['statistics_s']:.1f} s, {res['calibration']['method']}), "
            f"evaluation {c['evaluation_samples']} samples",
            f"- analysis: {res['analysis']['wall_s']:.1f} s, "
            f"{res['analysis']['forward_passes']} forward passes, "
            f"{res['analysis']['layers']} layers, {res['analysis']['pairs']} layer pairs",
            f"- gradient proxies (eigenvalue, Fisher, Taylor): "
            f"{res['gradient_analysis']['wall_s']:.1f} s incl. TVM compile, "
            f"{res['gradient_analysis']['samples']} samples, "
            f"{res['gradient_analysis']['reverse_passes']} reverse passes, "
            f"{res['gradient_analysis']['forward_passes']} forward passes; power-iteration "
            f"steps per layer {_iters(res['gradient_analysis']['eigen_iterations'])}"
            + "".join(f"; {n}" for n in res["gradient_analysis"]["notes"]),
            f"- build {res['build_s']:.1f} s, evaluate {res['evaluate_s']:.1f} s, "
            f"model total {res['wall_s']:.1f} s"
            + (f"; truncated: {res['truncated']}" if res.get("truncated") else ""),
            f"- float {res['damage_metric']['metric']}: "
            f"{res['float_metrics'].get(res['damage_metric']['metric'], float('nan')):.4f}; "
            f"measured damage min {md.min():.4f}, median {np.median(md):.4f}, "
            f"max {md.max():.4f}; distinct values {len(set(md.tolist()))}",
            f"- secondary damage (1 - {res['secondary_metric']['metric']}) tau: "
            + ", ".join(
                f"{p} {_f(v['kendall_tau'])}"
                for p, v in res["secondary_metric"]["correlations"].items()
            ),
            *[
                f"- {metric} damage ({v['damage']}) tau / rho: "
                + ", ".join(
                    f"{p} {_f(c['kendall_tau'])} / {_f(c['spearman_rho'])}"
                    for p, c in v["correlations"].items()
                )
                for metric, v in res.get("extra_metrics", {}).items()
            ],
            *[f"- note: {n}" for n in res.get("notes", [])],
            "- +pairs vs alone (tau): "
            + ", ".join(f"{p} {v}" for p, v in (res["verdict"].get("pairs_vs_alone") or {}).items())
            + f"; best by tau: {res['verdict']['best_proxy_by_tau']}",
            "",
        ]
    if data.get("conclusion"):
        lines += ["## Conclusion", "", data["conclusion"], ""]
    return "\n".join(lines)


def conclusion(data: dict[str, Any]) -> str:
    rows = []
    helped: dict[str, int] = {}
    total = 0
    for name, res in data["models"].items():
        if "verdict" not in res:
            continue
        total += 1
        t = {p: res["correlations"][p]["kendall_tau"] for p in res["correlations"]}
        verdict = res["verdict"].get("pairs_vs_alone") or {}
        for p, v in verdict.items():
            helped[p] = helped.get(p, 0) + (v == "better")
        best = res["verdict"]["best_proxy_by_tau"]
        rows.append(
            f"{name}: empirical {_f(t.get('empirical'))}, empirical+pairs "
            f"{_f(t.get('empirical+pairs'))}, raw pairs {_f(t.get('empirical+pairs[raw]'))}; "
            f"best by tau {best} ({_f(t.get(best))})"
        )
    if not rows:
        return ""
    counts = ", ".join(f"{p} {n}/{total}" for p, n in helped.items())
    return (
        f"Models on which +pairs (safe model) ranks better than the proxy alone (Kendall tau): "
        f"{counts}. " + "; ".join(rows) + "."
    )


def write_results(data: dict[str, Any], output_dir: Path) -> None:
    common.write_results(data, output_dir, "proxy_quality", render_markdown)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.proxy_quality", description=__doc__)
    p.add_argument("--models", nargs="+", choices=ALL_MODELS, default=list(ALL_MODELS))
    p.add_argument("--configs", type=int, default=None, help="configurations per model (60)")
    p.add_argument("--quick", action="store_true", help="smoke test: few configs, small caps")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--eval-limit", type=int, default=None, help="override evaluation samples")
    p.add_argument(
        "--hutchinson-max-iters", type=int, default=None, help="default: SensitivityConfig's"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-time budget: models not started within it are skipped (recorded), a model "
        "running past it stops measuring configurations",
    )
    p.add_argument(
        "--no-merge",
        action="store_true",
        help="start a fresh results file instead of replacing only these models' entries in "
        "the existing one",
    )
    p.add_argument(
        "--reuse-measured",
        nargs="+",
        default=[],
        choices=ALL_MODELS,
        metavar="MODEL",
        help="keep these models' configurations and measured damage from the existing results; "
        "recompute every prediction (with --no-gradients: keep the gradient proxies' too)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not use the analysis cache")
    p.add_argument(
        "--workers", type=int, default=None, help="run the analysis on a local Ray (same result)"
    )
    p.add_argument(
        "--no-gradients",
        action="store_true",
        help="skip the reverse-mode proxies (eigenvalue/Fisher/Taylor); a later run with "
        "--reuse-measured adds them",
    )
    args = p.parse_args(argv)
    if args.configs is None:
        args.configs = 8 if args.quick else 60
    return args


def _load_previous(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / "proxy_quality.json"
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    if "runs" not in data:  # a single-run file: its run is described at the top level
        run = {
            k: data.get(k) for k in ("date", "command", "machine", "total_wall_s", "load_avg_end")
        }
        data["runs"] = [{**run, "models": list(data.get("models", {}))}]
        for res in data.get("models", {}).values():
            res.setdefault("run", 0)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    deadline = time.time() + (args.budget_s if args.budget_s else 1e9)
    argv_used = sys.argv[1:] if argv is None else argv
    previous = None if args.no_merge else _load_previous(args.output_dir)
    if args.reuse_measured and previous is None:
        raise SystemExit("--reuse-measured needs an existing results file in --output-dir")
    run: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.proxy_quality " + " ".join(argv_used),
        "machine": common.machine_info(),
        "models": [],
    }
    data: dict[str, Any] = previous or {"notes": [], "models": {}, "runs": []}
    data["runs"].append(run)
    run_index = len(data["runs"]) - 1
    # the top-level fields describe the latest run (what older readers of the file expect)
    data.update({k: run[k] for k in ("date", "command", "machine")})
    data["settings"] = {
        "models": args.models,
        "configs": args.configs,
        "quick": args.quick,
        "seed": SEED,
        "weight_bits": list(BITS),
        "low_bits": list(LOW_BITS),
        "high_bits": list(HIGH_BITS),
        "config_space": {k: list(v) for k, v in CONFIG_SPACE.items()},
        "act_bits": 8,
        "hutchinson_max_iters": args.hutchinson_max_iters,
        "budget_s": args.budget_s,
        "proxies": proxy_columns(),
    }
    order = [m for m in ALL_MODELS if m in args.models]
    for name in order:
        run["models"].append(name)
        old = (previous or {}).get("models", {}).get(name)
        if name in args.reuse_measured and (old is None or "measured_damage" not in old):
            raise SystemExit(f"--reuse-measured {name}: no measured results to reuse")
        if time.time() > deadline:
            reason = "skipped: wall-time budget exhausted before this model started"
            data["models"][name] = {"skipped": reason, "run": run_index}
        else:
            try:
                res = benchmark_model(
                    name, args, deadline, old if name in args.reuse_measured else None
                )
                if name in args.reuse_measured:
                    res["measured_in_run"] = old.get("measured_in_run", old.get("run"))
                data["models"][name] = {**res, "run": run_index}
            except Exception as exc:  # one model failing must not lose the others
                log.exception("%s failed", name)
                data["models"][name] = {"error": f"{type(exc).__name__}: {exc}", "run": run_index}
        run["total_wall_s"] = time.perf_counter() - start
        run["load_avg_end"] = list(os.getloadavg())
        data["total_wall_s"] = run["total_wall_s"]
        data["load_avg_end"] = run["load_avg_end"]
        data["conclusion"] = conclusion(data)
        write_results(data, args.output_dir)
    return data


if __name__ == "__main__":
    main()
