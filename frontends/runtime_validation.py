"""Validate a model with onnxruntime and simplify it with onnxsim, in a forked child.

A model can pass ``onnx.checker`` and still be one onnxruntime refuses (opset 30, Softmax
axis 7, a zero kernel, mismatched Gemm dims, a wrong declared output type); found only at
calibration time, that surfaced as a raw onnxruntime traceback. So at load time, in this order:

1. ``onnxruntime session``: create a session (graph optimisation off, as calibration uses);
   a refusal is a :class:`ModelLoadError` quoting onnxruntime's reason;
2. ``onnxruntime trial run``: run it once on zeros; a failure with every input dim known and
   every input floating-point is the model's fault (refused); with dynamic dims (set to 1
   here) or integer inputs (whose zeros may be invalid values) it is only logged;
3. ``onnxsim`` (when simplifying): a failure keeps the model and notes it;
4. ``shape inference`` when onnxsim gave nothing.

All four run in one child forked by a clean helper process (:mod:`dyadiq.isolation_server`):
onnxsim's C++ code dies with SIGFPE on some models, and both libraries print tracebacks to the
terminal. A crash in
steps 1, 2 or 4 is a :class:`ModelLoadError` naming the step; a crash in onnxsim is a skipped
simplification (shape inference then runs in a fresh child). What the child printed goes to
the debug log.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dyadiq.errors import ModelLoadError
from dyadiq.forked import FORK_AVAILABLE, Ending, ForkedOutcome
from dyadiq.isolation_server import run_isolated

log = logging.getLogger(__name__)

STAGE_MARK = "dyadiq-stage: "
SESSION, TRIAL, ONNXSIM, SHAPES = (
    "onnxruntime session",
    "onnxruntime trial run",
    "onnxsim",
    "shape inference",
)
MODEL_FILE = "model.onnx"
# "module:function" taking a model and returning (model, verified), as onnxsim.simplify does;
# tests plant a crashing one here to prove a native crash cannot kill the caller.
SIMPLIFIER = "onnxsim:simplify"
TIMEOUT_ENV = "DYADIQ_LOAD_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Prepared:
    """What the child sends back: a refusal, or the prepared model and notes."""

    refusal: str | None = None
    model: bytes | None = None
    notes: tuple[str, ...] = ()


def onnxruntime_reason(exc: BaseException) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : 1 : FAIL :`` preamble."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).strip())
    return text if len(text) <= 600 else text[:600] + "..."


def _stage(name: str) -> None:
    print(STAGE_MARK + name, flush=True)


def _zero_feeds(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], bool]:
    """Zeros for every real input (dynamic dims -> 1), and whether a failure on them is the
    model's fault: every dim known and every input floating-point. An integer input may be a
    value the graph branches on or divides by (silero-vad's sample rate ``sr``: 0 takes an
    ``If`` branch that cannot run), so zeros there prove nothing about the model."""
    initializers = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    static = True
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dims = []
        for dim in tensor_type.shape.dim:
            known = dim.HasField("dim_value") and dim.dim_value > 0
            static = static and known
            dims.append(dim.dim_value if known else 1)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        static = static and np.issubdtype(dtype, np.floating)
        feeds[info.name] = np.zeros(dims, dtype)
    return feeds, static


def _simplifier(name: str) -> Callable[[onnx.ModelProto], tuple[onnx.ModelProto, bool]]:
    module, _, function = name.partition(":")
    found: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, bool]]
    found = getattr(importlib.import_module(module), function)
    return found


# What onnx's strict shape inference says when a declared shape (value_info, a graph output)
# contradicts what the ops compute. onnxruntime runs such a model, but every model written from
# it would carry the contradiction and fail onnx.checker, so it is refused at load.
_CONTRADICTION = "Inferred shape and existing shape differ"


def declared_shape_contradiction(model: onnx.ModelProto) -> str | None:
    """The reason to refuse a model whose declared shapes contradict its ops, else None.
    Other strict-inference failures (ops without a shape function, say) are not refusals, and
    neither are dims declared as -1 or 0 (exporters such as Paddle's write -1 for "dynamic")."""
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    graph = checked.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.ClearField("dim_value")
    try:
        onnx.shape_inference.infer_shapes(checked, strict_mode=True)
    except Exception as exc:  # InferenceError, or a checker error it wraps
        if _CONTRADICTION in str(exc):
            return (
                f"its declared tensor shapes contradict its ops: {str(exc).strip()[:400]} "
                "(fix or delete the wrong value_info / output shape)"
            )
    return None


def _prepare(
    model: onnx.ModelProto,
    *,
    runtime: bool,
    simplify: bool,
    data_prop: bool = True,
    simplifier: str = SIMPLIFIER,
) -> Prepared:
    """Steps 1-4 of the module docstring (runs in the child)."""
    import onnxruntime as ort

    notes: list[str] = []
    contradiction = declared_shape_contradiction(model)
    if contradiction is not None:
        return Prepared(refusal=contradiction)
    if runtime:
        _stage(SESSION)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            return Prepared(refusal=f"onnxruntime refuses it: {onnxruntime_reason(exc)}")
        _stage(TRIAL)
        feeds, decisive = _zero_feeds(model)
        try:
            session.run(None, feeds)
        except Exception as exc:
            reason = onnxruntime_reason(exc)
            if decisive:
                return Prepared(refusal=f"onnxruntime cannot run it on zeros: {reason}")
            log.debug("trial run on zeros (dynamic dims set to 1) failed: %s", reason)
    if simplify:
        _stage(ONNXSIM)
        try:
            simplified, ok = _simplifier(simplifier)(model)
            if ok:
                return Prepared(model=simplified.SerializeToString(), notes=tuple(notes))
            notes.append("onnxsim could not verify its result; used shape inference only")
        except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++ for many reasons
            notes.append(
                f"onnxsim failed ({type(exc).__name__}: {str(exc)[:300]}); "
                "used shape inference only"
            )
    _stage(SHAPES)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
    except Exception as exc:
        return Prepared(refusal=f"shape inference failed: {exc}")
    return Prepared(model=inferred.SerializeToString(), notes=tuple(notes))


def prepare_in_folder(
    folder: Path, *, runtime: bool, simplify: bool, data_prop: bool, simplifier: str
) -> Prepared:
    """The isolated entry point: ``folder/model.onnx`` through :func:`_prepare`."""
    model = onnx.load_from_string((folder / MODEL_FILE).read_bytes())
    return _prepare(
        model, runtime=runtime, simplify=simplify, data_prop=data_prop, simplifier=simplifier
    )


def _isolated(model_bytes: bytes, **flags: bool) -> ForkedOutcome:
    return run_isolated(
        __name__,
        prepare_in_folder.__name__,
        timeout_s=_timeout_s(),
        files={MODEL_FILE: model_bytes},
        simplifier=SIMPLIFIER,
        **flags,
    )


def _last_stage(output: str) -> str:
    marks = [line for line in output.splitlines() if line.startswith(STAGE_MARK)]
    return marks[-1][len(STAGE_MARK) :] if marks else "loading"


def _describe(outcome: ForkedOutcome) -> str:
    if outcome.ending is Ending.SIGNALLED:
        return f"crashed with {outcome.signal_name}"
    if outcome.ending is Ending.TIMED_OUT:
        return f"did not finish in {outcome.seconds:.0f} s"
    if outcome.ending is Ending.RAISED:
        return f"raised {outcome.error}"
    return f"exited with status {outcome.exit_code}"


def _timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def validate_and_simplify(
    model: onnx.ModelProto, where: str, *, simplify: bool, notes: list[str]
) -> onnx.ModelProto:
    """The model after steps 1-4 (see the module docstring); appends notes to ``notes``."""
    runtime = model.ByteSize() < 2**31 - 1  # onnxruntime takes serialized bytes up to 2 GB
    if not runtime:
        notes.append("over 2 GB: not validated with onnxruntime at load time")
    if not FORK_AVAILABLE or not runtime:  # no isolation: the same steps in-process
        prepared = _prepare(
            model, runtime=runtime, simplify=simplify, data_prop=simplify, simplifier=SIMPLIFIER
        )
    else:
        model_bytes = model.SerializeToString()
        outcome = _isolated(model_bytes, runtime=True, simplify=simplify, data_prop=simplify)
        if outcome.output.strip():
            log.debug("model validation child output:\n%s", outcome.output)
        if outcome.ending is not Ending.RETURNED:
            stage = _last_stage(outcome.output)
            if stage != ONNXSIM:
                raise ModelLoadError(f"{where}: {stage} {_describe(outcome)} on this model")
            notes.append(f"onnxsim {_describe(outcome)}; used shape inference only")
            log.warning(notes[-1])
            outcome = _isolated(model_bytes, runtime=False, simplify=False, data_prop=True)
            if outcome.ending is not Ending.RETURNED:
                stage = _last_stage(outcome.output)
                raise ModelLoadError(f"{where}: {stage} {_describe(outcome)} on this model")
        prepared = outcome.value
    if prepared.refusal is not None:
        raise ModelLoadError(f"{where}: {prepared.refusal}")
    for note in prepared.notes:
        notes.append(note)
        log.warning(note)
    assert prepared.model is not None  # every non-refusal carries the model
    return onnx.load_from_string(prepared.model)
