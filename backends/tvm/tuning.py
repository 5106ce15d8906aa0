"""Schedules for the fused PrimFuncs of a prepared (legalized + fused) Relax module.

TVM's default CPU pipeline does no scheduling: every kernel runs as the naive loop nest that
legalization wrote, 10-200x slower than a scheduled one. :func:`schedule_module` gives each
fused PrimFunc, in this order of preference:

1. the best record for that PrimFunc in a persistent MetaSchedule ``JSONDatabase`` (keyed by
   the PrimFunc's structural hash, so constants and names do not matter, only shapes and
   computation), applied with ``ms.tir_integration.compile_tir``;
2. if ``trials > 0``, a fresh MetaSchedule search (``ms.tune_tir``) whose records are committed
   to that database, so the next build reuses them (``tune_relax`` + ``compile_relax`` drop
   the records silently, see TVM-NOTES);
3. otherwise a hand-written default schedule (:func:`default_schedule`).

The default schedule, for a PrimFunc with one reduction block (conv, dense, pooling sum):
every elementwise epilogue block (bias, int64 requantization, clip, cast) is inlined into the
last one, which is computed at the tile of the reduction, so the int32 accumulator is a small
tile buffer instead of a full tensor; the reduction's spatial loops are split into an outer
part (fused and parallel) and an inner register tile (``reg`` rows of the largest other
spatial axis x ``vec`` lanes of the innermost spatial axis, vectorized), with the reduction
loops between them. Padding stays a separate, parallel block (inlining it puts a bounds test
in the innermost loop: 3-5x slower measured). A PrimFunc without a reduction is inlined into
its output block, whose loops are fused, parallel outside and vectorized inside. Schedules only
reorder loops: integer results are bit-identical to the unscheduled kernel (tested).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.sym import detect_linear_equation

from dyadiq.backends.tvm.x86_kernels import HAND_SCHEDULED, PARALLEL_MIN_WORK
from dyadiq.errors import ConfigError

log = logging.getLogger(__name__)

# tvm.tirx.IterVar kinds
_SPATIAL = 0
_REDUCE = 2
_DEFAULT_VECTOR_BITS = 512  # AVX-512, when no target says otherwise

# Loops with less work than this stay on one thread: waking the pool's threads costs more
# than a small kernel takes (same threshold as the hand-written kernels). An elementwise
# kernel does some ten int64 operations per element, hence its lower threshold.
_PARALLEL_MIN_WORK = PARALLEL_MIN_WORK
_PARALLEL_MIN_ELEMENTS = PARALLEL_MIN_WORK // 8

Progress = Callable[[int, int, str, str], None]


class NotSchedulableError(Exception):
    """A PrimFunc without the loop nest the default schedule handles (e.g. two reductions, as
    in a softmax): not an error for the user, it stays unscheduled and the report says why."""


@dataclass
class ScheduleReport:
    """Where each PrimFunc's schedule came from: database, tuned, default, or unscheduled."""

    source: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def count(self, source: str) -> int:
        return sum(1 for s in self.source.values() if s == source)


def log_progress(index: int, total: int, name: str, source: str) -> None:
    log.info("schedule %d/%d %s: %s", index + 1, total, name, source)


def _largest_divisor(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _iter_kinds(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def vector_bits(target: tvm.target.Target) -> int:
    """The SIMD register width the default schedule vectorizes for: 512 with AVX-512, 256
    with AVX2, else 128 (SSE, NEON). Wider vectors would still be correct (LLVM splits them),
    but every extra split register is an extra instruction in the inner loop."""
    if target.kind.name != "llvm":
        return 128
    for feature, bits in (("avx512f", 512), ("avx2", 256)):
        try:
            if tvm.target.codegen.target_has_features(feature, target):
                return bits
        except tvm.TVMError:  # not an x86 target
            break
    return 128


def _vector_lanes(sch: s_tir.Schedule, block: s_tir.SBlockRV, bits: int) -> int:
    dtype = sch.get(block).writes[0].source.dtype
    return max(1, bits // tvm.DataType(str(dtype)).bits)


def _unit_stride_reads(sch: s_tir.Schedule, block: s_tir.SBlockRV, axis: int) -> bool:
    """Whether every buffer the block reads moves by 0 or 1 element along iter var ``axis``
    (a stride-2 convolution reads every other input: vector lanes would become a gather)."""
    var = sch.get(block).iter_vars[axis].var
    for region in sch.get(block).reads:
        for dim in region.region:
            coefficients = detect_linear_equation(dim.min, [var])
            if len(coefficients) != 2:  # not linear in var
                return False
            step = coefficients[0]
            if not isinstance(step, tvm.tirx.IntImm) or int(step) not in (0, 1):
                return False
    return True


def _schedule_elementwise(sch: s_tir.Schedule, block: s_tir.SBlockRV, bits: int) -> None:
    """Fuse a complete block's loops; parallel outer part, vectorized inner part."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if not isinstance(sch.get(fused).extent, tvm.tirx.IntImm):
        return  # a symbolic extent (an island kernel TVM imported without static shapes)
    extent = int(sch.get(fused).extent)
    lanes = _largest_divisor(extent, _vector_lanes(sch, block, bits))
    if lanes > 1 and extent > lanes:
        outer, inner = sch.split(fused, [None, lanes])
        if extent >= _PARALLEL_MIN_ELEMENTS:
            sch.parallel(outer)
        sch.vectorize(inner)
    elif extent >= _PARALLEL_MIN_ELEMENTS:
        sch.parallel(fused)


def _schedule_reduction(
    sch: s_tir.Schedule,
    reduction: s_tir.SBlockRV,
    epilogue: s_tir.SBlockRV | None,
    *,
    reg: int,
    vec: int,
) -> None:
    kinds = _iter_kinds(sch, reduction)
    loops = sch.get_loops(reduction)
    n_spatial = kinds.count(_SPATIAL)
    if len(loops) != len(kinds) or kinds != sorted(kinds) or n_spatial == 0:
        raise NotSchedulableError(f"reduction loop nest is not spatial-then-reduce ({kinds})")
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    extents = [int(sch.get(loop).extent) for loop in spatial]
    lanes_used = _largest_divisor(extents[-1], vec)
    vec_outer, vec_inner = sch.split(spatial[-1], [None, lanes_used])
    outer = list(spatial[:-1])
    inner = [vec_inner]
    if outer:
        # The register tile's other axis: the largest remaining spatial one (output channels of
        # a conv), so that one vector of inputs feeds `reg` accumulators.
        axis = max(range(len(outer)), key=lambda i: extents[i])
        tile_outer, tile_inner = sch.split(
            outer[axis], [None, _largest_divisor(extents[axis], reg)]
        )
        outer[axis] = tile_outer
        inner = [tile_inner, vec_inner]
    sch.reorder(*outer, vec_outer, *reduce, *inner)
    parallel = sch.fuse(*outer, vec_outer) if outer else vec_outer
    work = int(np.prod(extents)) * int(np.prod([int(sch.get(loop).extent) for loop in reduce]))
    if work >= _PARALLEL_MIN_WORK:
        sch.parallel(parallel)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, parallel)
        if lanes_used > 1:
            sch.vectorize(sch.get_loops(epilogue)[-1])
    # Loop kinds before decompose_reduction: afterwards the update block has no init and
    # vectorize() refuses it.
    if lanes_used > 1 and _unit_stride_reads(sch, reduction, n_spatial - 1):
        sch.vectorize(inner[-1])
    else:
        sch.unroll(inner[-1])
    if len(inner) > 1:
        sch.unroll(inner[0])
    if reduce:
        sch.decompose_reduction(reduction, reduce[0])


def default_schedule(
    func: tvm.tirx.PrimFunc,
    *,
    reg: int = 8,
    vec: int | None = None,
    bits: int = _DEFAULT_VECTOR_BITS,
) -> tvm.tirx.PrimFunc:
    """The hand-written schedule described in the module docstring, vectorized for ``bits``-bit
    registers (:func:`vector_bits` of the target).

    Raises :class:`NotSchedulableError` (or a TVM error) when the PrimFunc does not have the
    expected shape (e.g. two reductions, as in a softmax); :func:`schedule_module` then keeps
    it unscheduled and says so in its report.
    """
    scheduled: tvm.tirx.PrimFunc = (
        _default_schedule(func, reg=reg, vec=vec, bits=bits)
        .mod["main"]
        .without_attr("global_symbol")
    )
    return scheduled


def _default_schedule(
    func: tvm.tirx.PrimFunc,
    *,
    reg: int = 8,
    vec: int | None = None,
    bits: int = _DEFAULT_VECTOR_BITS,
) -> s_tir.Schedule:
    # Blocks are fetched by name, not with get_child_blocks: a trace holding GetChildBlocks does
    # not replay in TVM 0.27 (GetLoops on its outputs fails), and database records are replays.
    probe = s_tir.Schedule(_copy(func).with_attr("global_symbol", "main"))
    names = [probe.get(b).name_hint for b in probe.get_child_blocks(probe.get_sblock("root"))]
    sch = s_tir.Schedule(_copy(func).with_attr("global_symbol", "main"))
    blocks = [sch.get_sblock(name) for name in names]
    reductions = [b for b in blocks if _REDUCE in _iter_kinds(sch, b)]
    if len(reductions) > 1:
        raise NotSchedulableError(f"{len(reductions)} reduction blocks; only one is handled")
    if not reductions:
        for block in blocks[:-1]:
            sch.compute_inline(block)
        _schedule_elementwise(sch, blocks[-1], bits)
        return sch
    reduction = reductions[0]
    position = [sch.get(b).name_hint for b in blocks].index(sch.get(reduction).name_hint)
    for producer in blocks[:position]:
        _schedule_elementwise(sch, producer, bits)
    consumers = blocks[position + 1 :]
    for block in consumers[:-1]:
        sch.compute_inline(block)
    epilogue = consumers[-1] if consumers else None
    lanes = vec if vec is not None else _vector_lanes(sch, reduction, bits)
    _schedule_reduction(sch, reduction, epilogue, reg=reg, vec=lanes)
    return sch


def _hand_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    """Kernels written loop by loop (:mod:`dyadiq.backends.tvm.x86_kernels`) stay as written."""
    return func.attrs is not None and HAND_SCHEDULED in func.attrs


def _copy(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A deep copy: a Schedule built on ``func.with_attr(...)`` edits the caller's PrimFunc in
    place in TVM 0.27 (the input module came back scheduled, and traces stopped replaying)."""
    copied: tvm.tirx.PrimFunc = tvm.ir.load_json(tvm.ir.save_json(func))
    return copied


def _workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The form MetaSchedule keys records by (a one-function module named main)."""
    return tvm.IRModule({"main": _copy(func).with_attr("global_symbol", "main")})


def _from_database(
    database: ms.database.Database, func: tvm.tirx.PrimFunc, target: tvm.target.Target
) -> tvm.tirx.PrimFunc | None:
    workload = _workload(func)
    if not database.has_workload(workload):
        return None
    sch = ms.tir_integration.compile_tir(database, workload, target)
    if sch is None:
        return None
    scheduled: tvm.tirx.PrimFunc = sch.mod["main"].without_attr("global_symbol")
    return scheduled


# Builder and runner work in fresh worker processes that import TVM first: on a loaded 2-core
# machine that alone exceeded MetaSchedule's 30 s default and every trial "timed out".
_WORKER_TIMEOUT_S = 300.0
# Below this many trials per PrimFunc, evolutionary search spends its time on the cost model and
# the population, not on measurements: sample schedules from the design space instead.
_EVOLUTIONARY_MIN_TRIALS = 32


def _tune(
    database: ms.database.Database,
    func: tvm.tirx.PrimFunc,
    target: tvm.target.Target,
    trials: int,
) -> None:
    small = trials < _EVOLUTIONARY_MIN_TRIALS
    with tempfile.TemporaryDirectory(prefix="dyadiq-tune-") as work_dir:
        ms.tune_tir(
            _workload(func),
            target,
            work_dir,
            max_trials_global=trials,
            num_trials_per_iter=min(trials, 64),
            builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=_WORKER_TIMEOUT_S),
            runner=ms.runner.LocalRunner(timeout_sec=_WORKER_TIMEOUT_S),
            database=database,
            strategy="replay-trace" if small else "evolutionary",
            cost_model="random" if small else "xgb",
            num_tuning_cores=1,
        )
    _commit_default_candidate(database, func, target)


def _commit_default_candidate(
    database: ms.database.Database, func: tvm.tirx.PrimFunc, target: tvm.target.Target
) -> None:
    """Record the default schedule next to the tuned ones, timed like MetaSchedule's runner
    (random inputs, 3 calls per measurement, at least 100 ms), so that the database's best
    record is never a sampled schedule that the runner measured slower than the default. The
    runner's verdict can still be wrong on real inputs: 4-trial records for fashion_cnn's two
    largest convs won here (108/184 us vs 238/313 us) yet made the model slower end to end
    (0.490 vs 0.286 ms), so benchmark a database before committing it."""
    try:
        sch = _default_schedule(func, bits=vector_bits(target))
    except (NotSchedulableError, s_tir.ScheduleError):
        return
    library = tvm.tirx.build(sch.mod, target)
    rng = np.random.default_rng(0)
    args = []
    for param in func.params:
        shape = [int(d) for d in param.shape]
        dtype = str(param.dtype)
        values = rng.integers(-100, 100, shape) if "int" in dtype else rng.standard_normal(shape)
        args.append(tvm.runtime.tensor(values.astype(dtype)))
    timer = library.time_evaluator("main", tvm.cpu(), number=3, repeat=1, min_repeat_ms=100)
    seconds = float(timer(*args).mean)
    entry = database.commit_workload(_workload(func))
    database.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, entry, [tvm.runtime.convert(seconds)], target)
    )


def _require_tunable(target: tvm.target.Target) -> None:
    if "num-cores" not in target.attrs:
        raise ConfigError(
            'MetaSchedule needs "num-cores" in the target, e.g. '
            '{"kind": "llvm", "mcpu": "znver4", "num-cores": 2}'
        )


def schedule_module_with_report(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    database_dir: Path | None = None,
    trials: int = 0,
    progress: Progress | None = log_progress,
) -> tuple[tvm.IRModule, ScheduleReport]:
    """:func:`schedule_module`, plus where each PrimFunc's schedule came from."""
    if trials < 0:
        raise ConfigError(f"tuning trials must be >= 0, got {trials}")
    if trials > 0 and database_dir is None:
        raise ConfigError("tuning needs a database folder to keep its records in")
    if trials > 0:
        _require_tunable(target)
    database = None
    if database_dir is not None:
        Path(database_dir).mkdir(parents=True, exist_ok=True)
        database = ms.database.JSONDatabase(work_dir=str(database_dir))
    prims = [
        (gv, f)
        for gv, f in mod.functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and not _hand_scheduled(f)
    ]
    untuned = [gv for gv, f in prims if database is None or not database.has_workload(_workload(f))]
    per_func_trials = trials // len(untuned) if untuned and trials else 0
    if trials and untuned and per_func_trials == 0:
        per_func_trials = 1
    report = ScheduleReport()
    out = tvm.IRModule(attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            out[gv] = func
        elif _hand_scheduled(func):
            out[gv] = func
            report.source[gv.name_hint] = "hand-written"
    for index, (gv, func) in enumerate(prims):
        name = gv.name_hint
        scheduled = None
        source = "database"
        if database is not None:
            # re-checked: an identical PrimFunc tuned earlier in this loop has its record now
            if per_func_trials and not database.has_workload(_workload(func)):
                if progress is not None:
                    progress(index, len(prims), name, f"tuning {per_func_trials} trials")
                _tune(database, func, target, per_func_trials)
                source = "tuned"
            scheduled = _from_database(database, func, target)
        if scheduled is None:
            try:
                scheduled = default_schedule(func, bits=vector_bits(target))
                source = "default"
            except (NotSchedulableError, s_tir.ScheduleError) as err:
                scheduled = func
                source = "unscheduled"
                report.notes[name] = str(err).strip().splitlines()[-1]
        report.source[name] = source
        if progress is not None:
            progress(index, len(prims), name, source)
        out[gv] = scheduled
    return out, report


def schedule_module(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    database_dir: Path | None = None,
    trials: int = 0,
    progress: Progress | None = log_progress,
) -> tvm.IRModule:
    """Schedule every PrimFunc of a prepared module: database record, else tune, else default.

    ``mod`` must already be legalized and fused (one PrimFunc per layer). ``trials`` is the
    tuning budget for the whole module, split evenly over the PrimFuncs that have no record
    yet; records go into ``database_dir`` and are reused by every later call.
    """
    scheduled, _ = schedule_module_with_report(
        mod, target, database_dir=database_dir, trials=trials, progress=progress
    )
    return scheduled
