"""Activation ranges chosen by the whole quantized model's output, not per tensor.

The histogram rules (:mod:`observers`) pick each tensor's clipping range from that tensor's
values alone. What the deployed model pays is different: every 8-bit activation at once,
measured at the output. This pass starts from the histogram ranges and, one scale group at a
time, tries a few other ranges for the group and keeps the one that lowers the KL divergence
of the all-activations-quantized model's output to the float model's (label-free; weights stay
float, so the result is one set of ranges for every plan), on calibration batches only.

- Evaluator: the float model with a fake quantizer on every activation site, its scale, zero
  point, code range and an on/off switch per scale group fed as graph inputs, so one
  onnxruntime session evaluates any set of ranges (``x + on * (dq(q(x)) - x)``; ``Div``,
  ``Round`` (half to even) and clipping in float32, the same arithmetic as
  QuantizeLinear/DequantizeLinear). One evaluation is one forward pass over the batches.
- Order: each group's own damage first (the KL with only that group quantized; one
  evaluation per group), then coordinate descent over groups from the most damaging down,
  one candidate range at a time, within a fixed budget of evaluations.
- Candidates per group (a member's range from its own histogram, the group's the union, as
  ``group_quantizers`` makes it): percentiles 99.9 / 99.99 / 99.999, min/max, MSE-optimal,
  and the start range shrunk by :data:`SHRINK_FACTORS`.
- A candidate is kept only when it lowers the objective and, under a robust objective, leaves
  the mean KL at or below the start's (:attr:`RangeSearchOptions.mean_guard`), so the search
  ends above its start on neither: a trimmed or median objective alone ignores the samples a
  range makes worse (captcha_crnn: the trimmed mean fell while the mean calibration KL rose
  68%; with the guard it falls 25%, benchmarks/results/coverage.md).
- A group that holds a model output keeps its range: clipping what the user reads is not a
  quantization choice (on ppocr_cls the search clipped the output probabilities at 0.65).

Memory: one batch's activations inside onnxruntime, the float reference outputs, and the
histograms the calibration pass already holds. Cost: ``evaluations`` forward passes over the
scored batches (:attr:`RangeSearchReport.evaluations`, ``seconds``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dyadiq.errors import ConfigError
from dyadiq.graph import QGraph
from dyadiq.ort_sessions import Kernels, open_session
from dyadiq.passes.activation_sites import ActivationSites
from dyadiq.passes.calibration.observers import (
    RunningHistogram,
    minmax_range,
    mse_range,
    percentile_range,
)
from dyadiq.passes.sensitivity.analysis import detect_output_kind
from dyadiq.passes.sensitivity.perturbable_model import OutputKind, row_losses
from dyadiq.quantizers import activation_quant

Range = tuple[float, float]

PERCENTILES = (99.9, 99.99, 99.999)
SHRINK_FACTORS = (0.9, 0.8, 0.65, 0.5)
_SWITCHES = ("scale", "low", "high", "on")  # low/high: the code range minus the zero point
# a candidate must lower the loss by this fraction to be kept: below it, a change is the
# calibration batches' noise, and keeping it would only fit them
MIN_RELATIVE_GAIN = 1e-3


class Objective(StrEnum):
    """How the per-sample KLs of the scored batches become the one number the search lowers.

    - ``mean``: their mean (the sensitivity analysis' loss). A few samples whose KL is many
      times the rest decide it, and the search fits those samples (ppocr_cls: the unread
      batches' KL rose 32%).
    - ``trimmed``: the mean without the largest :data:`TRIM_FRACTION` of them.
    - ``median``: their median.
    - ``relative``: the mean of each sample's KL over its own KL at the start ranges (plus a
      floor), so every sample's relative improvement counts the same.
    """

    MEAN = "mean"
    TRIMMED = "trimmed"
    MEDIAN = "median"
    RELATIVE = "relative"


# the candidate budget measured for the default (benchmarks/results/compensation.md, follow-up
# of 2026-12-07 22:05: not worse on MobileNetV2, ppocr_cls and fashion_cnn, 770 forward passes
# on MobileNetV2); dyadiq.api / the CLI / MixedPrecisionOptions search by default, the
# lower-level pipeline.CalibrationConfig only when asked
DEFAULT_EVALUATIONS = 40
TRIM_FRACTION = 0.1
# the relative objective's floor, a fraction of the start's mean KL: a sample the start
# already keeps (KL ~ 0) must not turn a tiny absolute change into a huge ratio
RELATIVE_FLOOR = 0.1


@dataclass(frozen=True)
class RangeSearchOptions:
    """``evaluations``: candidate ranges the descent may score (0: off). ``samples``: how many
    leading calibration batches are scored. ``objective``: :class:`Objective`.
    ``screen_batches``: batches of the one-group-at-a-time damage that orders the groups.
    ``race_batches``: a candidate is first scored on this many batches and dropped unless it
    beats the current ranges there (0: every candidate on all batches).
    ``before_output_quantizer``: score the model output before its own quantizer (which the
    search never changes), not after it. ``mean_guard``: refuse a candidate that lowers the
    objective but leaves the mean KL of the scored samples above the start's."""

    evaluations: int = 0
    samples: int = 32
    # the measured cheap robust variant (compensation.md, follow-up of 2026-12-07 22:05):
    # MobileNetV2 770 forward passes instead of 2472 at the same or lower unread KL
    objective: Objective = Objective.TRIMMED
    screen_batches: int = 2
    race_batches: int = 8
    before_output_quantizer: bool = True
    mean_guard: bool = True

    def __post_init__(self) -> None:
        if self.evaluations < 0:
            raise ConfigError(f"--range-search needs a count >= 0, got {self.evaluations}")
        if self.samples < 1:
            raise ConfigError(f"range search needs at least 1 batch, got {self.samples}")
        if self.screen_batches < 1 or self.race_batches < 0:
            raise ConfigError(
                f"range search: screen_batches >= 1 and race_batches >= 0, got "
                f"{self.screen_batches} and {self.race_batches}"
            )

    @property
    def enabled(self) -> bool:
        return self.evaluations > 0


@dataclass
class GroupChange:
    tensors: list[str]
    before: Range
    after: Range
    rule: str  # which candidate won
    own_damage: float
    loss_after: float

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": self.tensors,
            "before": list(self.before),
            "after": list(self.after),
            "rule": self.rule,
            "own_damage": self.own_damage,
            "loss_after": self.loss_after,
        }


@dataclass
class RangeSearchReport:
    """What the search did: the loss (mean KL to float per output row) before and after,
    the objective it lowered before and after, evaluations spent, time, and every group whose
    range changed."""

    loss_before: float
    loss_after: float
    evaluations: int  # the descent's, each one forward pass per scored batch
    forward_passes: int  # screening included
    groups: int
    groups_searched: int
    batches: int
    seconds: float
    changes: list[GroupChange] = field(default_factory=list)
    objective: str = Objective.MEAN.value
    objective_before: float = 0.0
    objective_after: float = 0.0
    # candidates that lowered the objective but were refused: the mean KL rose above the start
    refused_by_mean_guard: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "evaluations": self.evaluations,
            "forward_passes": self.forward_passes,
            "groups": self.groups,
            "groups_searched": self.groups_searched,
            "batches": self.batches,
            "seconds": self.seconds,
            "objective": self.objective,
            "objective_before": self.objective_before,
            "objective_after": self.objective_after,
            "refused_by_mean_guard": self.refused_by_mean_guard,
            "changes": [c.to_json() for c in self.changes],
        }


class ActivationRangeEvaluator:
    """The float model with a switchable fake quantizer per scale group (module docstring);
    :meth:`loss` scores one set of group ranges on the batches."""

    def __init__(
        self,
        graph: QGraph,
        sites: ActivationSites,
        batches: Sequence[Mapping[str, np.ndarray]],
        kind: OutputKind | None = None,
        *,
        signed: bool = False,
        threads: int = 2,
        before_output_quantizer: bool = False,
    ) -> None:
        self.signed = signed
        self.before_output_quantizer = before_output_quantizer
        self.groups = sites.groups()
        self.bits = dict(sites.group_bits)
        self.batches = [dict(b) for b in batches]
        model = graph.to_onnx()
        self.output = model.graph.output[0].name
        self.quantized_output = self.output
        outputs = {o.name for o in model.graph.output}
        # the groups that hold a model output: their range is what the user reads, so the
        # search leaves it (clipping probabilities at 0.65 lowered ppocr_cls's KL)
        self.output_groups = {g for g, m in self.groups.items() if outputs & set(m)}
        added: list[onnx.NodeProto] = []
        for gid, members in self.groups.items():
            for s in _SWITCHES:
                dtype = onnx.TensorProto.BOOL if s == "on" else onnx.TensorProto.FLOAT
                model.graph.input.append(
                    onnx.helper.make_tensor_value_info(f"__rs{gid}_{s}", dtype, [])
                )
            for tensor in members:
                nodes, out = _fake_quant_nodes(tensor, f"__rs{gid}")
                for node in model.graph.node:
                    for j, name in enumerate(node.input):
                        if name == tensor:
                            node.input[j] = out
                added += nodes
                if tensor == self.output:
                    self.quantized_output = out
        model.graph.node.extend(added)
        if self.quantized_output != self.output:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(
                    self.quantized_output, onnx.TensorProto.FLOAT, None
                )
            )
        ordered = gs.import_onnx(model)
        ordered.toposort()
        # graph optimisation off: onnxruntime rewrites float ops differently per CPU, and the
        # search is sensitive to the last bits (MobileNetV2: start ranges scaled by 1 + 2^-22
        # move the mean KL 15% and the kept changes from 4 to 2); with the optimised kernels an
        # AVX2 and an AVX-512 machine scored ppocr_cls' candidates up to 16% apart, exact
        # kernels agree to 3e-16 (checked under qemu-x86_64 -cpu Haswell)
        self.session = open_session(gs.export_onnx(ordered), kernels=Kernels.EXACT, threads=threads)
        self.evaluations = 0
        self.forward_passes = 0
        off = {gid: None for gid in self.groups}
        self.reference = [self._run(b, off) for b in self.batches]
        # the loss the sensitivity analysis uses for this output (KL for classes)
        self.kind = kind if kind is not None else detect_output_kind(self.reference)
        self.rows = [int(np.prod(r.shape[:-1])) for r in self.reference]

    def rows_in(self, batches: int) -> int:
        """How many output rows (samples) the first ``batches`` batches hold."""
        return sum(self.rows[:batches])

    def _switches(self, ranges: Mapping[int, Range | None]) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for gid, r in ranges.items():
            q = activation_quant(*(r or (0.0, 1.0)), self.bits[gid], signed=self.signed)
            feeds[f"__rs{gid}_scale"] = np.array(q.scale, np.float32)
            feeds[f"__rs{gid}_low"] = np.array(q.qmin - q.zero_point, np.float32)
            feeds[f"__rs{gid}_high"] = np.array(q.qmax - q.zero_point, np.float32)
            feeds[f"__rs{gid}_on"] = np.array(r is not None)
        return feeds

    def _run(
        self, batch: Mapping[str, np.ndarray], ranges: Mapping[int, Range | None]
    ) -> np.ndarray:
        # the output's own quantizer is never searched: read before it, the loss is what the
        # searched ranges change, without the output rounding's fixed steps
        name = self.output if self.before_output_quantizer else self.quantized_output
        (out,) = self.session.run([name], {**batch, **self._switches(ranges)})
        return np.asarray(out)

    def sample_losses(
        self, ranges: Mapping[int, Range | None], batches: int | None = None
    ) -> np.ndarray:
        """Each output row's KL to float over the (first ``batches``) batches, with each
        group quantized on its range (None: that group in float)."""
        count = len(self.batches) if batches is None else min(batches, len(self.batches))
        self.evaluations += 1
        self.forward_passes += count
        rows = [
            row_losses(ref, self._run(b, ranges), self.kind)
            for ref, b in zip(self.reference[:count], self.batches[:count], strict=True)
        ]
        return np.concatenate([np.ravel(r) for r in rows])

    def loss(self, ranges: Mapping[int, Range | None], batches: int | None = None) -> float:
        """The mean of :meth:`sample_losses` (each batch weighs its rows)."""
        rows = self.sample_losses(ranges, batches)
        return float(np.mean(rows))


def _fake_quant_nodes(tensor: str, switches: str) -> tuple[list[onnx.NodeProto], str]:
    """``Where(on, Clip(Round(x / s), qmin - z, qmax - z) * s, x)``: QuantizeLinear then
    DequantizeLinear in five float32 ops (the zero point only shifts the clip bounds)."""
    make = onnx.helper.make_node
    p = f"{switches}_{tensor}"
    s = {k: f"{switches}_{k}" for k in _SWITCHES}
    nodes = [
        make("Div", [tensor, s["scale"]], [f"{p}_x"]),
        make("Round", [f"{p}_x"], [f"{p}_r"]),
        make("Clip", [f"{p}_r", s["low"], s["high"]], [f"{p}_c"]),
        make("Mul", [f"{p}_c", s["scale"]], [f"{p}_dq"]),
        make("Where", [s["on"], f"{p}_dq", tensor], [f"{p}_out"]),
    ]
    return nodes, f"{p}_out"


def group_range(ranges: Mapping[str, Range], members: Sequence[str]) -> Range:
    """The range a scale group is quantized on: the union of its members' (as
    ``group_quantizers`` makes it)."""
    return min(ranges[t][0] for t in members), max(ranges[t][1] for t in members)


def candidate_ranges(
    histograms: Mapping[str, RunningHistogram], members: Sequence[str], start: Range, bits: int
) -> dict[str, Range]:
    """The ranges tried for one scale group, by rule name, the start excluded and near
    duplicates (both ends within 0.5% of the span) dropped."""
    rules: dict[str, Range] = {}
    for p in PERCENTILES:
        rules[f"percentile {p}"] = _union(percentile_range(histograms[t], p) for t in members)
    rules["minmax"] = _union(minmax_range(histograms[t]) for t in members)
    rules["mse"] = _union(mse_range(histograms[t], bits) for t in members)
    for f in SHRINK_FACTORS:
        rules[f"start x {f}"] = (start[0] * f, start[1] * f)
    kept: dict[str, Range] = {}
    for rule, r in rules.items():
        seen = [start, *kept.values()]
        if not any(_close(r, other) for other in seen):
            kept[rule] = r
    return kept


def _union(ranges: Any) -> Range:
    ranges = list(ranges)
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _close(a: Range, b: Range) -> bool:
    span = max(max(a[1], 0.0) - min(a[0], 0.0), max(b[1], 0.0) - min(b[0], 0.0), 1e-12)
    # the quantizer always spans zero, so ends on the same side of it are what matter
    return (
        abs(min(a[0], 0.0) - min(b[0], 0.0)) <= 0.005 * span
        and abs(max(a[1], 0.0) - max(b[1], 0.0)) <= 0.005 * span
    )


def aggregate(rows: np.ndarray, start: np.ndarray, objective: Objective) -> float:
    """One number from per-sample losses ``rows`` (``start``: the same samples' losses at the
    start ranges, which the relative objective divides by)."""
    if objective is Objective.MEAN:
        return float(np.mean(rows))
    if objective is Objective.MEDIAN:
        return float(np.median(rows))
    if objective is Objective.TRIMMED:
        keep = len(rows) - math.floor(TRIM_FRACTION * len(rows))
        return float(np.mean(np.sort(rows)[:keep]))
    floor = RELATIVE_FLOOR * float(np.mean(start)) + 1e-12
    return float(np.mean((rows + floor) / (start + floor)))


@dataclass
class _Current:
    """The ranges the descent holds, their per-sample losses and their objective."""

    ranges: dict[int, Range]
    rows: np.ndarray
    value: float


def search_ranges(
    evaluator: ActivationRangeEvaluator,
    histograms: Mapping[str, RunningHistogram],
    ranges: Mapping[str, Range],
    evaluations: int,
    options: RangeSearchOptions | None = None,
    trace: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Range], RangeSearchReport]:
    """New per-tensor ranges (members of a changed group all get the group's range) and the
    report. ``evaluations`` bounds the candidate evaluations of the descent (each one forward
    pass per batch, fewer for a candidate dropped by the race); the screening adds one
    evaluation per group on ``screen_batches`` batches. ``trace``: a list that gets one entry
    per candidate scored (for benchmarks)."""
    options = options or RangeSearchOptions(evaluations=evaluations)
    objective = Objective(options.objective)
    start_time = time.perf_counter()
    groups = evaluator.groups
    passes_before = evaluator.forward_passes
    start = {g: group_range(ranges, m) for g, m in groups.items()}
    start_rows = evaluator.sample_losses(start)
    now = _Current(dict(start), start_rows, aggregate(start_rows, start_rows, objective))
    objective_before = now.value
    # the guard's bar: the start's mean, not the current one, so a step that lowers the mean
    # leaves room for a later one that trades a little of it for a typical sample's gain
    mean_bar = float(np.mean(start_rows)) if options.mean_guard else math.inf
    refused = 0
    # each group's own damage (on the first screen_batches batches: it only orders the
    # groups), most damaging first, in the objective's terms
    screen = min(options.screen_batches, len(evaluator.batches))
    screen_start = start_rows[: evaluator.rows_in(screen)]
    off: dict[int, Range | None] = dict.fromkeys(groups)
    damage = {
        g: aggregate(evaluator.sample_losses({**off, g: start[g]}, screen), screen_start, objective)
        for g in groups
    }
    order = sorted(
        (g for g in groups if g not in evaluator.output_groups), key=lambda g: -damage[g]
    )
    race = options.race_batches if 0 < options.race_batches < len(evaluator.batches) else 0
    race_rows = evaluator.rows_in(race) if race else 0
    spent = searched = 0
    changes: list[GroupChange] = []
    for rank, g in enumerate(order):
        if spent >= evaluations:
            break
        searched += 1
        chosen: tuple[str, Range] | None = None
        for rule, r in candidate_ranges(histograms, groups[g], start[g], evaluator.bits[g]).items():
            if spent >= evaluations:
                break
            spent += 1
            trial = {**now.ranges, g: r}
            entry: dict[str, Any] = {"group": g, "rank": rank, "rule": rule}
            if race:
                early = evaluator.sample_losses(trial, race)
                head = aggregate(early, start_rows[:race_rows], objective)
                bar = aggregate(now.rows[:race_rows], start_rows[:race_rows], objective)
                entry["race"] = head / max(bar, 1e-30)
                if not head < bar * (1.0 - MIN_RELATIVE_GAIN):
                    entry["kept"] = False
                    if trace is not None:
                        trace.append(entry)
                    continue
            rows = evaluator.sample_losses(trial)
            value = aggregate(rows, start_rows, objective)
            lower = value < now.value * (1.0 - MIN_RELATIVE_GAIN)
            mean = float(np.mean(rows))
            kept = lower and mean <= mean_bar
            refused += int(lower and not kept)
            entry.update(value=value / max(now.value, 1e-30), mean=mean, kept=kept)
            if trace is not None:
                trace.append(entry)
            if kept:
                now = _Current(trial, rows, value)
                chosen = (rule, r)
        if chosen is not None:
            changes.append(
                GroupChange(list(groups[g]), start[g], chosen[1], chosen[0], damage[g], now.value)
            )
    out = dict(ranges)
    for change in changes:
        out.update(dict.fromkeys(change.tensors, change.after))
    report = RangeSearchReport(
        float(np.mean(start_rows)),
        float(np.mean(now.rows)),
        spent,
        evaluator.forward_passes - passes_before,
        len(groups),
        searched,
        len(evaluator.batches),
        time.perf_counter() - start_time,
        changes,
        objective=objective.value,
        objective_before=objective_before,
        objective_after=now.value,
        refused_by_mean_guard=refused,
    )
    return out, report
