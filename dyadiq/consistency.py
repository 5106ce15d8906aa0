"""Checks that what ships is what was measured.

- ``bit_exactness``: the integer ONNX model in onnxruntime vs the reference interpreter, on
  real inputs, compared with ``np.array_equal`` on every integer tensor of the program (each
  exposed as an extra output) and on every model output. Both sides run float islands with
  onnxruntime's graph optimizations off: fusions across an island's boundary would change
  float rounding, which is exactly why islands are listed and not called integer.
- ``simulation_agreement``: the fake-quant QDQ model (what analysis and search measure) vs the
  integer model (what deploys): the largest output difference in output LSBs, and how often
  their top-1 decisions agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from dyadiq.integer_program import IntegerProgram
from dyadiq.reference_interpreter import ReferenceInterpreter


def session(model: onnx.ModelProto, *, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _with_integer_outputs(program: IntegerProgram, model: onnx.ModelProto) -> onnx.ModelProto:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    for name in program.quant:
        if name not in present:
            elem = onnx.TensorProto.INT8 if program.quant[name].signed else onnx.TensorProto.UINT8
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return augmented


def bit_exactness(
    program: IntegerProgram,
    int_model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, Any]:
    sess = session(_with_integer_outputs(program, int_model), optimize=False)
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
) -> dict[str, Any]:
    qdq, integer = session(qdq_model), session(int_model)
    outputs = program.outputs
    worst_lsb = 0.0
    agree = count = 0
    for feeds in batches:
        a = qdq.run(outputs, dict(feeds))
        b = integer.run(outputs, dict(feeds))
        for name, x, y in zip(outputs, a, b, strict=True):
            codes = program.int_outputs.get(name)
            if codes is not None:
                lsb = program.quant[codes].scale
                worst_lsb = max(worst_lsb, float(np.abs(x - y).max() / lsb))
            if x.ndim >= 2:
                agree += int((x.argmax(-1) == y.argmax(-1)).sum())
                count += int(np.prod(x.shape[:-1]))
    return {
        "max_output_diff_lsb": worst_lsb,
        "top1_agreement_qdq_vs_integer": agree / count if count else None,
        "compared_rows": count,
    }
