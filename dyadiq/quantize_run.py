"""One quantize run, its inputs resolved (:mod:`dyadiq.run_inputs`): choose the plan (budget or
accuracy tolerance), run the pipeline into the staged folder, build and check the target,
evaluate, and write report.json and report.html. :func:`dyadiq.quantize` orders it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyadiq.backends.onnx.qdq import QDQStyle
from dyadiq.passes.calibration.range_search import DEFAULT_EVALUATIONS
from dyadiq.pipeline import QuantizeResult
from dyadiq.plan import PrecisionPlan
from dyadiq.progress import stage
from dyadiq.quantized_model import QuantizedModel, SearchOptions, TargetOptions


@dataclass
class QuantizeRun:
    """One quantize run's inputs, resolved; :meth:`execute` writes the staged folder."""

    final: Path
    model_path: Path
    artifacts: Any
    calibration: Any
    style: QDQStyle
    settings: dict[str, Any]
    plan: PrecisionPlan | None
    search: SearchOptions
    build: TargetOptions
    quality: Any  # dyadiq.quality_sources.Quality

    def execute(self, staged: Path, scratch: Any) -> QuantizedModel:
        from dyadiq import pipeline
        from dyadiq.consistency import verification_problems
        from dyadiq.html_report import write_report_html
        from dyadiq.io import relocated, write_text_atomic
        from dyadiq.passes.calibration.observers import RangeMethod
        from dyadiq.passes.calibration.range_search import RangeSearchOptions
        from dyadiq.passes.compensation.settings import CompensationSettings

        s = self.settings
        config = pipeline.CalibrationConfig(
            method=RangeMethod(s["calibrator"]),
            percentile=s["percentile"],
            limit=s["calib_limit"],
            image_preset=s["calib_preset"],
            range_search=RangeSearchOptions(evaluations=s["range_search"]),
        )
        compensation = CompensationSettings.parse(s["compensate"])
        plan, allocation, weights = self.plan, None, None
        if s["budget"] or s["max_drop"]:
            allocation, weights = self._choose_plan(compensation)
            plan = allocation.plan
        with stage(_quantize_line(self.model_path, compensation.label)):
            result = pipeline.quantize(
                self.model_path,
                staged,
                self.calibration,
                weight_bits=s["wbits"],
                act_bits=s["abits"],
                act_signed=s["act_dtype"] == "int8",
                exclude=frozenset(s["exclude"]),
                config=config,
                input_shapes={k: list(v) for k, v in s["input_shapes"].items()}
                if s["input_shapes"]
                else None,
                plan=plan,
                integer=s["integer"] or s["target"] is not None,
                strict_integer=s["strict_integer"],
                compensation=compensation,
                weights=weights,
                qdq_style=self.style,
            )
        report = json.loads((staged / "report.json").read_text())
        paths = {name: self.final / file for name, file in ROLES.items()}
        if s["integer"] or s["target"] is not None:
            paths["integer"] = self.final / "model.int.onnx"
        if allocation is not None:
            report["allocation"] = allocation.info
        if s["bind"]:  # the written models no longer take these inputs
            report["bound_inputs"] = s["bind"]
        if s["target"] is not None:
            info = self._build_target(result, config, staged)
            report["target"] = relocated(info, staged, self.final)  # paths as they will be
            paths["target"] = self.final / s["target"]
        if s["evaluate"] is not False:
            metrics = self._evaluate(staged, paths)
            if metrics:
                report["metrics"] = metrics
        if self.quality.held_out:
            report["held_out"] = self.quality.held_out
        problems = verification_problems(report)
        report["verification"] = {
            "passed": not problems,
            "problems": problems,
            "mismatch_allowed": bool(problems) and s["allow_mismatch"],
        }
        write_text_atomic(staged / "report.json", json.dumps(report, indent=2))
        # Written for failed verifications too: the kept folder's page says what failed.
        write_report_html(staged, report, plan=result.plan.to_json())
        return QuantizedModel(paths, report, result, allocation, scratch)

    def _choose_plan(self, compensation: Any) -> tuple[Any, Any]:
        """--budget (ILP) or --max-drop (bisection): the chosen plan's search and the
        compensated weights it was priced with (None: plain rounding)."""
        from dyadiq import mixed_precision as mp

        s = self.settings
        options = self._mixed_precision_options(compensation)
        builder = weights = None
        if compensation.enabled:
            # one compensated quantizer for the analysis, the measured plans and the output
            with stage(f"compensating weights at widths {_widths(options)} ({compensation.label})"):
                builder = mp.plan_builder(self.model_path, self.calibration, options)
                weights = mp.candidate_weights(builder, options)
        if builder is None and options.allocation.a8_damage:
            # the plan's activation quantizers, which the A8 damage is measured under
            builder = mp.plan_builder(self.model_path, self.calibration, options)
        if s["max_drop"]:
            if builder is None:  # one calibration pass for every measured plan
                builder = mp.plan_builder(self.model_path, self.calibration, options)
            with stage(
                f"searching the smallest plan within --max-drop {s['max_drop']} of float "
                f"({self.search.bisect_steps} measured plans at most)"
            ):
                bisected = mp.bisect(
                    self.model_path,
                    self.calibration,
                    options,
                    s["max_drop"],
                    self.search.bisect_steps,
                    self.quality.search,
                    self.final,
                    builder,
                )
            return bisected, weights
        with stage(
            f"allocating per-layer formats under {s['budget']}: sensitivity analysis (cached "
            "on disk), then the ILP"
        ):
            chosen = mp.allocate(self.model_path, self.calibration, options, s["budget"], builder)
        return chosen, weights

    def _mixed_precision_options(self, compensation: Any) -> Any:
        s = self.settings
        return mixed_precision_options(
            self.search,
            compensation=compensation,
            abits=s["abits"],
            act_dtype=s["act_dtype"],
            calibrator=s["calibrator"],
            range_search=s["range_search"],
            calib_preset=s["calib_preset"],
            calib_limit=s["calib_limit"],
            pin=s["pin"],
            exclude=s["exclude"],
            integer=s["integer"],
            target=s["target"],
            eval_limit=s["eval_limit"],
            input_shapes=s["input_shapes"],
        )

    def _build_target(self, result: QuantizeResult, config: Any, staged: Path) -> Any:
        from dyadiq.pipeline import verification_batches
        from dyadiq.targets import emit_for_target, single_inputs

        target, build = self.settings["target"], self.build
        assert result.program is not None  # integer=True for a target
        if self.artifacts is not None:  # real held-out inputs
            batches = [f for f, _ in self.artifacts.evaluation_batches(build.check_inputs)]
        else:
            batches = verification_batches(
                self.calibration, result.graph, config.image_preset, build.check_inputs
            )
        feeds = single_inputs(batches, build.check_inputs)
        with stage(
            f"compiling for {target} and checking it against the reference on {len(feeds)} inputs"
        ):
            return emit_for_target(
                result.program,
                target,
                staged / target,
                feeds,
                tune_trials=build.tune_trials,
                tuning_db=build.tuning_db,
                layer_latency_ids=list(result.plan.layers) if build.layer_latency else None,
            )

    def _evaluate(self, staged: Path, paths: dict[str, Path]) -> dict[str, dict[str, float]]:
        """The written models scored: on the zoo model's held-out data (its report half
        after --max-drop), on the user's report split, and by the user's callback."""
        from dyadiq.evaluation import evaluate
        from dyadiq.quality_sources import report_metrics

        s = self.settings
        mixed = self.plan is not None or s["budget"] or s["max_drop"]
        label = "dyadiq plan" if mixed else f"dyadiq W{s['wbits']}A{s['abits']}"
        models = {label: staged / "model.qdq.onnx"}
        if s["integer"]:
            models[f"{label} integer"] = staged / "model.int.onnx"
        metrics = report_metrics(self.quality, self.model_path, models)
        if self.artifacts is None:
            return metrics
        if s["compare_ort"]:
            from dyadiq.ort_baseline import quantize_static_baseline

            ort_path = staged / "ort_quantize_static.qdq.onnx"
            with stage("running onnxruntime's quantize_static (W8A8) for comparison"):
                quantize_static_baseline(self.artifacts.model_path, ort_path, self.calibration)
            models["onnxruntime quantize_static W8A8"] = ort_path
            paths["ort_baseline"] = self.final / ort_path.name
        zoo = evaluate(
            self.artifacts,
            models,
            limit=s["eval_limit"],
            runtime_kernels=s["runtime_kernels"],
            part=self.quality.zoo_part,
        )
        for name, values in metrics.items():  # the callback's score beside the zoo's metrics
            zoo.setdefault(name, {}).update(values)
        return zoo


# The files every run writes, by role.
ROLES = {
    "qdq": "model.qdq.onnx",
    "plan": "plan.json",
    "report": "report.json",
    "report_html": "report.html",
}


def _quantize_line(model_path: Path, compensation: str) -> str:
    steps = "calibration"
    if compensation != "none":
        steps += f", weight compensation ({compensation})"
    return f"quantizing {model_path.name}: {steps}, QDQ rewrite, checks"


def _widths(options: Any) -> str:
    return ",".join(str(b) for b in options.allocation.weight_bits)


def mixed_precision_options(
    search: SearchOptions,
    *,
    compensation: Any,
    abits: int = 8,
    act_dtype: str = "uint8",
    calibrator: str = "auto",
    range_search: int = DEFAULT_EVALUATIONS,
    calib_preset: str | None = None,
    calib_limit: int | None = None,
    pin: Sequence[str] = (),
    exclude: Sequence[str] = (),
    integer: bool = False,
    target: str | None = None,
    eval_limit: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Any:
    """The one place a run's options become :class:`~dyadiq.mixed_precision.MixedPrecisionOptions`
    (``quantize --budget`` / ``--max-drop`` and ``frontier``). The plan must run on the QDQ
    model; with ``integer`` or a ``target`` also on the integer model; with a ``target`` on
    that target's backend too."""
    from dyadiq.backends.capabilities import INTEGER_ONNX, ONNX_QDQ
    from dyadiq.mixed_precision import MixedPrecisionOptions
    from dyadiq.passes.allocation import AllocationOptions
    from dyadiq.passes.calibration.observers import RangeMethod
    from dyadiq.passes.sensitivity.proxy import Proxy
    from dyadiq.targets import TARGETS

    runs_on = [ONNX_QDQ]
    if integer or target is not None:
        runs_on.append(INTEGER_ONNX)
    if target is not None:
        runs_on.append(TARGETS[target].capabilities)
    allocation = AllocationOptions(
        weight_bits=tuple(search.wbits_candidates),
        act_bits=tuple(search.abits_candidates or (abits,)),
        default_act_bits=abits,
        proxy=Proxy.parse(search.proxy),
        a8_damage=search.a8_damage,
        refine_plan=search.refine_plan,
        pins=tuple(pin),
        exclude=tuple(exclude),
        runs_on=tuple(runs_on),
        latency_table=search.latency_table,
        memory_plan=search.memory_plan,
    )
    return MixedPrecisionOptions(
        allocation,
        calibrator=RangeMethod(calibrator),
        range_search=range_search,
        calib_preset=calib_preset,
        calib_limit=calib_limit,
        analysis_samples=search.analysis_samples,
        compensation=compensation,
        act_signed=act_dtype == "int8",
        eval_limit=eval_limit,
        workers=search.workers,
        ray_address=search.ray_address,
        input_shapes=input_shapes,
    )
