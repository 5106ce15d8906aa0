"""The fuzz harness: it catches what it must (planted crashes, hangs, tracebacks), and a short
seeded campaign through the real CLI finds no failure. The long run is benchmarks/fuzz.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyadiq.fuzz import harness, mutators, seeds
from dyadiq.fuzz.harness import Case


def test_every_seed_quantizes_cleanly(tmp_path: Path) -> None:
    plans = harness.base_plans()
    for name in seeds.SEEDS:
        case = Case(seed_model=name, command="quantize", options=("--integer",))
        got, detail, *_ = harness.run_case(case, tmp_path / name, plans, timeout_s=120)
        assert got == "ok", (name, detail)


def test_mutations_are_reproducible_from_their_seeds() -> None:
    seed = seeds.seed_model("cnn")
    mutations = tuple((name, 7) for name in sorted(mutators.MODEL_MUTATIONS))
    first = mutators.apply_model_mutations(seed, mutations).SerializeToString()
    again = mutators.apply_model_mutations(seed, mutations).SerializeToString()
    assert first == again
    assert first != seed.SerializeToString()
    assert isinstance(onnx.load_from_string(first), onnx.ModelProto)


# Planted failures: each runner stands in for a real failure class of issue 14.
def _dies_with_sigfpe(argv: list[str]) -> int:
    os.kill(os.getpid(), signal.SIGFPE)
    return 0


def _hangs(argv: list[str]) -> int:
    time.sleep(3600)
    return 0


def _raises(argv: list[str]) -> int:
    raise KeyError(99)  # what load_onnx raised for elem_type 99


def _prints_a_traceback(argv: list[str]) -> int:
    print('Traceback (most recent call last):\n  File "onnxsim.py", line 1, in simplify')
    return 2


@pytest.mark.parametrize(
    ("runner", "expected"),
    [
        (_dies_with_sigfpe, "crash:SIGFPE"),
        (_hangs, "hang"),
        (_raises, "crash:KeyError"),
        (_prints_a_traceback, "traceback"),
    ],
)
def test_the_harness_catches_minimises_and_saves_failures(
    runner: Callable[[list[str]], int], expected: str, tmp_path: Path
) -> None:
    campaign = harness.run_campaign(
        model_cases=1,
        input_cases=0,
        seed=3,
        work=tmp_path / "work",
        crash_dir=tmp_path / "crashes",
        timeout_s=2,
        runner=runner,
    )
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

    The campaign forks a child per case, and forking is only safe from a process without
    native thread pools: this pytest process has run onnxruntime sessions (and Ray) in earlier
    tests, whose threads can hold a lock forever in the child (CI saw a 4 s quantize 'hang'
    for 60 s). So the campaign runs in a fresh interpreter, as benchmarks/fuzz.py runs it."""
    code = f"""
import json
from pathlib import Path
from dyadiq.fuzz import harness
campaign = harness.run_campaign(
    model_cases=150,
    input_cases=50,
    seed=20261207,
    work=Path({str(tmp_path / "work")!r}),
    crash_dir=Path({str(tmp_path / "crashes")!r}),
    timeout_s=60,
    time_limit_s=75,
)
print(json.dumps(campaign.to_json(), default=str))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["cases"] >= 60, summary  # even on a loaded machine
    assert summary["failures"] == [], summary["failures"]
    assert not any(harness.is_failure(k) for k in summary["counts"]), summary["counts"]
    typed = {k for k in summary["counts"] if k.startswith("typed:")}
    assert {"typed:ModelLoadError", "typed:ConfigError"} <= typed, summary["counts"]
    assert summary["counts"]["ok"] > 0
    assert np.isfinite(summary["seconds"])
