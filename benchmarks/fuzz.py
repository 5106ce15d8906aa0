"""The long fuzzing run: mutated models and mutated calibration sets / plans / budgets / options
through ``dyadiq inspect`` and ``dyadiq quantize`` (``--integer`` and ``--target`` on a share),
counted per outcome class into ``benchmarks/results/fuzz.{json,md}``.

    nice -n 10 .venv/bin/python -m benchmarks.fuzz --model-cases 10000 --input-cases 2000

``--time-limit`` stops early (the counts then say how many cases really ran); results are
rewritten every ``--checkpoint`` cases, so an interrupted run still leaves its numbers.
Failures (crashes, printed tracebacks, hangs) are minimised and saved under ``--crash-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine_info, write_results
from dyadiq.fuzz.harness import Campaign, CampaignSettings, is_failure, run_campaign

RESULTS = REPO / "benchmarks" / "results"


def render(data: dict[str, Any]) -> str:
    c = data["campaign"]
    requested = data["requested"]
    failures = sum(n for k, n in c["counts"].items() if is_failure(k))
    hangs = c["counts"].get("hang", 0)
    lines = [
        "# Fuzzing dyadiq: outcome of every mutated case",
        "",
        f"- date: {data['date']}; command: `{data['command']}`; wall time {c['seconds']:.0f} s",
        f"- machine: {data['machine']['cpu_model']}, {data['machine']['nproc']} CPUs (shared); "
        f"git {data['machine']['git_commit']}"
        + (" (dirty tree)" if data["machine"]["git_dirty"] else ""),
        f"- requested {requested['model_cases']:,} mutated models + {requested['input_cases']:,} "
        f"mutated calibration sets / plans / budgets / options; **ran {c['cases']:,}** "
        f"({c['by_kind_total'].get('model', 0):,} model cases, "
        f"{c['by_kind_total'].get('inputs', 0):,} input cases)"
        + ("" if data["finished"] else f", stopped by the {requested['time_limit_s']:.0f} s limit"),
        f"- **{failures} failures** (crashes, printed tracebacks) and **{hangs} hangs** "
        f"(timeout {requested['timeout_s']:.0f} s per case); seed {requested['seed']}",
        "",
        "Outcome classes: `ok` (exit 0), `typed:<Error>` (exit 2, one line, no traceback), "
        "`verification` (exit 3, folder kept), and the failures `crash:*`, `traceback`, `hang`.",
        "",
        "## Counts per outcome class",
        "",
        "| outcome | cases |",
        "|---|---|",
    ]
    lines += [f"| {k} | {n:,} |" for k, n in c["counts"].items()]
    for title, table in (("kind of case", c["by_kind"]), ("command", c["by_command"])):
        classes = sorted({k for counts in table.values() for k in counts})
        lines += ["", f"## Per {title}", "", f"| outcome | {' | '.join(table)} |"]
        lines.append("|---|" + "---|" * len(table))
        for k in classes:
            lines.append(
                f"| {k} | " + " | ".join(f"{t.get(k, 0):,}" for t in table.values()) + " |"
            )
    lines += ["", "## Failures (minimised)", ""]
    if not c["failures"]:
        lines.append("None.")
    for failure in c["failures"]:
        lines.append(
            f"- `{failure['class']}`: {failure['detail'][:200]} (saved: {failure['saved']})"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-cases", type=int, default=10000)
    parser.add_argument("--input-cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    parser.add_argument("--time-limit", type=float, help="stop after this many seconds")
    parser.add_argument("--integer-share", type=float, default=0.3)
    parser.add_argument("--target-share", type=float, default=0.01)
    parser.add_argument("--checkpoint", type=int, default=200)
    parser.add_argument("--crash-dir", default=str(REPO / "out" / "fuzz_crashes"))
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args()
    machine = machine_info()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    command = "nice -n 10 .venv/bin/python -m benchmarks.fuzz " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("crash_dir", "output_dir", "checkpoint")
    )
    requested = {
        "model_cases": args.model_cases,
        "input_cases": args.input_cases,
        "seed": args.seed,
        "timeout_s": args.timeout,
        "time_limit_s": args.time_limit,
        "integer_share": args.integer_share,
        "target_share": args.target_share,
    }

    def save(campaign: Campaign, finished: bool) -> None:
        summary = campaign.to_json()
        summary["by_kind_total"] = {k: sum(v.values()) for k, v in summary["by_kind"].items()}
        data = {
            "date": started,
            "command": command,
            "machine": machine,
            "requested": requested,
            "finished": finished,
            "campaign": summary,
        }
        write_results(data, Path(args.output_dir), "fuzz", render)

    def progress(campaign: Campaign) -> None:
        if campaign.cases % args.checkpoint == 0:
            save(campaign, finished=False)

    with tempfile.TemporaryDirectory(prefix="dyadiq_fuzz_") as work:
        settings = CampaignSettings(
            model_cases=args.model_cases,
            input_cases=args.input_cases,
            seed=args.seed,
            work=Path(work),
            crash_dir=Path(args.crash_dir),
            timeout_s=args.timeout,
            time_limit_s=args.time_limit,
            integer_share=args.integer_share,
            target_share=args.target_share,
        )
        campaign = run_campaign(settings, progress=progress)
    save(campaign, finished=campaign.cases == args.model_cases + args.input_cases)
    print(f"{campaign.cases} cases in {campaign.seconds:.0f} s: {dict(campaign.counts)}")
    os.environ.pop("DYADIQ_FUZZ", None)


if __name__ == "__main__":
    main()
