"""Checks that what ships is what was measured.

- ``bit_exactness``: the integer ONNX model in onnxruntime vs the reference interpreter, on
  real inputs, compared with ``np.array_equal`` on every integer tensor of the program (each
  exposed as an extra output) and on every model output. Both sides run float islands with
  onnxruntime's graph optimizations off: fusions across an island's boundary would change
  float rounding, which is exactly why islands are listed and not called integer.
- ``simulation_agreement``: the fake-quant QDQ model (what analysis and search measure) vs the
  integer model (what deploys): the largest output difference in output LSBs, and how often
  their top-1 decisions agree. The QDQ model runs as an exact simulation by default
  (``dyadiq.ort_sessions``); both sides are then the same arithmetic up to rounding order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from dyadiq.integer_program import IntegerProgram
from dyadiq.ort_sessions import Kernels, open_session
from dyadiq.reference_interpreter import ReferenceInterpreter


def _with_integer_outputs(program: IntegerProgram, model: onnx.ModelProto) -> onnx.ModelProto:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    for name in program.quant:
        if name not in present:
            elem = onnx.helper.np_dtype_to_tensor_dtype(program.code_dtype(name))
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return augmented


def bit_exactness(
    program: IntegerProgram,
    int_model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, Any]:
    sess = open_session(_with_integer_outputs(program, int_model))
    names = [o.name for o in sess.get_outputs()]
    reference = ReferenceInterpreter(program)
    exact = total = 0
    mismatches: list[str] = []
    for index, feeds in enumerate(batches):
        env = reference.run(feeds)
        for name, value in zip(names, sess.run(names, dict(feeds)), strict=True):
            key = program.int_outputs[name[: -len("_codes")]] if name.endswith("_codes") else name
            total += 1
            if np.array_equal(value, env[key]):
                exact += 1
            elif len(mismatches) < 5:
                diff = np.abs(value.astype(np.float64) - env[key].astype(np.float64)).max()
                mismatches.append(f"batch {index} tensor {name}: max |diff| {diff}")
    return {"exact_tensors": exact, "tensors": total, "mismatches": mismatches}


def simulation_agreement(
    program: IntegerProgram,
    qdq_model: onnx.ModelProto,
    int_model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    kernels: Kernels = Kernels.EXACT,
) -> dict[str, Any]:
    qdq = open_session(qdq_model, kernels=kernels)
    integer = open_session(int_model)
    outputs = program.outputs
    # An output without integer codes (a float island's) has no LSB: its difference is
    # reported in float units, never as a reassuring 0 LSB.
    worst_lsb: float | None = None
    worst_float = 0.0
    agree = count = 0
    for feeds in batches:
        a = qdq.run(outputs, dict(feeds))
        b = integer.run(outputs, dict(feeds))
        for name, x, y in zip(outputs, a, b, strict=True):
            diff = float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0
            codes = program.int_outputs.get(name)
            # wide (int32) codes, as an L2-normalised embedding's at 2^-24, are finer than any
            # quantizer of the QDQ model, whose output is float there: float units too
            if codes is not None and program.quant[codes].bits <= 8:
                lsb = diff / program.quant[codes].scale
                worst_lsb = lsb if worst_lsb is None else max(worst_lsb, lsb)
            else:
                worst_float = max(worst_float, diff)
            if x.ndim >= 2:
                agree += int((x.argmax(-1) == y.argmax(-1)).sum())
                count += int(np.prod(x.shape[:-1]))
    return {
        "max_output_diff_lsb": worst_lsb,
        "max_float_output_abs_diff": worst_float,
        "top1_agreement_qdq_vs_integer": agree / count if count else None,
        "compared_rows": count,
    }


def verification_problems(report: Mapping[str, Any]) -> list[str]:
    """Every bit-exactness failure recorded in a quantize ``report``, each with the tensors
    it concerns and the likely cause; empty when everything checked matched."""
    problems: list[str] = []
    exact = report.get("integer", {}).get("bit_exact_vs_reference")
    if exact and exact["exact_tensors"] != exact["tensors"]:
        problems.append(
            f"model.int.onnx in onnxruntime differs from the reference interpreter on "
            f"{exact['tensors'] - exact['exact_tensors']}/{exact['tensors']} tensors "
            f"({'; '.join(exact['mismatches'])}). Likely cause: an onnxruntime integer kernel "
            "that is not exact on this CPU (saturating int16 pair sums without VNNI) or a "
            "lowering bug; please report it with this report.json"
        )
    target = report.get("target", {})
    checked = target.get("bit_exact_vs_reference") if isinstance(target, Mapping) else None
    # builds with float islands may differ by a few codes (dyadiq.targets.ISLAND_CODE_TOLERANCE)
    tolerance = target.get("code_tolerance", 0) if isinstance(target, Mapping) else 0
    within = checked and 0 <= checked.get("max_code_diff", -1) <= tolerance
    # outputs a float island computes: within `tolerance` codes of an 8-bit tensor spanning
    # the output's range
    float_diff = checked.get("max_float_diff_of_range", 0.0) if checked else 0.0
    if checked and float_diff > tolerance / 255:
        problems.append(
            f"the {target.get('target')} build's float outputs differ from the reference "
            f"interpreter's by {float_diff:.2%} of their range (tolerance "
            f"{tolerance / 255:.2%}). Likely cause: a float island imported into TVM that "
            "computes something else than onnxruntime does; please report it"
        )
    if checked and checked.get("exact") != checked.get("inputs") and not within:
        problems.append(
            f"the {target.get('target')} build differs from the reference interpreter on "
            f"{checked['inputs'] - checked['exact']}/{checked['inputs']} check inputs "
            f"(inputs {checked.get('mismatched_inputs')}, output codes off by up to "
            f"{checked.get('max_code_diff')}"
            + (f", tolerance {tolerance} for its float islands" if tolerance else "")
            + "). Likely cause: a kernel of that backend "
            "(schedule, vector width or ISA) that does not compute the integer program "
            "exactly; please report it"
        )
    return problems
