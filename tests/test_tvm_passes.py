"""dyadiq's passes inside a TVM pipeline: a float Relax module in, an integer one out that
runs bit-exact with the reference interpreter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dyadiq.reference_interpreter import ReferenceInterpreter

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from dyadiq.errors import UnsupportedModelError  # noqa: E402
from dyadiq.passes.sensitivity.analysis import SensitivityConfig  # noqa: E402
from dyadiq.tvm_passes import (  # noqa: E402
    AnalyzeSensitivity,
    QuantizeToInteger,
    integer_program_of,
    quantize_relax_module,
)


def _float_module(rng: np.random.Generator, *, layer_norm: bool = False) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    w1 = relax.const(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32))
    b1 = relax.const(rng.normal(0, 0.1, (1, 8, 1, 1)).astype(np.float32))
    w2 = relax.const(rng.normal(0, 0.2, (32, 5)).astype(np.float32))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.add(relax.op.nn.conv2d(x, w1, padding=(1, 1, 1, 1)), b1))
            c = bb.emit(relax.op.nn.relu(c))
            p = bb.emit(relax.op.nn.max_pool2d(c, pool_size=(4, 4), strides=(4, 4)))
            f = bb.emit(relax.op.reshape(p, (1, 32)))
            if layer_norm:  # centring by the mean: no integer kernel (LayerNorm has one now)
                f = bb.emit(relax.op.subtract(f, relax.op.mean(f, axis=[-1], keepdims=True)))
            y = bb.emit_output(relax.op.matmul(f, w2))
        bb.emit_func_output(y)
    return bb.get()


def _calibration(rng: np.random.Generator, n: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def test_quantize_to_integer_pass_runs_bit_exact_on_tvm():
    rng = np.random.default_rng(0)
    mod, calibration = _float_module(rng), _calibration(rng)
    quantized = tvm.transform.Sequential(
        [
            AnalyzeSensitivity(calibration, config=SensitivityConfig(trace=False)),
            QuantizeToInteger(calibration, weight_bits=8),
        ]
    )(mod)
    report = json.loads(str(quantized.attrs["dyadiq.sensitivity"]))
    assert len(report["layers"]) == 2  # the conv and the matmul
    plan = json.loads(str(quantized.attrs["dyadiq.plan"]))
    assert plan["layers"]
    # the pass is deterministic: the same program as building it directly
    program, _ = integer_program_of(mod, calibration)
    reference = ReferenceInterpreter(program)
    ex = tvm.compile(quantized, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for feeds in _calibration(np.random.default_rng(1), 4):
        got = vm["main"](tvm.runtime.tensor(feeds["x"]))
        env = reference.run(feeds)
        (name,) = program.outputs
        assert np.array_equal(got[0].numpy(), env[program.int_outputs[name]])  # codes
        np.testing.assert_array_equal(got[1].numpy(), env[name])  # dequantized floats


def test_quantize_to_integer_refuses_float_islands():
    rng = np.random.default_rng(2)
    mod, calibration = _float_module(rng, layer_norm=True), _calibration(rng)
    with pytest.raises(UnsupportedModelError, match="ReduceMean"):
        quantize_relax_module(mod, calibration)
    # through TVM's pass machinery the same message arrives as TVM's RuntimeError
    with pytest.raises(RuntimeError, match="ReduceMean"):
        QuantizeToInteger(calibration)(mod)
