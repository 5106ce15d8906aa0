"""The fuzz harness: it catches what it must (planted crashes, hangs, tracebacks), and a short
seeded campaign through the real CLI finds no failure. The long run is benchmarks/fuzz.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyadiq.forked import ForkUnsafeError, run_forked
from dyadiq.fuzz import harness, mutators, seeds


def test_every_seed_quantizes_cleanly(tmp_path: Path) -> None:
    """run_case forks, so it runs in a fresh interpreter declared a fork parent."""
    code = f"""
import json
from pathlib import Path
from dyadiq.forked import declare_fork_parent
from dyadiq.fuzz import harness, seeds
from dyadiq.forked import ForkUnsafeError, run_forked
from dyadiq.fuzz.harness import Case
declare_fork_parent()
plans = harness.base_plans()
got = {{}}
for name in seeds.SEEDS:
    case = Case(seed_model=name, command="quantize", options=("--integer",))
    outcome, detail, *_ = harness.run_case(
        case, Path({str(tmp_path)!r}) / name, plans, timeout_s=120
    )
    got[name] = [outcome, detail]
print(json.dumps(got))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(got) == set(seeds.SEEDS)
    assert all(outcome == "ok" for outcome, _ in got.values()), got


def test_forking_is_refused_in_a_process_not_started_for_it() -> None:
    """This pytest process has run onnxruntime sessions: a fork could hang on their locks."""
    with pytest.raises(ForkUnsafeError, match="declare_fork_parent"):
        run_forked(lambda: 1, timeout_s=5)


def test_mutations_are_reproducible_from_their_seeds() -> None:
    seed = seeds.seed_model("cnn")
    mutations = tuple((name, 7) for name in sorted(mutators.MODEL_MUTATIONS))
    first = mutators.apply_model_mutations(seed, mutations).SerializeToString()
    again = mutators.apply_model_mutations(seed, mutations).SerializeToString()
    assert first == again
    assert first != seed.SerializeToString()
    assert isinstance(onnx.load_from_string(first), onnx.ModelProto)


@pytest.mark.parametrize(
    ("runner", "expected"),
    [
        ("cli_dies_with_sigfpe", "crash:SIGFPE"),
        ("cli_hangs", "hang"),
        ("cli_raises", "crash:KeyError"),
        ("cli_prints_a_traceback", "traceback"),
    ],
)
def test_the_harness_catches_minimises_and_saves_failures(
    runner: str, expected: str, tmp_path: Path
) -> None:
    """Planted failures (dyadiq.fuzz.planted), each standing in for a real failure class."""
    seen: list[int] = []
    settings = harness.CampaignSettings(
        model_cases=1,
        input_cases=0,
        seed=3,
        work=tmp_path / "work",
        crash_dir=tmp_path / "crashes",
        timeout_s=2,
        runner=f"dyadiq.fuzz.planted:{runner}",
    )
    campaign = harness.run_campaign(settings, progress=lambda c: seen.append(c.cases))
    assert seen == [1]  # one progress report per case, before the final result
    assert campaign.counts == {expected: 1}
    assert len(campaign.failures) == 1
    saved = Path(campaign.failures[0]["saved"])
    case = json.loads((saved / "case.json").read_text())
    assert case["class"] == expected
    # the planted failure does not depend on the model: minimisation drops every mutation
    assert case["case"]["mutations"] == [] and case["case"]["byte_flips"] == 0
    assert (saved / "model" / "model.onnx").is_file()
    assert (saved / "replay.sh").read_text().startswith("dyadiq ")


def test_a_short_seeded_campaign_has_no_failures(tmp_path: Path) -> None:
    """A few hundred cases through the real CLI (inspect, quantize, --integer), bounded in
    time on a busy machine; the long run is benchmarks/fuzz.py.

    The campaign runs in its own fresh process (run_campaign starts it), which forks a child
    per case: never this pytest process, whose onnxruntime sessions from earlier tests could
    leave a forked child hanging on a lock (CI saw a 4 s quantize 'hang' for 60 s)."""
    settings = harness.CampaignSettings(
        model_cases=150,
        input_cases=50,
        seed=20261207,
        work=tmp_path / "work",
        crash_dir=tmp_path / "crashes",
        timeout_s=60,
        time_limit_s=75,
    )
    campaign = harness.run_campaign(settings)
    summary = json.loads(json.dumps(campaign.to_json(), default=str))
    assert summary["cases"] >= 60, summary  # even on a loaded machine
    assert summary["failures"] == [], summary["failures"]
    assert not any(harness.is_failure(k) for k in summary["counts"]), summary["counts"]
    typed = {k for k in summary["counts"] if k.startswith("typed:")}
    assert {"typed:ModelLoadError", "typed:ConfigError"} <= typed, summary["counts"]
    assert summary["counts"]["ok"] > 0
    assert np.isfinite(summary["seconds"])
