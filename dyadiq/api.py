"""``dyadiq.quantize``: the whole quantize run as one typed call, what ``dyadiq quantize`` runs.

model (+ calibration) -> [per-layer formats under a budget or accuracy tolerance] -> QDQ model,
plan, report (+ integer-only model) -> [compiled target, checked bit for bit] -> [held-out
evaluation] -> verification. Every step is a call into the module that owns it; this module
only orders them, stages the output folder (all or nothing) and returns what was made as a
:class:`QuantizedModel`. Its defaults are the command line's (a test keeps them equal).

The inputs are resolved and checked in :mod:`dyadiq.run_inputs`, the run itself is
:class:`dyadiq.quantize_run.QuantizeRun`, and the types it takes and returns live in
:mod:`dyadiq.quantized_model` (all re-exported here).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.backends.onnx.qdq import QDQStyle
from dyadiq.errors import ConfigError, VerificationError, listed
from dyadiq.passes.calibration.range_search import DEFAULT_EVALUATIONS
from dyadiq.passes.compensation.settings import DEFAULT_COMPENSATION
from dyadiq.plan import PrecisionPlan
from dyadiq.quantize_run import QuantizeRun, mixed_precision_options
from dyadiq.quantized_model import QuantizedModel, SearchOptions, TargetOptions
from dyadiq.run_inputs import (
    ModelInput,
    bound_model,
    calibration_source,
    check_output,
    data_problems,
    is_zoo,
    layer_ids,
    match_layers,
    model_source,
    option_conflicts,
    resolve_layers,
)


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
    calibrator: str = "auto",
    percentile: float = 99.99,
    range_search: int = DEFAULT_EVALUATIONS,
    calib_preset: str | None = None,
    calib_limit: int | None = None,
    compensate: str = DEFAULT_COMPENSATION,
    exclude: Sequence[str] = (),
    pin: Sequence[str] = (),
    plan: PrecisionPlan | str | os.PathLike[str] | None = None,
    integer: bool = False,
    strict_integer: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    bind: Mapping[str, Any] | None = None,
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
    ``bind``: inputs made constants before anything else (``{"sr": 16000}``: an input that
    selects an ``If`` branch, which then folds); the data then feeds the other inputs.
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
    problems = option_conflicts(budget, max_drop, plan, pin, style, integer, target, act_dtype)
    if bind and is_zoo(model):
        problems.append("--bind is for your own model: a zoo model's inputs are fixed")
    problems += input_problems(
        quality_inputs, zoo=is_zoo(model), max_drop=max_drop, calibration=calibration
    )
    if problems:
        problems += data_problems(model, quality_inputs, calib_preset)
        raise ConfigError(listed("bad options:", problems))
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
        inputs = [Path(p) for p in named if p is not None and not is_zoo(p)]
        check_output(final, inputs)  # before any work
        artifacts, model_path = model_source(model, stack)
        if bind:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="dyadiq_bound_"))
            model_path = bound_model(model_path, bind, Path(folder))
        if artifacts is not None:
            inputs.append(Path(artifacts.model_path))
        calibration = calibration_source(calibration, artifacts, calib_limit)
        excluded = resolve_layers(model_path, exclude, pin, input_shapes) if exclude or pin else ()
        from dyadiq.quality_sources import resolve

        quality = resolve(
            model_path,
            artifacts,
            quality_inputs,
            searching=max_drop is not None,
            image_preset=calib_preset,
            eval_limit=eval_limit,
        )
        run = QuantizeRun(
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
                range_search=range_search,
                calib_preset=calib_preset,
                calib_limit=calib_limit,
                compensate=compensate,
                exclude=tuple(sorted(excluded)),
                pin=tuple(pin),
                integer=integer,
                strict_integer=strict_integer,
                input_shapes=input_shapes,
                bind={k: np.asarray(v).tolist() for k, v in (bind or {}).items()},
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


__all__ = [
    "QuantizedModel",
    "SearchOptions",
    "TargetOptions",
    "layer_ids",
    "match_layers",
    "mixed_precision_options",
    "quantize",
]
