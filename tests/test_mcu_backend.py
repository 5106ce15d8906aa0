"""Microcontroller C backend: every op bit-exact with the reference interpreter under QEMU
(Cortex-M4 and M3), the static arena plan, and the two real models with mixed W4/W8 plans.

One synthetic program holds every kernel variant (signed and unsigned activations, padding,
strides, dilation, groups, depthwise, 1x1, int4 and int8 weights, broadcasting, per-channel
requantization), so a single ELF and a single QEMU boot per CPU check all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dyadiq import integer_program as ip
from dyadiq.backends.mcu.arena import plan_arena
from dyadiq.backends.mcu.build import ToolchainError, build, cpu_preset, find_toolchain, run_qemu
from dyadiq.backends.mcu.costs import allocator_memory_plan, flash_cost_table, layer_flash_bytes
from dyadiq.backends.mcu.emit_c import emit_c_project, pack_weights, unsupported_ops
from dyadiq.backends.mcu.target import MCU_TARGETS, mcu_target
from dyadiq.backends.target import EmitOptions
from dyadiq.dyadic import dyadic
from dyadiq.errors import ConfigError, UnsupportedModelError
from dyadiq.frontends.onnx_frontend import load_onnx
from dyadiq.passes.allocation import load_memory_plan
from dyadiq.plan import LayerFormat, PrecisionPlan
from dyadiq.quantizers import ActQuant
from dyadiq.reference_interpreter import ReferenceInterpreter

CPUS = ("cortex-m4", "cortex-m3")


def _has_toolchain() -> bool:
    try:
        find_toolchain(need_qemu=True)
    except ToolchainError:
        return False
    return True


needs_toolchain = pytest.mark.skipif(
    not _has_toolchain(),
    reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm",
)


# --- a synthetic program with every op ---------------------------------------------------------
class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.ops: list[ip.IntOp] = []
        self.quant: dict[str, ActQuant] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def tensor(self, name: str, shape: tuple[int, ...], *, signed: bool, zp: int) -> str:
        self.quant[name] = ActQuant(0.05, zp, 8, signed)
        self.shapes[name] = shape
        return name

    def requant(self, out: str, typical: float, channels: int = 1, axis: int = 1) -> ip.Requant:
        """Map accumulators of about ``typical`` magnitude onto ~60 codes, per channel."""
        real = 60.0 / typical * self.rng.uniform(0.5, 1.5, channels)
        mult, shift = dyadic(real)
        q = self.quant[out]
        return ip.Requant(mult, shift, q.zero_point, q.qmin, q.qmax, axis)

    def weights(self, shape: tuple[int, ...], bits: int) -> np.ndarray:
        limit = 2 ** (bits - 1) - 1
        return self.rng.integers(-limit, limit + 1, shape).astype(np.int8)

    def conv(self, name, x, cout, k, *, stride=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), group=1,
             bits=8, signed=False):  # fmt: skip
        n, cin, h, w = self.shapes[x]
        oh = (h + pads[0] + pads[2] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
        ow = (w + pads[1] + pads[3] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
        self.tensor(name, (n, cout, oh, ow), signed=signed, zp=-5 if signed else 20)
        weight = self.weights((cout, cin // group, *k), bits)
        bias = self.rng.integers(-500, 500, cout).astype(np.int32)
        taps = cin // group * k[0] * k[1]
        rq = self.requant(name, 60.0 * np.sqrt(taps) * 2 ** (bits - 2), cout)
        zx = self.quant[x].zero_point
        self.ops.append(
            ip.Conv(name, x, zx, weight, bias, stride, pads, dil, group, rq, weight_bits=bits)
        )
        return name


def synthetic_program(seed: int = 0) -> ip.IntegerProgram:
    b = _Builder(np.random.default_rng(seed))
    b.shapes["x"] = (1, 8, 10, 12)
    x = b.tensor("x_q", (1, 8, 10, 12), signed=True, zp=-3)
    b.quant[x] = ActQuant(2.0**-4, -3, 8, True)  # power-of-two scale: ties are exact
    b.ops.append(ip.QuantizeInput(x, "x"))
    c1 = b.conv("c1", x, 8, (3, 3), pads=(1, 1, 1, 1))
    c2 = b.conv("c2", x, 6, (3, 3), stride=(2, 2), pads=(1, 2, 0, 1), dil=(2, 1), group=2,
                bits=4, signed=True)  # fmt: skip
    c3 = b.conv("c3", x, 8, (5, 5), stride=(2, 1), pads=(2, 2, 2, 2), group=8, bits=4)
    c4 = b.conv("c4", c1, 6, (1, 1), bits=4, signed=True)  # unsigned in, int4, odd rows
    c5 = b.conv("c5", x, 8, (1, 1))  # signed in, int8, 1x1 with zero point folded
    c6 = b.conv("c6", c1, 4, (3, 3), bits=3)  # 3-bit codes in nibbles, no bias path below
    c7 = b.conv("c7", x, 32, (3, 3), pads=(1, 1, 1, 1), group=8)  # im2col, 9 taps: a tail
    g = b.tensor("g", (1, 8, 1, 1), signed=False, zp=0)
    b.ops.append(ip.GlobalAvgPool(g, c1, 20, b.requant(g, 120.0 * 70, 8)))
    hs = b.tensor("hs", (1, 8, 1, 1), signed=False, zp=0)
    rq_hs = ip.Requant(*dyadic(0.3), 0, 0, 200, 1)
    b.ops.append(ip.HardSigmoid(hs, g, 0, rq_hs, 100))
    m = b.tensor("m", (1, 8, 10, 12), signed=False, zp=3)
    b.ops.append(ip.Mul(m, (c1, hs), (20, 0), b.requant(m, 100.0 * 100, 8)))
    a = b.tensor("a", (1, 8, 10, 12), signed=True, zp=4)
    b.ops.append(ip.Add(a, (c1, g), (20, 0), (1 << 29, 3 << 28), (30, 31), 4, -128, 127))
    sw = b.tensor("sw", (1, 6, 10, 12), signed=False, zp=30)
    gm, gk = dyadic(0.05 * 2**10 / 6)
    b.ops.append(ip.HardSwish(sw, c4, -5, int(gm[0]), int(gk[0]), 10, b.requant(sw, 60 * 2**10)))
    sw2 = b.tensor("sw2", (1, 32, 10, 12), signed=True, zp=-7)  # large: a lookup table
    b.ops.append(ip.HardSwish(sw2, c7, 20, int(gm[0]), int(gk[0]), 10, b.requant(sw2, 60 * 2**10)))
    lr = b.tensor("lr", (1, 6, 10, 12), signed=True, zp=-10)
    nm, nk = dyadic(np.linspace(0.05, 0.3, 6))
    b.ops.append(ip.LeakyRelu(lr, c4, -5, b.requant(lr, 60.0), nm, nk))
    cl = b.tensor("cl", (1, 6, 10, 12), signed=True, zp=-5)
    b.ops.append(ip.Clip(cl, c4, -50, 60))
    mp = b.tensor("mp", (1, 8, 5, 6), signed=False, zp=20)
    b.ops.append(ip.MaxPool(mp, c1, (3, 3), (2, 2), (1, 1, 1, 1)))
    mp2 = b.tensor("mp2", (1, 6, 5, 6), signed=True, zp=-5)
    b.ops.append(ip.MaxPool(mp2, c4, (2, 2), (2, 2), (0, 0, 0, 0)))
    r = b.tensor("r", (1, 8, 120), signed=False, zp=20)
    b.ops.append(ip.Reshape(r, c1, (1, 8, 120)))
    t = b.tensor("t", (1, 10, 12, 8), signed=False, zp=20)
    b.ops.append(ip.Transpose(t, c1, (0, 2, 3, 1)))
    cc = b.tensor("cc", (1, 16, 10, 12), signed=False, zp=20)
    b.ops.append(ip.Concat(cc, (c1, c5), 1))
    mm = b.tensor("mm", (1, 8, 7), signed=True, zp=2)
    w4 = b.weights((120, 7), 4)
    rq_mm = b.requant(mm, 60 * 11 * 3, 7, axis=-1)
    b.ops.append(ip.MatMul(mm, r, 20, rq_mm, weight=w4, bias=None, weight_bits=4))
    rb = b.tensor("rb", (1, 120, 8), signed=False, zp=20)
    b.ops.append(ip.Reshape(rb, c5, (1, 120, 8)))
    ma = b.tensor("ma", (1, 8, 8), signed=False, zp=0)
    b.ops.append(ip.MatMul(ma, r, 20, b.requant(ma, 60 * 60 * 11, 8, axis=-1), weight_input=rb,
                           weight_zero_point=20))  # fmt: skip
    sq = b.tensor("sq", (1, 8, 7), signed=False, zp=9)  # per-channel along the last axis
    b.ops.append(ip.Mul(sq, (mm, mm), (2, 2), b.requant(sq, 60.0 * 60, 7, axis=-1)))
    sm = b.tensor("sm", (1, 8, 7), signed=False, zp=0)
    upscale = int(np.ceil(np.log2(0.05 * 2**10)))
    work = 0.05 / 2**upscale
    rq_sm = ip.Requant(*dyadic(1.0 / (2**16 * (1 / 255))), 0, 0, 255, -1)
    b.ops.append(
        ip.Softmax(
            sm,
            mm,
            upscale,
            int(np.log(2) / work),
            int(1.353 / work),
            int(0.344 / (0.3585 * work**2)),
            16,
            rq_sm,
        )
    )
    convs = [c1, c2, c3, c4, c5, c6, c7]
    outputs = [*convs, hs, m, a, sw, sw2, lr, cl, mp, mp2, t, cc, mm, ma, sq, sm]
    b.ops[[op.output for op in b.ops].index(c6)] = _without_bias(b.ops, c6)
    inputs = {"x": (np.dtype(np.float32), (1, 8, 10, 12))}
    return ip.IntegerProgram(b.ops, b.quant, b.shapes, inputs, outputs)


def _without_bias(ops: list[ip.IntOp], name: str) -> ip.Conv:
    conv = next(op for op in ops if isinstance(op, ip.Conv) and op.output == name)
    return ip.Conv(conv.output, conv.input, conv.input_zero_point, conv.weight, None,
                   conv.strides, conv.pads, conv.dilations, conv.group, conv.requant,
                   conv.weight_bits)  # fmt: skip


def synthetic_inputs(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, (n, 1, 8, 10, 12)).astype(np.float32)
    x[0] = (rng.integers(-40, 40, x[0].shape) + 0.5) / 16  # exact halves: round half to even
    x[1, 0, 0, 0, :4] = [1e6, -1e6, 8.03125, -8.09375]  # saturation at both ends
    return x


def _reference(program: ip.IntegerProgram, inputs: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The reference's integer codes of each output, keyed by code tensor, per input."""
    interpreter = ReferenceInterpreter(program)
    name = next(iter(program.inputs))
    codes = [program.int_outputs.get(o, o) for o in program.outputs]
    return [{c: env[c] for c in codes} for env in (interpreter.run({name: x}) for x in inputs)]


def _assert_bit_exact(project, run, references) -> None:
    device = project.decode_outputs(run.outputs)
    checked = 0
    for i, expected in enumerate(references):
        for spec in project.outputs:
            want = expected[spec.name].reshape(spec.shape)
            got = device[spec.name][i]
            assert got.dtype == want.dtype, spec.name
            assert np.array_equal(got, want), (spec.name, i)
            checked += 1
    assert checked == len(references) * len(project.outputs)


# --- memory plan ---------------------------------------------------------------------------------
def test_arena_never_overlaps_live_buffers_and_reports_its_gap_to_the_bound():
    program = synthetic_program()
    plan = plan_arena(program)
    assert plan.overlapping_live_pairs() == []
    assert plan.lower_bound_bytes <= plan.peak_bytes <= sum(b.size for b in plan.buffers.values())
    # Reshape outputs share their input's bytes; the input lives outside the arena.
    assert plan.aliases["r"] == "c1" and plan.offset_of("r") == plan.offset_of("c1")
    assert "x_q" in plan.external and "x_q" not in plan.buffers
    # g (not an output) lives from its writer to its last reader, the Add
    steps = [op.output for op in program.ops]
    assert (plan.buffers["g"].first_step, plan.buffers["g"].last_step) == (
        steps.index("g"),
        steps.index("a"),
    )
    # outputs live to the end: the final live set holds every output buffer
    assert {plan.aliases[o] for o in program.outputs} <= plan.live_sets[-1]


def test_arena_reuses_memory_along_a_chain():
    b = _Builder(np.random.default_rng(3))
    b.shapes["x"] = (1, 4, 8, 8)
    x = b.tensor("x_q", (1, 4, 8, 8), signed=False, zp=0)
    b.ops.append(ip.QuantizeInput(x, "x"))
    prev = x
    for i in range(6):
        prev = b.conv(f"c{i}", prev, 4, (3, 3), pads=(1, 1, 1, 1))
    program = ip.IntegerProgram(b.ops, b.quant, b.shapes, {"x": (np.float32, (1, 4, 8, 8))}, [prev])
    plan = plan_arena(program)
    # a chain needs two buffers at a time, whatever its length: ping-pong
    assert plan.peak_bytes == plan.lower_bound_bytes == 2 * 4 * 8 * 8
    assert plan.overlapping_live_pairs() == []


def test_int4_packing_and_flash_costs():
    codes = np.array([[-8, 7, -1, 0, 3]], dtype=np.int8)
    assert pack_weights(codes, 4).tolist() == [0x78, 0x0F, 0x03]
    assert pack_weights(codes, 8).tolist() == codes.reshape(-1).tolist()
    # each row starts on a byte: an odd row length leaves one spare nibble per row
    rows = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int8)
    assert pack_weights(rows, 4).tolist() == [0x21, 0x03, 0x54, 0x06]
    with pytest.raises(UnsupportedModelError):
        pack_weights(np.array([[9]], dtype=np.int8), 4)
    assert layer_flash_bytes(100, 10, 4) == 50 + 90
    assert layer_flash_bytes(100, 10, 8) == 100 + 90
    assert layer_flash_bytes(2 * 25, 2, 4) == 2 * 13 + 18


@needs_toolchain
def test_target_emit_writes_sources_elf_and_memory_plan(tmp_path):
    program = synthetic_program()
    artifact = mcu_target("m4").emit(program, tmp_path / "m4", EmitOptions())
    report = artifact.report
    assert artifact.elf is not None and artifact.elf.exists() and report["elf"] == str(artifact.elf)
    assert report["flash_bytes"] > artifact.project.weight_flash_bytes > 0
    assert report["static_ram_bytes"] >= report["arena_bytes"] > 0
    for name in ("model.c", "model.h", "dq_kernels.c", "Makefile", "link.ld"):
        assert (tmp_path / "m4" / name).exists()
    # build by-products stay in the scratch build: the folder holds sources and app.elf
    leftovers = [p.name for p in (tmp_path / "m4").iterdir() if p.suffix in (".o", ".su")]
    assert leftovers == [] and not (tmp_path / "m4" / "size_probe.elf").exists()
    assert oct((tmp_path / "m4" / "app.elf").stat().st_mode & 0o111) != "0o0"
    # the memory plan the allocator's ram= budget reads: the arena's live sets, graph names
    memory = load_memory_plan(Path(report["memory_plan"]))
    assert memory.tensor_bytes is not None and memory.flash is None
    peak_live = max(sum(memory.tensor_bytes[t][8] for t in live) for live in memory.live_sets)
    assert peak_live == artifact.project.arena.lower_bound_bytes
    assert not any(t.endswith("_q") for live in memory.live_sets for t in live)


def test_missing_toolchain_names_the_debian_packages(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolchainError, match="gcc-arm-none-eabi libnewlib-arm-none-eabi"):
        find_toolchain(need_qemu=True)


def test_unsupported_programs_are_refused_with_reasons(tmp_path):
    program = synthetic_program()
    program.ops.insert(1, ip.Quantize("x_q2", "x"))
    assert any("Quantize" in p for p in unsupported_ops(program))
    with pytest.raises(UnsupportedModelError, match="cannot run"):
        emit_c_project(program, tmp_path / "p")
    with pytest.raises(ConfigError, match="unknown CPU"):
        cpu_preset("cortex-a53")
    assert cpu_preset("m4").qemu_machine == "mps2-an386"
    assert cpu_preset("cortex-m3").qemu_machine == "mps2-an385"


# --- every op under QEMU -------------------------------------------------------------------------
@needs_toolchain
@pytest.mark.parametrize("cpu", [t.name for t in MCU_TARGETS])  # M3, M4, M7, M55 (mps3-an547)
def test_every_op_bit_exact_under_qemu(tmp_path, cpu):
    program = synthetic_program()
    project = emit_c_project(program, tmp_path / cpu, cpu=cpu)
    model_c = (tmp_path / cpu / "model.c").read_text()
    assert "malloc" not in model_c
    assert "dq_lookup(" in model_c and "dq_hard_swish(" in model_c  # both HardSwish paths
    built = build(project, jobs=2)
    inputs = synthetic_inputs(6)
    run = run_qemu(project, built.app_elf, inputs, timeout_s=120)
    references = _reference(program, inputs)
    _assert_bit_exact(project, run, references)
    # the outputs are not degenerate: requantization produced a spread of codes
    for spec in project.outputs:
        values = np.stack([r[spec.name] for r in references])
        assert len(np.unique(values)) > 2, spec.name
    # int4 layers are stored packed: their flash is about half their weight count
    four_bit = [layer for layer in project.layers if layer.weight_bits <= 4]
    assert four_bit and all(layer.weight_bytes < 0.6 * _weight_count(program, layer.op)
                            for layer in four_bit)  # fmt: skip
    assert built.model_size.static_ram >= project.arena.peak_bytes


# --- real models -------------------------------------------------------------------------------
def _mixed_plan(model_path: Path) -> PrecisionPlan:
    layers = [n.name for n in load_onnx(model_path).weighted_layers()]
    # First and last layers at 8 bits, the others at 4: a mixed W4/W8 plan.
    return PrecisionPlan(
        {n: LayerFormat(8 if i in (0, len(layers) - 1) else 4, 8) for i, n in enumerate(layers)}
    )


def _real_inputs(artifacts, count: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for feeds, batch_labels in artifacts.evaluation_batches(count):
        x = next(iter(feeds.values()))
        images.extend(x[i : i + 1] for i in range(x.shape[0]))
        labels.extend(np.asarray(batch_labels).reshape(-1).tolist())
        if len(images) >= count:
            break
    return np.stack(images[:count]), np.array(labels[:count])


@needs_toolchain
@pytest.mark.realmodel
@pytest.mark.parametrize("model", ["fashion_cnn", "ppocr_cls"])
def test_real_model_mixed_plan_bit_exact_on_m4_and_m3(tmp_path, model):
    from dyadiq import zoo
    from dyadiq.pipeline import quantize

    artifacts = zoo.get(model)
    plan = _mixed_plan(artifacts.model_path)
    result = quantize(artifacts.model_path, tmp_path / "q", list(artifacts.calibration_batches()),
                      plan=plan, integer=True, check_batches=1)  # fmt: skip
    program = result.program
    assert program is not None
    assert {op.weight_bits for op in program.ops if isinstance(op, ip.Conv | ip.MatMul)} == {4, 8}
    inputs, labels = _real_inputs(artifacts, 20)
    assert len(inputs) == 20
    references = _reference(program, inputs)
    out_name = program.int_outputs[program.outputs[0]]
    reference_pred = np.array([r[out_name].reshape(-1).argmax() for r in references])
    for cpu in CPUS:
        project = emit_c_project(program, tmp_path / cpu, cpu=cpu)
        built = build(project, jobs=2)
        run = run_qemu(project, built.app_elf, inputs, timeout_s=150)
        _assert_bit_exact(project, run, references)
        device = project.decode_outputs(run.outputs)[out_name].reshape(20, -1)
        # codes are monotone in the real value: argmax of codes = the predicted class
        device_pred = device.astype(np.int32).argmax(axis=1)
        assert np.array_equal(device_pred, reference_pred)
        assert (device_pred == labels).mean() == (reference_pred == labels).mean()
    assert (reference_pred == labels).mean() >= 0.5  # real predictions, not noise
    # the flash table the allocator sees matches what the emitter wrote, byte for byte
    table = flash_cost_table(load_onnx(artifacts.model_path), list(set(plan.layers.values())))
    assert sum(table[layer][fmt] for layer, fmt in plan.layers.items()) == (
        project.weight_flash_bytes
    )
    four_bit = [layer for layer in project.layers if layer.weight_bits == 4]
    assert four_bit and all(layer.weight_bytes < layer.total for layer in four_bit)
    # and the allocator reads the same table and the arena's live sets through --memory-plan
    graph = load_onnx(artifacts.model_path)
    memory = allocator_memory_plan(program, graph, [LayerFormat(4, 8), LayerFormat(8, 8)])
    (tmp_path / "memory.json").write_text(json.dumps(memory))
    loaded = load_memory_plan(tmp_path / "memory.json")
    assert loaded.flash == flash_cost_table(graph, [LayerFormat(4, 8), LayerFormat(8, 8)])
    assert loaded.tensor_bytes is not None
    peak_live = max(sum(loaded.tensor_bytes[t][8] for t in live) for live in loaded.live_sets)
    assert peak_live == project.arena.lower_bound_bytes
    graph_tensors = set(graph.tensors())
    assert {t for live in loaded.live_sets for t in live} <= graph_tensors


def _weight_count(program: ip.IntegerProgram, tag: str) -> int:
    op = program.ops[int(tag.removeprefix("op"))]  # the emitter tags layers by op index
    assert isinstance(op, ip.Conv | ip.MatMul) and op.weight is not None
    return int(op.weight.size)
