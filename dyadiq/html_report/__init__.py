"""``OUT/report.html``: one self-contained page (inline CSS, inline SVG figures, no network) that
reads what a run already wrote, report.json and plan.json, plus the sensitivity analysis and
the measured frontier where they exist.

The page opens with a verdict (which file to deploy on which runtime, size before and after,
quality against float, bit-exactness, every warning), then the per-layer table, the sensitivity
chart, the Pareto frontier and the verification details. Each number carries its unit.

Sensitivity error bars: the empirical damage is one mean over the calibration batches (the
analysis keeps no per-batch spread), so the bars are those of the Hessian-trace estimate,
1/2 Tr(H)/n ||dW||^2, whose Hutchinson standard error the analysis does keep.

Public entry points: :func:`write_report_html` (what a run calls) and
:func:`render_report_html` (the page as a string).
"""

from dyadiq.html_report.page import render_report_html, write_report_html
from dyadiq.html_report.run_outputs import REPORT_FILE

__all__ = ["REPORT_FILE", "render_report_html", "write_report_html"]
