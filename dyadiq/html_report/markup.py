"""HTML building blocks of report.html: the inline stylesheet and the escaping and number
formatting every section uses."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

CSS = """
:root { --ok: #1a7f37; --bad: #b42318; --warn: #9a6700; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
  max-width: 62rem; margin: 0 auto; padding: 0 1rem 3rem; }
h1 { font-size: 1.45rem; margin: 1.2rem 0 0.3rem; overflow-wrap: anywhere; }
h2 { font-size: 1.15rem; margin: 2rem 0 0.5rem; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 1rem; overflow-wrap: anywhere; }
.verdict { border: 2px solid var(--ok); border-radius: 8px; padding: 0.6rem 1rem; }
.verdict.failed { border-color: var(--bad); }
.verdict.warned { border-color: var(--warn); }
.badge { display: inline-block; font-weight: 700; padding: 0.05rem 0.5rem; border-radius: 4px;
  color: white; background: var(--ok); }
.failed .badge { background: var(--bad); } .warned .badge { background: var(--warn); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem;
  margin: 0.6rem 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.good { color: var(--ok); font-weight: 600; } .bad { color: var(--bad); font-weight: 600; }
.warn { color: var(--warn); font-weight: 600; }
ul.warnings li { color: var(--warn); } ul.warnings li.error { color: var(--bad); }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.86rem; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 0.2rem 0.5rem; text-align: left;
  vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.num, th.num { text-align: right; white-space: nowrap; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
code { font-size: 0.86em; overflow-wrap: anywhere; }
td code { white-space: nowrap; }
.fmt { display: inline-block; min-width: 3.6em; text-align: center; color: white;
  border-radius: 3px; padding: 0 0.3em; font-weight: 600; }
figure { margin: 1rem 0; }
figure svg { width: 100%; max-width: 48rem; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 0.86rem; }
.note { color: var(--muted); font-size: 0.9rem; }
@media (max-width: 720px) {
  body { font-size: 14px; padding: 0 0.5rem 2rem; }
  dl.facts { grid-template-columns: 1fr; } dl.facts dd { margin-bottom: 0.4rem; }
  th, td { padding: 0.15rem 0.3rem; }
}
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def facts_table(facts: Sequence[tuple[str, str]]) -> str:
    """Label/value pairs; values are HTML already (escaped where they carry report text)."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return f'<dl class="facts">{rows}</dl>'


def fmt_bytes(value: float) -> str:
    """Bytes with a unit a reader can compare: B below 10 kB, kB (1000 B) and MB above."""
    value = float(value)
    if value < 1e4:
        return f"{value:,.0f} B"
    if value < 1e7:
        return f"{value / 1e3:,.1f} kB"
    return f"{value / 1e6:,.2f} MB"


def fmt_sci(value: float | None) -> str:
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:.2e}"


def fmt_num(value: Any, pattern: str = "{:.4f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return pattern.format(value)


def fmt_pct(value: Any) -> str:
    return f"{float(value) * 100:.1f}%" if value is not None else "n/a"
