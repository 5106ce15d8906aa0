"""TVM libraries cross-compiled for aarch64 Linux, run under qemu-user, bit-exact.

The runtime comes from ``scripts/setup_aarch64.sh`` (CI runs it); when it is missing every test
here fails with that command in the message rather than skipping. A small Relax module with
the integer requantization chain of the integer backends (int8 conv2d with int32 accumulation,
int64 multiply, rounding add, arithmetic right shift, clip, int8 cast) is compiled for
``aarch64-linux-gnu`` + NEON and for the host; both must equal a numpy int64 model of the
same arithmetic bit for bit. Then the zoo's Fashion-MNIST CNN, W8A8 and mixed W4/W8, lowered
by ``tvm.lower`` and built by ``tvm.build`` for aarch64, must reproduce the reference
interpreter's output codes and float logits exactly on 25 real test images (one emulator
launch per model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from dyadiq.backends.tvm.aarch64 import (
    SETUP_COMMAND,
    Aarch64RunError,
    Aarch64RuntimeMissingError,
    aarch64_runtime_available,
    locate_aarch64_runtime,
    run_many_under_qemu,
    run_model_folder_under_qemu,
    run_under_qemu,
)

if TYPE_CHECKING:
    import tvm

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
ELF_MACHINE_AARCH64 = 183
SHIFT = 20
INPUT_SHAPE = (1, 3, 12, 12)
CHANNELS = 8


@pytest.fixture(scope="module", autouse=True)
def _require_runtime() -> None:
    """Fail (not skip) with the setup command when the emulated runtime is missing."""
    locate_aarch64_runtime()


class SmallRequantModule:
    """Weights and multipliers of the small module, and its numpy int64 semantics."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.weight = rng.integers(-128, 128, (CHANNELS, INPUT_SHAPE[1], 3, 3), dtype=np.int8)
        # Per-channel dyadic multipliers m / 2^SHIFT, sized so that typical accumulators land
        # inside int8 and the extremes clip on both sides.
        self.multiplier = rng.integers(1 << 10, 1 << 12, (1, CHANNELS, 1, 1)).astype(np.int64)

    def relax_module(self) -> tvm.IRModule:
        from tvm import relax

        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(INPUT_SHAPE, "int8"))
        with bb.function("main", [x]):
            with bb.dataflow():
                acc = bb.emit(
                    relax.op.nn.conv2d(
                        x, relax.const(self.weight, "int8"), padding=1, out_dtype="int32"
                    )
                )
                wide = bb.emit(relax.op.astype(acc, "int64"))
                scaled = bb.emit(relax.op.multiply(wide, relax.const(self.multiplier, "int64")))
                half = relax.const(np.int64(1 << (SHIFT - 1)), "int64")
                rounded = bb.emit(relax.op.add(scaled, half))
                shifted = bb.emit(
                    relax.op.right_shift(rounded, relax.const(np.int64(SHIFT), "int64"))
                )
                clipped = bb.emit(relax.op.clip(shifted, -128, 127))
                codes = bb.emit(relax.op.astype(clipped, "int8"))
                out = bb.emit_output(relax.Tuple([codes, acc]))
            bb.emit_func_output(out)
        return bb.get()

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int8 codes, int32 accumulator) computed in numpy int64."""
        padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
        acc = np.einsum("nchwij,ocij->nohw", windows, self.weight.astype(np.int64))
        shifted = (acc * self.multiplier + (1 << (SHIFT - 1))) >> SHIFT  # numpy >> floors
        codes = np.clip(shifted, -128, 127).astype(np.int8)
        return codes, acc.astype(np.int32)


@pytest.fixture(scope="module")
def small() -> SmallRequantModule:
    return SmallRequantModule()


@pytest.fixture(scope="module")
def small_library(small: SmallRequantModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tvm
    from tvm.support import cc

    executable = tvm.compile(small.relax_module(), target=tvm.target.Target(AARCH64_TARGET))
    path = tmp_path_factory.mktemp("aarch64") / "small.so"
    executable.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
    return path


def _inputs(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    extremes = [np.full(INPUT_SHAPE, -128, np.int8), np.full(INPUT_SHAPE, 127, np.int8)]
    randoms = [rng.integers(-128, 128, INPUT_SHAPE, dtype=np.int8) for _ in range(count - 2)]
    return extremes + randoms


def _host_outputs(small: SmallRequantModule, inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(small.relax_module(), target="llvm"), tvm.cpu())
    return [[t.numpy() for t in vm["main"](tvm.runtime.tensor(x))] for x in inputs]


def test_library_is_an_aarch64_elf(small_library: Path) -> None:
    header = small_library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == ELF_MACHINE_AARCH64


def test_small_requant_module_bit_exact_vs_numpy_and_host(
    small: SmallRequantModule, small_library: Path
) -> None:
    inputs = _inputs(24)
    emulated = run_many_under_qemu(small_library, [{"x": x} for x in inputs])
    host = _host_outputs(small, inputs)
    assert len(emulated) == len(inputs)
    all_codes = []
    largest_acc = 0
    for x, on_arm, on_host in zip(inputs, emulated, host, strict=True):
        codes, acc = small.reference(x)
        assert [a.dtype for a in on_arm] == [np.dtype(np.int8), np.dtype(np.int32)]
        assert np.array_equal(on_arm[0], codes)
        assert np.array_equal(on_arm[1], acc)
        assert np.array_equal(on_host[0], codes)
        assert np.array_equal(on_host[1], acc)
        all_codes.append(codes)
        largest_acc = max(largest_acc, int(np.abs(acc.astype(np.int64)).max()))
    # The check is only as good as the values it sees: accumulators beyond int16 (a narrowing
    # NEON kernel would wrap), both clip limits, and mostly unclipped codes.
    assert largest_acc > 1 << 16
    stacked = np.stack(all_codes)
    assert stacked.min() == -128 and stacked.max() == 127
    assert np.count_nonzero((stacked > -128) & (stacked < 127)) > stacked.size // 2


def test_single_feed(small: SmallRequantModule, small_library: Path) -> None:
    x = _inputs(3)[2]
    codes, acc = small.reference(x)
    out = run_under_qemu(small_library, {"x": x})
    assert len(out) == 2
    assert np.array_equal(out[0], codes) and np.array_equal(out[1], acc)


def test_wrong_input_name_is_a_typed_error(small_library: Path) -> None:
    with pytest.raises(Aarch64RunError, match=r"missing \['x'\], unknown \['y'\]"):
        run_under_qemu(small_library, {"y": np.zeros(INPUT_SHAPE, np.int8)})


def test_missing_runtime_names_the_setup_command(
    small_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYADIQ_CACHE", str(tmp_path / "empty-cache"))
    assert not aarch64_runtime_available()
    with pytest.raises(Aarch64RuntimeMissingError, match=SETUP_COMMAND):
        run_under_qemu(small_library, {"x": np.zeros(INPUT_SHAPE, np.int8)})


def test_missing_library_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(Aarch64RunError, match="no library"):
        run_under_qemu(tmp_path / "absent.so", {"x": np.zeros(INPUT_SHAPE, np.int8)})


# --- real model: the fashion CNN lowered by the TVM backend, on real test images ----------------

REAL_INPUTS = 25


@pytest.fixture(scope="module")
def fashion() -> tuple[Any, list[dict[str, np.ndarray]], np.ndarray]:
    """(zoo artifacts, REAL_INPUTS single-image feeds spread over the test set's first 500
    images, their labels)."""
    from dyadiq import zoo

    artifacts = zoo.get("fashion_cnn")
    feeds, labels = next(iter(artifacts.evaluation_batches(500)))
    name = next(iter(feeds))
    picks = np.arange(REAL_INPUTS) * 20
    assert labels is not None
    return artifacts, [{name: feeds[name][i : i + 1]} for i in picks], labels[picks]


def _fashion_program(artifacts: Any, plan_of: Callable[[Any], Any]) -> tuple[Any, Any]:
    """(integer program, plan) of ``plan_of(graph)``, calibrated on the zoo's calibration set."""
    from dyadiq.frontends.onnx_frontend import load_onnx
    from dyadiq.passes.integerize import integerize
    from dyadiq.pipeline import quantize_graph

    graph = load_onnx(artifacts.model_path)
    result = quantize_graph(graph, plan_of(graph), list(artifacts.calibration_batches()))
    program = integerize(result.graph, result.plan, result.sites, result.qdq.act_params)
    return program, result.plan


def _uniform_w8(graph: Any) -> Any:
    from dyadiq.plan import PrecisionPlan

    return PrecisionPlan.uniform(graph, weight_bits=8, act_bits=8)


def _mixed_w4_w8(graph: Any) -> Any:
    """First and last layer at 8 bits, the middle ones at 4 (activations 8)."""
    from dyadiq.plan import LayerFormat, PrecisionPlan

    layers = [n.name for n in graph.weighted_layers()]
    last = len(layers) - 1
    return PrecisionPlan(
        {name: LayerFormat(8 if i in (0, last) else 4, 8) for i, name in enumerate(layers)}
    )


@pytest.mark.realmodel
@pytest.mark.parametrize(
    ("plan_of", "weight_bits"),
    [(_uniform_w8, {8}), (_mixed_w4_w8, {4, 8})],
    ids=["w8a8", "mixed_w4_w8"],
)
def test_fashion_cnn_on_aarch64_bit_exact_with_the_reference(
    fashion: tuple[Any, list[dict[str, np.ndarray]], np.ndarray],
    plan_of: Callable[[Any], Any],
    weight_bits: set[int],
    tmp_path: Path,
) -> None:
    from dyadiq.backends.tvm.build import build
    from dyadiq.backends.tvm.lower import CODES_SUFFIX, lower_program
    from dyadiq.reference_interpreter import ReferenceInterpreter

    artifacts, feeds, labels = fashion
    program, plan = _fashion_program(artifacts, plan_of)
    assert {f.weight_bits for f in plan.layers.values()} == weight_bits
    assert not program.float_ops
    build(lower_program(program), "aarch64", tmp_path / "tvm", program=program)
    emulated = run_model_folder_under_qemu(tmp_path / "tvm", feeds)

    reference = ReferenceInterpreter(program)
    (output,) = program.outputs
    predictions = []
    for feed, outputs in zip(feeds, emulated, strict=True):
        env = reference.run(feed)
        assert sorted(outputs) == sorted([output + CODES_SUFFIX, output])
        expected = {output + CODES_SUFFIX: env[program.int_outputs[output]], output: env[output]}
        for name, value in outputs.items():
            assert value.dtype == expected[name].dtype, name
            assert np.array_equal(value, expected[name]), name
        predictions.append(int(np.argmax(outputs[output])))
    # Bit-exact on inputs that matter: a working classifier, not a constant output.
    assert np.mean(np.array(predictions) == labels) >= 0.8
    assert len(set(predictions)) >= 5


def _model_json(folder: Path, target_name: str) -> Path:
    """A model.json as backends.tvm.build.build writes it, for the checks made before any launch."""
    import json

    folder.mkdir()
    info = {
        "library": "model.so",
        "target_name": target_name,
        "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "dtype": "float32"}],
        "outputs": [{"name": "logits_codes", "shape": [1, 10], "dtype": "uint8"}],
    }
    (folder / "model.json").write_text(json.dumps(info))
    return folder


def test_model_folder_feeds_are_checked_before_launch(tmp_path: Path) -> None:
    folder = _model_json(tmp_path / "model", "aarch64")
    with pytest.raises(Aarch64RunError, match=r"shape \[1, 28, 28\], the model takes"):
        run_model_folder_under_qemu(folder, [{"input": np.zeros((1, 28, 28), np.float32)}])
    with pytest.raises(Aarch64RunError, match=r"feed 0 names \['x'\]"):
        run_model_folder_under_qemu(folder, [{"x": np.zeros((1, 1, 28, 28), np.float32)}])


def test_model_folder_for_another_target_is_refused(tmp_path: Path) -> None:
    folder = _model_json(tmp_path / "model", "x86")
    with pytest.raises(Aarch64RunError, match="'x86', not aarch64"):
        run_model_folder_under_qemu(folder, [{"input": np.zeros((1, 1, 28, 28), np.float32)}])
