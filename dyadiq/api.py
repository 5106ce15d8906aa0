"""``dyadiq.quantize``: the whole quantize run as one typed call, what ``dyadiq quantize`` runs.

model (+ calibration) -> [per-layer formats under a budget or accuracy tolerance] -> QDQ model,
plan, report (+ integer-only model) -> [compiled target, checked bit for bit] -> [held-out
evaluation] -> verification. Every step is a call into the module that owns it; this module
only orders them, stages the output folder (all or nothing) and returns what was made as a
:class:`QuantizedModel`. Its defaults are the command line's (a test keeps them equal).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dyadiq.backends.onnx.qdq import QDQStyle
from dyadiq.errors import CalibrationDataError, ConfigError, VerificationError
from dyadiq.passes.compensation.settings import DEFAULT_COMPENSATION
from dyadiq.pipeline import QuantizeResult
from dyadiq.plan import PrecisionPlan
from dyadiq.progress import stage

ModelInput = str | os.PathLike[str] | onnx.ModelProto
ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class SearchOptions:
    """How ``budget`` / ``max_drop`` search per-layer formats (``--wbits-candidates`` ...)."""

    wbits_candidates: tuple[int, ...] = (2, 3, 4, 6, 8)
    abits_candidates: tuple[int, ...] | None = None  # None: activations stay at ``abits``
    proxy: str = "empirical"  # the damage model the ILP minimises
    analysis_samples: int = 8  # calibration batches the sensitivity analysis reads
    bisect_steps: int = 6  # --max-drop measurements
    latency_table: Path | None = None  # a backend's measured {layer: {format: ms}}
    memory_plan: Path | None = None  # live sets for ram= / flash= budgets
    workers: int | None = None  # > 1: analysis and plan measurements on a local Ray
    ray_address: str | None = None  # or on an existing Ray cluster


@dataclass(frozen=True)
class TargetOptions:
    """How ``target`` is built and checked (``--check-inputs``, ``--tune-trials`` ...)."""

    check_inputs: int = 8  # inputs the build is compared on, bit for bit
    tune_trials: int = 0  # MetaSchedule trials (TVM CPU); 0: a default schedule
    tuning_db: Path | None = None
    layer_latency: bool = False  # x86: time each layer's kernel per format


@dataclass(repr=False)
class QuantizedModel:
    """What :func:`quantize` made.

    ``paths``: the files written, by role (``qdq``, ``plan``, ``report``, ``report_html``,
    and ``integer``, ``target``, ``ort_baseline`` when made). ``report``: report.json as a
    dict. ``metrics``: metrics per model (``float`` first) on held-out data or by a callback.
    ``pipeline``: the graph, plan, activation sites and integer program behind them.
    ``report["held_out"]``: which data the plan was searched on and the metrics reported on.
    ``allocation``: the chosen plan's search (a ``BudgetPlan`` / ``BisectedPlan``) or None.
    """

    paths: dict[str, Path]
    report: dict[str, Any]
    pipeline: QuantizeResult
    allocation: Any = None
    _scratch: Any = field(default=None)  # a TemporaryDirectory holding ``paths`` (out=None)

    @property
    def plan(self) -> PrecisionPlan:
        """Every layer's format, as written to plan.json."""
        return self.pipeline.plan

    @property
    def metrics(self) -> dict[str, dict[str, float]] | None:
        """Metrics per model (``float`` first) on held-out data (a zoo model's, ``test`` or
        ``validation``) and by an ``evaluate`` callback; None when none was measured."""
        return self.report.get("metrics")

    @property
    def verified(self) -> bool:
        """True when every bit-exactness check that ran passed (or none had to run)."""
        return bool(self.report.get("verification", {}).get("passed", True))

    def __repr__(self) -> str:
        sizes = self.report["sizes"]
        quality = ""
        if self.metrics:
            name, value = _headline_metric(self.metrics)
            if name:
                quality = f", {name} {value:.4f} (float {self.metrics['float'][name]:.4f})"
        return (
            f"<QuantizedModel {Path(self.report['source']).name}: {len(self.plan.layers)} "
            f"layers, {sizes['float_model_bytes']:,} B -> {sizes['qdq_model_bytes']:,} B"
            f"{quality}, {'verified' if self.verified else 'NOT verified'}; "
            f"{self.paths['qdq'].parent}>"
        )


def _headline_metric(metrics: Mapping[str, Mapping[str, float]]) -> tuple[str, float]:
    """The first quantized model's accuracy (else top-1 agreement, else cosine)."""
    names = [n for n in metrics if n != "float"]
    if not names:
        return "", 0.0
    first = metrics[names[0]]
    for key in ("accuracy", "top1_agreement", "mean_cosine", "logit_cosine", "evaluate"):
        if key in first and key in metrics["float"]:
            return key, float(first[key])
    return "", 0.0


def quantize(
    model: ModelInput,
    calibration: Any = None,
    *,
    validation: Any = None,
    test: Any = None,
    labels: Any = None,
    test_labels: Any = None,
    out: str | os.PathLike[str] | None = None,
    budget: str | None = None,
    max_drop: str | None = None,
    target: str | None = None,
    wbits: int = 8,
    abits: int = 8,
    act_dtype: str = "uint8",
    qdq_style: str | QDQStyle = "ort",
    calibrator: str = "percentile",
    percentile: float = 99.99,
    calib_preset: str | None = None,
    calib_limit: int | None = None,
    compensate: str = DEFAULT_COMPENSATION,
    exclude: Sequence[str] = (),
    pin: Sequence[str] = (),
    plan: PrecisionPlan | str | os.PathLike[str] | None = None,
    integer: bool = False,
    strict_integer: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    evaluate: bool | Callable[[Path], float] = True,
    eval_limit: int | None = None,
    compare_ort: bool = False,
    runtime_kernels: bool = False,
    allow_mismatch: bool = False,
    search: SearchOptions = SearchOptions(),
    build: TargetOptions = TargetOptions(),
    on_written: Callable[[QuantizedModel], None] | None = None,
) -> QuantizedModel:
    """Quantize ``model`` and write the result to ``out`` (a temporary folder if None).

    ``model``: an ONNX file, a saved Relax IRModule (``.json``), an ``onnx.ModelProto``, or
    ``"zoo:NAME"`` (a zoo model, with its own calibration and held-out data).
    ``calibration``: an iterable of ``{input name: array}`` batches, an onnxruntime
    ``CalibrationDataReader``, a folder of .npz/.npy batches or images (``calib_preset``), or
    one .npz file (one batch); None for a zoo model.
    ``budget`` (``"size=2MB"``, ``"avg-wbits=5"``, ...) or ``max_drop`` choose per-layer
    formats; ``plan`` gives them; else every layer is W``wbits``A``abits``.
    ``max_drop``: the smallest plan whose score is within this drop of the float model's:
    ``"0.01"`` in the metric's units, ``"0.5%"`` of its scale (half a point of an accuracy or
    agreement; of a callback's score, 0.5 % of float's). Plans are scored by ``evaluate``
    when it is a callable ``evaluate(model_path) -> float`` (higher is better; it gets the
    path of a complete QDQ model), else on ``validation`` (the user's held-out batches, read
    like ``calibration``: by ``labels`` accuracy when given, else by agreement with float,
    chosen by what the first output holds), else on a zoo model's held-out data. The written
    model is reported on ``test`` (with ``test_labels``), else on the half of ``validation``
    (or of the zoo's data) that the search did not read. ``evaluate=False`` skips reporting.
    A callback is called once on the float model (the reference), once per measured plan and
    once on the written model (reported as the metric ``evaluate``); what it raises, or a
    result that is not a finite number, is a ``ConfigError`` naming the plan being measured.
    ``exclude``: layers kept in float, by node id, glob pattern or op type (``"Gemm"``).
    ``pin``: ``"ID_OR_PATTERN=W8A8[,W4A8]"`` restrictions for ``budget`` / ``max_drop``.
    ``integer`` / ``target``: a layer whose int32 accumulator could overflow is kept in float
    (in both models, named in the report) unless ``strict_integer``, which refuses instead.
    ``target``: also compile the integer model (``"x86"``, ``"cortex-m4"``, ...) into
    ``out/TARGET`` and check it bit for bit. ``qdq_style="tensorrt"`` writes TensorRT's
    explicit quantization (symmetric int8, zero point 0) instead of onnxruntime's layout.

    Raises a :class:`~dyadiq.errors.DyadiqError` subclass for bad input, and
    :class:`~dyadiq.errors.VerificationError` when a written model is not bit-exact against
    the reference (unless ``allow_mismatch``; the folder is kept for inspection).
    ``on_written`` is called with the result once every file is written, before that error.
    """
    from dyadiq.quality_sources import QualityInputs, input_problems

    style = QDQStyle.parse(qdq_style)
    quality_inputs = QualityInputs(validation, test, labels, test_labels, evaluate)
    problems = _conflicts(budget, max_drop, plan, pin, style, integer, target, act_dtype)
    problems += input_problems(
        quality_inputs, zoo=_is_zoo(model), max_drop=max_drop, calibration=calibration
    )
    if problems:
        problems += _data_problems(model, quality_inputs, calib_preset)
        raise ConfigError(
            problems[0] if len(problems) == 1 else "\n  - ".join(["bad options:", *problems])
        )
    with contextlib.ExitStack() as stack:
        scratch = None
        if out is None:
            scratch = tempfile.TemporaryDirectory(prefix="dyadiq_")
            out = Path(scratch.name) / "out"
        final = Path(out)
        calib_path = Path(calibration) if isinstance(calibration, str | os.PathLike) else None
        plan_path = Path(plan) if isinstance(plan, str | os.PathLike) else None
        named = [model if isinstance(model, str | os.PathLike) else None, calib_path, plan_path]
        named += [p for p in (validation, test) if isinstance(p, str | os.PathLike)]
        named += [search.latency_table, search.memory_plan, build.tuning_db]
        inputs = [Path(p) for p in named if p is not None and not _is_zoo(p)]
        _check_output(final, inputs)  # before any work
        artifacts, model_path = _source(model, stack)
        if artifacts is not None:
            inputs.append(Path(artifacts.model_path))
        calibration = _calibration(calibration, artifacts, calib_limit)
        excluded = _resolve_layers(model_path, exclude, pin, input_shapes) if exclude or pin else ()
        from dyadiq.quality_sources import resolve

        quality = resolve(
            model_path,
            artifacts,
            quality_inputs,
            searching=max_drop is not None,
            image_preset=calib_preset,
            eval_limit=eval_limit,
        )
        run = _Run(
            final=final,
            model_path=model_path,
            artifacts=artifacts,
            calibration=calibration,
            style=style,
            settings=dict(
                budget=budget,
                max_drop=max_drop,
                target=target,
                wbits=wbits,
                abits=abits,
                act_dtype=act_dtype,
                calibrator=calibrator,
                percentile=percentile,
                calib_preset=calib_preset,
                calib_limit=calib_limit,
                compensate=compensate,
                exclude=tuple(sorted(excluded)),
                pin=tuple(pin),
                integer=integer,
                strict_integer=strict_integer,
                input_shapes=input_shapes,
                evaluate=evaluate,
                eval_limit=eval_limit,
                compare_ort=compare_ort,
                runtime_kernels=runtime_kernels,
                allow_mismatch=allow_mismatch,
            ),
            plan=PrecisionPlan.load(plan_path) if plan_path else plan,  # type: ignore[arg-type]
            search=search,
            build=build,
            quality=quality,
        )
        from dyadiq.io import staged_output_dir

        staged = stack.enter_context(
            staged_output_dir(final, *inputs, keep_on=(VerificationError,))
        )
        result = run.execute(staged, scratch)
        if on_written is not None:
            on_written(result)
        problems = result.report["verification"]["problems"]
        if problems and not allow_mismatch:
            raise VerificationError(
                "verification failed:\n  - "
                + "\n  - ".join(problems)
                + f"\n{final} is written for inspection; --allow-mismatch accepts such a result"
            )
    return result


def _data_problems(model: ModelInput, inputs: Any, preset: str | None) -> list[str]:
    """What is wrong with --val / --test data too, so that one error lists everything (an
    ONNX file's inputs are read without loading the model; others are checked later)."""
    from dyadiq.errors import DyadiqError
    from dyadiq.quality_sources import read_user_data

    if not isinstance(model, str | os.PathLike) or Path(model).suffix != ".onnx":
        return []
    try:
        read_user_data(Path(model), inputs, image_preset=preset)
    except DyadiqError as exc:
        return [str(exc)]
    except Exception:  # an unreadable model: its own error comes once the options are fixed
        return []
    return []


def _is_zoo(item: Any) -> bool:
    return isinstance(item, str) and item.startswith(ZOO_PREFIX)


def _check_output(final: Path, inputs: list[Path]) -> None:
    from dyadiq.io import check_output_dir

    check_output_dir(final, *inputs)


def _conflicts(
    budget: str | None,
    max_drop: str | None,
    plan: Any,
    pin: Sequence[str],
    style: QDQStyle,
    integer: bool,
    target: str | None,
    act_dtype: str,
) -> list[str]:
    """Options that contradict each other or mean nothing: refused (all at once), never
    ignored."""
    problems = []
    if plan is not None and (budget or max_drop):
        chooser = "--budget" if budget else "--max-drop"
        problems.append(f"--plan gives every layer's format; {chooser} would choose them: pick one")
    if budget and max_drop:
        problems.append("--budget and --max-drop both choose the plan: pick one")
    if pin and not (budget or max_drop):
        problems.append("--pin restricts what --budget / --max-drop may choose: add one of them")
    if act_dtype not in ("uint8", "int8"):
        problems.append(f"--act-dtype must be uint8 or int8, got {act_dtype!r}")
    if style is QDQStyle.TENSORRT and (integer or target is not None):
        problems.append(
            "--qdq-style tensorrt writes a QDQ model for TensorRT; the integer model and "
            "--target builds use the default style: drop --integer / --target, or the style"
        )
    return problems


def _source(model: ModelInput, stack: contextlib.ExitStack) -> tuple[Any, Path]:
    """(zoo artifacts or None, an ONNX file): a zoo model materialised, a Relax IRModule
    translated, a ModelProto saved, each into a folder that lives as long as ``stack``."""
    if _is_zoo(model):
        from dyadiq import zoo

        name = str(model)[len(ZOO_PREFIX) :]
        cached = any(zoo.cache_dir().glob(f"{name}-*.onnx"))
        with (
            contextlib.nullcontext()
            if cached
            else stage(
                f"materialising zoo model {name} (first use: export into {zoo.cache_dir()}, "
                "installing what it needs; later runs reuse it)"
            )
        ):
            artifacts = zoo.get(name)
        return artifacts, Path(artifacts.model_path)
    if isinstance(model, onnx.ModelProto):
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dyadiq_model_")))
        path = folder / "model.onnx"
        onnx.save(model, str(path))
        return None, path
    path = Path(model)
    if path.suffix != ".json":
        return None, path
    from dyadiq.frontends.relax_frontend import load_relax_file, relax_to_onnx

    translated = relax_to_onnx(load_relax_file(path))
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dyadiq_relax_")))
    onnx_path = folder / (path.stem + ".onnx")
    onnx.save(translated, str(onnx_path))
    return None, onnx_path


def _calibration(calibration: Any, artifacts: Any, limit: int | None) -> Any:
    """The calibration source: the given one, a single .npz file as one batch, or the zoo
    model's own batches."""
    if calibration is None:
        if artifacts is None:
            raise ConfigError(
                "calibration data is required: --calib FOLDER (.npz/.npy files, or images with "
                "--calib-preset) or one .npz file"
            )
        return list(artifacts.calibration_batches(limit))
    if isinstance(calibration, str | os.PathLike) and Path(calibration).is_file():
        path = Path(calibration)
        if path.suffix.lower() != ".npz":
            raise CalibrationDataError(
                f"{path} is a file: --calib takes a folder of batches or one .npz file "
                "(numpy.savez(path, input_name=array, ...))"
            )
        try:
            with np.load(path, allow_pickle=False) as archive:
                return [{key: archive[key] for key in archive.files}]
        except (OSError, ValueError, EOFError) as exc:
            raise CalibrationDataError(f"cannot read calibration file {path}: {exc}") from exc
    return calibration


def _resolve_layers(
    model_path: Path,
    exclude: Sequence[str],
    pin: Sequence[str],
    input_shapes: Mapping[str, Sequence[int]] | None,
) -> frozenset[str]:
    """``exclude`` entries (node id, glob pattern or op type, like NNCF's ignored_scope) as
    node ids; every entry, and every ``pin`` pattern, must match a weighted layer."""
    from dyadiq.frontends.onnx_frontend import load_onnx

    shapes = {k: list(v) for k, v in input_shapes.items()} if input_shapes else None
    graph = load_onnx(model_path, input_shapes=shapes)
    layers = {node.name: node.op for node in graph.weighted_layers()}
    ids: set[str] = set()
    for entry in exclude:
        matched = match_layers(entry, layers)
        if not matched:
            raise ConfigError(_no_match("--exclude", entry, layers))
        ids |= matched
    for item in pin:
        pattern = item.partition("=")[0]
        if pattern not in layers and not fnmatch.filter(layers, pattern):
            raise ConfigError(_no_match("--pin", pattern, layers))
    return frozenset(ids)


def match_layers(entry: str, layers: Mapping[str, str]) -> set[str]:
    """Layer ids ``entry`` names: itself, those its glob pattern matches, or those of its op
    type (``Conv``, ``Gemm``, ``MatMul``)."""
    if entry in layers:
        return {entry}
    by_type = {layer for layer, op in layers.items() if op == entry}
    return by_type | set(fnmatch.filter(layers, entry))


def _no_match(option: str, entry: str, layers: Mapping[str, str]) -> str:
    """The error for a name that matches no layer, with the closest ids (and the op types)."""
    stem = entry.strip("*?[]") or entry
    close = difflib.get_close_matches(stem, list(layers), n=5, cutoff=0.3)
    close += [k for k in layers if stem in k and k not in close][: 5 - len(close)]
    ops = sorted(set(layers.values()))
    hint = f"closest layer ids: {', '.join(close)}" if close else "no layer id is close"
    return (
        f"{option} {entry!r} matches no layer ({hint}; op types here: "
        f"{', '.join(ops)}; `dyadiq inspect MODEL` lists every id)"
    )


@dataclass
class _Run:
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
        from dyadiq.passes.compensation.settings import CompensationSettings

        s = self.settings
        config = pipeline.CalibrationConfig(
            method=RangeMethod(s["calibrator"]),
            percentile=s["percentile"],
            limit=s["calib_limit"],
            image_preset=s["calib_preset"],
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
        paths = {name: self.final / file for name, file in _ROLES.items()}
        if s["integer"] or s["target"] is not None:
            paths["integer"] = self.final / "model.int.onnx"
        if allocation is not None:
            report["allocation"] = allocation.info
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
            calib_preset=s["calib_preset"],
            calib_limit=s["calib_limit"],
            pin=s["pin"],
            exclude=s["exclude"],
            integer=s["integer"],
            target=s["target"],
            eval_limit=s["eval_limit"],
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
_ROLES = {
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
    calibrator: str = "percentile",
    calib_preset: str | None = None,
    calib_limit: int | None = None,
    pin: Sequence[str] = (),
    exclude: Sequence[str] = (),
    integer: bool = False,
    target: str | None = None,
    eval_limit: int | None = None,
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
        pins=tuple(pin),
        exclude=tuple(exclude),
        runs_on=tuple(runs_on),
        latency_table=search.latency_table,
        memory_plan=search.memory_plan,
    )
    return MixedPrecisionOptions(
        allocation,
        calibrator=RangeMethod(calibrator),
        calib_preset=calib_preset,
        calib_limit=calib_limit,
        analysis_samples=search.analysis_samples,
        compensation=compensation,
        act_signed=act_dtype == "int8",
        eval_limit=eval_limit,
        workers=search.workers,
        ray_address=search.ray_address,
    )


def layer_ids(model: ModelInput) -> list[str]:
    """The ids of ``model``'s weighted layers, as ``exclude`` / ``pin`` / plans name them."""
    from dyadiq.frontends.onnx_frontend import load_onnx

    with contextlib.ExitStack() as stack:
        _, path = _source(model, stack)
        return [node.name for node in load_onnx(path).weighted_layers()]


__all__ = [
    "QuantizedModel",
    "SearchOptions",
    "TargetOptions",
    "layer_ids",
    "match_layers",
    "mixed_precision_options",
    "quantize",
]
