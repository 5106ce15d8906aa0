"""dyadiq as TVM module passes, for users who build their own Relax pipeline.

    seq = tvm.transform.Sequential([
        dyadiq.tvm_passes.AnalyzeSensitivity(calibration),          # attaches a report
        dyadiq.tvm_passes.QuantizeToInteger(calibration, plan=plan), # float main -> integer main
    ])
    mod = seq(mod)

Both passes read the float ``main`` through the Relax frontend (so exactly the models and
checks of ``dyadiq quantize``) and leave the module's other functions alone.
``QuantizeToInteger`` replaces ``main`` by the integer-only function the TVM backend lowers
(:mod:`dyadiq.backends.tvm.lower`): same float inputs, batch fixed, and a tuple of the
outputs' integer codes followed by the dequantized float outputs. It refuses (with the op
list) a model whose integer program would keep float islands, instead of silently falling
back to float. Results travel as module attributes (JSON strings): ``dyadiq.sensitivity``
and ``dyadiq.plan``. A pass only rewrites; compiling and checking the result bit for bit
against the reference interpreter is the backend's job (``dyadiq.backends.tvm.build``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm

from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.frontends.relax_frontend import relax_to_onnx
from dyadiq.integer_program import IntegerProgram
from dyadiq.passes.integerize import integerize
from dyadiq.passes.sensitivity.analysis import SensitivityConfig, analyze_cached, output_kind_of
from dyadiq.pipeline import CalibrationConfig, quantize_graph
from dyadiq.plan import PrecisionPlan

Batches = Sequence[Mapping[str, np.ndarray]]


def _float_graph(mod: tvm.IRModule, params: Mapping[str, np.ndarray] | None) -> Any:
    return load_onnx(relax_to_onnx(mod, params))


def _with_attrs(mod: tvm.IRModule, attrs: Mapping[str, str]) -> tvm.IRModule:
    for key, value in attrs.items():
        mod = mod.with_attr(key, value)
    return mod


@tvm.transform.module_pass(opt_level=0, name="dyadiq.AnalyzeSensitivity")
class AnalyzeSensitivity:
    """Per-layer sensitivity of the float ``main`` (cached on disk), as ``dyadiq.sensitivity``."""

    def __init__(
        self,
        calibration: Batches,
        *,
        config: SensitivityConfig = SensitivityConfig(),
        params: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.calibration = list(calibration)
        self.config = config
        self.params = params

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        graph = _float_graph(mod, self.params)
        kind = output_kind_of(graph, self.calibration)
        report, _ = analyze_cached(graph, self.calibration, kind, self.config)
        return _with_attrs(mod, {"dyadiq.sensitivity": json.dumps(report.to_json())})


def integer_program_of(
    mod: tvm.IRModule,
    calibration: Batches,
    *,
    plan: PrecisionPlan | None = None,
    weight_bits: int = 8,
    act_bits: int = 8,
    config: CalibrationConfig = CalibrationConfig(),
    params: Mapping[str, np.ndarray] | None = None,
) -> tuple[IntegerProgram, PrecisionPlan]:
    """The verified-able integer program of a float Relax ``main`` under ``plan``."""
    graph = _float_graph(mod, params)
    if plan is None:
        plan = PrecisionPlan.uniform(graph, weight_bits=weight_bits, act_bits=act_bits)
    plan.validate_for(graph)
    result = quantize_graph(graph, plan, list(calibration), config)
    program = integerize(result.graph, result.plan, result.sites, result.qdq.act_params)
    return program, plan


def quantize_relax_module(
    mod: tvm.IRModule,
    calibration: Batches,
    *,
    plan: PrecisionPlan | None = None,
    weight_bits: int = 8,
    act_bits: int = 8,
    config: CalibrationConfig = CalibrationConfig(),
    params: Mapping[str, np.ndarray] | None = None,
) -> tvm.IRModule:
    """What :class:`QuantizeToInteger` does, as a function that raises dyadiq's typed errors
    (inside a TVM pass they reach the caller as TVM's ``RuntimeError`` with the same text)."""
    from dyadiq.backends.tvm.lower import lower_program

    program, plan = integer_program_of(
        mod,
        calibration,
        plan=plan,
        weight_bits=weight_bits,
        act_bits=act_bits,
        config=config,
        params=params,
    )
    lowered = lower_program(program)  # refuses float islands, listing them
    others = {gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    out = tvm.IRModule(others, attrs=mod.attrs)  # keeps what earlier passes attached
    out["main"] = lowered["main"]
    return _with_attrs(out, {"dyadiq.plan": json.dumps(plan.to_json())})


@tvm.transform.module_pass(opt_level=0, name="dyadiq.QuantizeToInteger")
class QuantizeToInteger:
    """Replace the float ``main`` by its dyadic integer-only version (see the module doc)."""

    def __init__(
        self,
        calibration: Batches,
        *,
        plan: PrecisionPlan | None = None,
        weight_bits: int = 8,
        act_bits: int = 8,
        config: CalibrationConfig = CalibrationConfig(),
        params: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.calibration = list(calibration)
        self.options: dict[str, Any] = {
            "plan": plan,
            "weight_bits": weight_bits,
            "act_bits": act_bits,
            "config": config,
            "params": params,
        }

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return quantize_relax_module(mod, self.calibration, **self.options)
