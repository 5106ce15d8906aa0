"""Paired comparison of two rows of a ``benchmarks.llm`` results file over the same windows.

Every row scored by ``benchmarks.llm.score`` keeps its negative log-likelihood per evaluation
window (``nll_per_window``). Two rows scored on the same windows are compared window by
window: the ratio of their perplexities, a 95% bootstrap interval over windows (windows are
resampled, both rows' NLLs together, so the interval is that of the difference), and on how
many windows the first row has the lower NLL.

    .venv/bin/python -m benchmarks.llm_paired benchmarks/results/llm_main_table.json \\
        "dyadiq ILP avg 3.5 bits (GPTQ g128)" "dyadiq RTN int4 g128"
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 10_000


def paired(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    tokens_per_window: float,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Perplexity of A over perplexity of B on the same windows, with its bootstrap interval."""
    a = np.asarray(nll_a, dtype=np.float64)
    b = np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired rows need the same windows: {a.shape} vs {b.shape}")
    diff = a - b
    # perplexity ratio = exp(mean NLL difference per token); every window predicts as many
    # tokens, so a resample's ratio is exp(mean of its windows' differences / tokens)
    ratio = math.exp(float(diff.mean()) / tokens_per_window)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diff), size=(resamples, len(diff)))
    draws = np.exp(diff[picks].mean(axis=1) / tokens_per_window)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "perplexity_ratio": round(ratio, 4),
        "ci95": [round(float(low), 4), round(float(high), 4)],
        "windows_better": int((diff < 0).sum()),
        "windows": len(diff),
        "resamples": resamples,
    }


def compare(rows: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """``paired`` for rows ``a`` and ``b`` of a results file's ``rows``."""
    for name in (a, b):
        if "nll_per_window" not in rows.get(name, {}):
            raise SystemExit(f"row {name!r} has no per-window NLL (rows: {sorted(rows)})")
    tokens = rows[a]["tokens"] / len(rows[a]["nll_per_window"])
    if rows[b]["tokens"] != rows[a]["tokens"]:
        raise SystemExit(f"{a!r} and {b!r} were scored on different windows")
    return paired(rows[a]["nll_per_window"], rows[b]["nll_per_window"], tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a benchmarks.llm results json")
    p.add_argument("row", help="the row compared")
    p.add_argument("references", nargs="+", help="rows it is compared with")
    args = p.parse_args(argv)
    rows = json.loads(args.results.read_text())["rows"]
    for ref in args.references:
        result = compare(rows, args.row, ref)
        print(json.dumps({"row": args.row, "vs": ref, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
