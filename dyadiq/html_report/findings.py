"""What report.html says, computed from report.json (no HTML here): the headline quality
against float, the warnings a user should read before shipping, and the notes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dyadiq.html_report.markup import fmt_pct

# held-out metrics, most telling first: the zoo's primary metric (ZooModel.primary_metric)
HEADLINE_METRICS = ("mean_cosine", "accuracy", "top1_agreement")
QUALITY_DROP_WARNING = 0.01  # an absolute drop of the headline metric worth a warning (1 point)

# the difference is measured in float (output difference / output scale), so one LSB of
# rounding can read as 1.0000018 (fashion_cnn with searched ranges): not beyond rounding
LSB_MEASUREMENT_SLACK = 1e-4


@dataclass(frozen=True)
class Finding:
    text: str
    error: bool = False  # failed verification, not merely worth a look


@dataclass(frozen=True)
class Quality:
    metric: str
    model: str
    value: float
    reference: float
    samples: float | None

    @property
    def drop(self) -> float:
        return self.reference - self.value


def headline_quality(report: Mapping[str, Any], metric_name: str | None) -> list[Quality]:
    """Each of dyadiq's evaluated models (onnxruntime's own quantizer, a comparison, left out)
    on the headline metric against float's; empty when the run measured none."""
    metrics = report.get("metrics") or {}
    reference = metrics.get("float")
    models = [m for m in metrics if m != "float" and not m.startswith("onnxruntime")]
    if not reference or not models:
        return []
    candidates = [metric_name] if metric_name else list(HEADLINE_METRICS)
    candidates += [k for k in reference if k != "samples"]
    name = next((c for c in candidates if c in reference and c in metrics[models[0]]), None)
    if name is None:
        return []
    return [
        Quality(
            name,
            model,
            float(metrics[model][name]),
            float(reference[name]),
            metrics[model].get("samples"),
        )
        for model in models
        if name in metrics[model]
    ]


def warnings_of(report: Mapping[str, Any], quality: Sequence[Quality]) -> list[Finding]:
    """Everything in the report a user should look at before shipping, worst first."""
    found: list[Finding] = []
    verification = report.get("verification") or {}
    for problem in verification.get("problems", []):
        allowed = verification.get("mismatch_allowed")
        found.append(
            Finding(
                f"verification {'accepted with --allow-mismatch' if allowed else 'FAILED'}: "
                f"{problem}",
                error=not allowed,
            )
        )
    integer = report.get("integer") or {}
    agreement = integer.get("qdq_vs_integer") or {}
    lsb = agreement.get("max_output_diff_lsb")
    integer_evaluated = any(m.endswith(" integer") for m in report.get("metrics") or {})
    if lsb is not None and lsb > 1 + LSB_MEASUREMENT_SLACK:
        found.append(
            Finding(
                f"the QDQ model and the integer model (what ships) differ by up to {lsb:.1f} "
                "output LSB, beyond rounding; top-1 agreement "
                f"{fmt_pct(agreement.get('top1_agreement_qdq_vs_integer'))}"
                + (
                    ": see the integer model's own metrics below"
                    if integer_evaluated
                    else ": the QDQ model's metrics may not hold for model.int.onnx"
                )
            )
        )
    if integer.get("float_ops"):
        found.append(
            Finding(
                "the integer model keeps float ops (float islands): "
                + ", ".join(integer["float_ops"])
            )
        )
    for layer in report.get("float_layers", []):
        found.append(Finding(f"layer {layer['id']} kept in float: {layer.get('reason', '')}"))
    for measured in quality:
        if measured.drop > QUALITY_DROP_WARNING:
            found.append(
                Finding(
                    f"{measured.metric} of {measured.model} drops {measured.drop * 100:.2f} "
                    f"points against float ({measured.value:.4f} vs {measured.reference:.4f})"
                )
            )
    if not report.get("metrics"):
        found.append(
            Finding("no held-out evaluation in this run: quality against float is not known")
        )
    allocation = report.get("allocation") or {}
    if allocation and not allocation.get("proven_optimal", True):
        found.append(Finding("the allocation's ILP stopped before proving its plan optimal"))
    return found


def notes_of(report: Mapping[str, Any], sensitivity: Mapping[str, Any] | None) -> list[str]:
    """Facts worth knowing that are not problems: rewrites, declined compensation, estimates."""
    notes = list(report.get("notes", []))
    for rewrite in report.get("rewrites", []):
        nodes_by_reason: dict[str, list[str]] = {}
        for skipped in rewrite.get("skipped", []):
            nodes_by_reason.setdefault(str(skipped.get("reason")), []).append(
                str(skipped.get("node"))
            )
        for reason, nodes in nodes_by_reason.items():  # one line per reason, not per node
            example = f" (e.g. {nodes[0]})" if len(nodes) > 1 else f" ({nodes[0]})"
            notes.append(f"{rewrite['pass']} skipped {len(nodes)} node(s){example}: {reason}")
    compensation = report.get("compensation") or {}
    declined: dict[tuple[str, str, str], list[str]] = {}
    for layer, widths in (compensation.get("layers") or {}).items():
        for bits, entry in widths.items():
            for step, reason in (entry.get("declined") or {}).items():
                declined.setdefault((str(step), str(bits), str(reason)), []).append(layer)
    for (step, bits, reason), layers in declined.items():  # one line per reason
        which = layers[0] if len(layers) == 1 else f"{len(layers)} layers, e.g. {layers[0]}"
        notes.append(f"compensation {step} declined at W{bits} for {which}: {reason}")
    notes += [str(n) for n in (sensitivity or {}).get("notes", [])]
    allocation = report.get("allocation") or {}
    for source in ("latency_source", "flash_source", "ram_source"):
        if allocation.get(source):
            notes.append(f"allocation {source.removesuffix('_source')}: {allocation[source]}")
    target = report.get("target") or {}
    if target.get("code_tolerance"):
        notes.append(
            f"target check allows {target['code_tolerance']} output codes of difference "
            "(float islands round differently on the target)"
        )
    return notes
