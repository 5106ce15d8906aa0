"""What a graph rewrite did: the contract every rewrite pass returns.

A rewrite edits the graph it is given, in place, and returns one :class:`RewriteReport`: the ids
of the nodes it changed and, for every candidate it left alone, the reason. The pipeline keeps
each report on the graph (``QGraph.rewrites``), so the reasons reach ``report.json`` instead of
being reduced to a count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewriteReport:
    name: str  # the pass, as report.json names it
    changed: list[str] = field(default_factory=list)  # ids of the nodes replaced or edited
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node id or "*", reason)

    def skip(self, node_id: str, reason: str) -> None:
        self.skipped.append((node_id, reason))

    def summary(self) -> str:
        """One line: what changed, and how often each reason declined a candidate."""
        text = f"{self.name}: {len(self.changed)} node(s) changed"
        reasons = Counter(reason for _, reason in self.skipped)
        if reasons:
            text += "; skipped: " + ", ".join(f"{n} x {r}" for r, n in reasons.most_common())
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "changed": list(self.changed),
            "skipped": [{"node": node, "reason": reason} for node, reason in self.skipped],
        }
