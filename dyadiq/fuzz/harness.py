"""The fuzz loop: make a case, run ``dyadiq`` on it in a forked child, classify, minimise, save.

A case is data (:class:`Case`): a seed model, its mutations as ``(name, seed)`` pairs, byte
flips, the command and options, and how its calibration data or plan is damaged. It is
materialised into a folder and run as ``dyadiq.cli.main(argv)`` in a child forked from the
campaign process (:func:`dyadiq.forked.run_forked`: the modules are imported once, a native
crash kills only the child, a hang is killed at the timeout). :func:`run_campaign` always
starts that process afresh (:mod:`dyadiq.fuzz.campaign_process`), whoever calls it: it never
runs onnxruntime itself, so forking it stays safe, and the children share one isolation
helper started before the first.

Outcome classes: ``ok``, ``typed:<Error>`` (exit 2 with one typed error), ``verification``
(exit 3), and the failures: ``crash:<Exception>`` (a Python exception escaped main),
``crash:<SIGNAL>``, ``crash:exit<N>``, ``traceback`` (exit 0/2 but a traceback was printed)
and ``hang``. A failing case is minimised (mutations dropped one at a time while the class
stays the same) and saved with its model, argv, output and a command to replay it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dyadiq.forked import Ending, ForkedOutcome, run_forked
from dyadiq.fuzz import mutators, seeds

FAILURE_PREFIXES = ("crash:", "traceback", "hang")


@dataclass(frozen=True)
class Case:
    seed_model: str
    command: str  # "inspect" | "quantize"
    mutations: tuple[tuple[str, int], ...] = ()
    byte_flips: int = 0
    flip_seed: int = 0
    options: tuple[str, ...] = ()
    calibration: str | None = None  # a name from mutators.CALIBRATION_MUTATIONS
    plan: bool = False  # a damaged --plan
    data_seed: int = 0

    @property
    def kind(self) -> str:
        """``model`` (the model is mutated) or ``inputs`` (data, plan or options are)."""
        return "model" if self.mutations or self.byte_flips else "inputs"


def is_failure(outcome_class: str) -> bool:
    return outcome_class.startswith(FAILURE_PREFIXES)


# --- making cases -----------------------------------------------------------------------------
def model_case(rng: np.random.Generator, *, integer_share: float, target_share: float) -> Case:
    names = sorted(mutators.MODEL_MUTATIONS)
    count = int(rng.integers(1, 4))
    mutations = tuple(
        (names[int(rng.integers(len(names)))], int(rng.integers(2**31))) for _ in range(count)
    )
    flips = int(rng.integers(1, 9)) if rng.random() < 0.15 else 0
    command = "inspect" if rng.random() < 0.4 else "quantize"
    options: tuple[str, ...] = ()
    if command == "quantize":
        if rng.random() < target_share:
            options = ("--target", "cortex-m4", "--check-inputs", "1")
        elif rng.random() < integer_share:
            options = ("--integer",)
    return Case(
        seed_model=str(rng.choice(sorted(seeds.SEEDS))),
        command=command,
        mutations=mutations,
        byte_flips=flips,
        flip_seed=int(rng.integers(2**31)),
        options=options,
        data_seed=int(rng.integers(2**31)),
    )


def inputs_case(rng: np.random.Generator, *, integer_share: float) -> Case:
    which = int(rng.integers(3))
    return Case(
        seed_model=str(rng.choice(sorted(seeds.SEEDS))),
        command="quantize",
        options=tuple(mutators.mutate_options(rng, integer_share)),
        calibration=str(rng.choice(mutators.CALIBRATION_MUTATIONS)) if which == 0 else None,
        plan=which == 1,
        data_seed=int(rng.integers(2**31)),
    )


def materialise(case: Case, folder: Path, base_plans: dict[str, dict[str, Any]]) -> list[str]:
    """Write the case's files into ``folder``; the argv for ``dyadiq``."""
    folder.mkdir(parents=True, exist_ok=True)
    seed = seeds.seed_model(case.seed_model)
    model = mutators.apply_model_mutations(seed, case.mutations)
    data = model.SerializeToString()
    if case.byte_flips:
        data = mutators.flip_bytes(data, case.byte_flips, case.flip_seed)
    model_path = folder / "model" / "model.onnx"
    model_path.parent.mkdir(exist_ok=True)
    model_path.write_bytes(data)
    if case.command == "inspect":
        return ["inspect", str(model_path), *case.options]
    rng = np.random.default_rng(case.data_seed)
    calib = folder / "calib"
    calib.mkdir(exist_ok=True)
    batches: list[dict[str, Any]] = seeds.calibration_batches(seed, 2, rng)
    if case.calibration in ("corrupt_file", "text_file"):
        name = "batch_000.npz" if case.calibration == "corrupt_file" else "notes.txt"
        (calib / name).write_bytes(bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    elif case.calibration is not None:
        batches = mutators.mutate_calibration(batches, case.calibration, rng)
    for i, feeds in enumerate(batches):
        if case.calibration != "corrupt_file" or i > 0:
            np.savez(calib / f"batch_{i:03d}.npz", **feeds)
    argv = ["quantize", str(model_path), "-o", str(folder / "out"), "--calib", str(calib)]
    if case.plan:
        plan_path = folder / "plan.json"
        plan_path.write_text(mutators.mutate_plan(base_plans[case.seed_model], rng))
        argv += ["--plan", str(plan_path)]
    return argv + list(case.options)


# --- running and classifying ------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    from dyadiq.cli import main

    return main(argv)


def classify(outcome: ForkedOutcome) -> tuple[str, str]:
    """(outcome class, a one-line detail) of one run."""
    output = outcome.output
    if outcome.ending is Ending.TIMED_OUT:
        return "hang", f"no result in {outcome.seconds:.0f} s"
    if outcome.ending is Ending.SIGNALLED:
        return f"crash:{outcome.signal_name}", "killed by a signal"
    if outcome.ending is Ending.RAISED:
        return f"crash:{outcome.error_type}", _where(output) + outcome.error[:300]
    if outcome.ending is Ending.EXITED:
        return f"crash:exit{outcome.exit_code}", "left without a result"
    status = int(outcome.value)
    if "Traceback (most recent call last)" in output:
        return "traceback", _where(output)
    if status == 0:
        return "ok", ""
    flat = re.sub(r"\s+", " ", output)
    if status == 3:
        return "verification", flat[-300:]
    found = re.search(r"error: (\w+):", flat)
    if status == 2 and found:
        return f"typed:{found.group(1)}", flat[found.start() : found.start() + 300]
    return f"crash:status{status}", flat[-300:]


def _where(output: str) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', output)
    if not frames:
        return ""
    path, line, function = frames[-1]
    return f"{Path(path).name}:{line} {function}: "


def run_case(
    case: Case,
    folder: Path,
    base_plans: dict[str, dict[str, Any]],
    *,
    timeout_s: float,
    runner: Callable[[list[str]], int] = run_cli,
) -> tuple[str, str, list[str], ForkedOutcome]:
    argv = materialise(case, folder, base_plans)
    outcome = run_forked(lambda: runner(argv), timeout_s=timeout_s)
    outcome_class, detail = classify(outcome)
    return outcome_class, detail, argv, outcome


def minimise(
    case: Case,
    outcome_class: str,
    folder: Path,
    base_plans: dict[str, dict[str, Any]],
    *,
    timeout_s: float,
    runner: Callable[[list[str]], int] = run_cli,
) -> Case:
    """Drop mutations, byte flips and options one at a time while the class stays the same."""

    def same(candidate: Case) -> bool:
        shutil.rmtree(folder, ignore_errors=True)
        got, *_ = run_case(candidate, folder, base_plans, timeout_s=timeout_s, runner=runner)
        return got == outcome_class

    smallest = case
    for i in reversed(range(len(smallest.mutations))):
        trial = replace(smallest, mutations=smallest.mutations[:i] + smallest.mutations[i + 1 :])
        if same(trial):
            smallest = trial
    if smallest.byte_flips and same(replace(smallest, byte_flips=0)):
        smallest = replace(smallest, byte_flips=0)
    for i in reversed(range(len(smallest.options))):
        trial = replace(smallest, options=smallest.options[:i] + smallest.options[i + 1 :])
        if same(trial):
            smallest = trial
    return smallest


# --- the campaign -----------------------------------------------------------------------------
@dataclass
class Campaign:
    """Counts per outcome class and the failures found (minimised and saved)."""

    counts: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    by_command: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    cases: int = 0
    seconds: float = 0.0

    def record(self, case: Case, outcome_class: str) -> None:
        self.cases += 1
        self.counts[outcome_class] += 1
        self.by_kind.setdefault(case.kind, Counter())[outcome_class] += 1
        label = case.command + (" --integer" if "--integer" in case.options else "")
        label += " --target" if "--target" in case.options else ""
        self.by_command.setdefault(label, Counter())[outcome_class] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "seconds": round(self.seconds, 1),
            "counts": dict(self.counts.most_common()),
            "by_kind": {k: dict(v.most_common()) for k, v in sorted(self.by_kind.items())},
            "by_command": {k: dict(v.most_common()) for k, v in sorted(self.by_command.items())},
            "failures": self.failures,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Campaign:
        return cls(
            counts=Counter(data["counts"]),
            by_kind={k: Counter(v) for k, v in data["by_kind"].items()},
            by_command={k: Counter(v) for k, v in data["by_command"].items()},
            failures=list(data["failures"]),
            cases=int(data["cases"]),
            seconds=float(data["seconds"]),
        )


def base_plans() -> dict[str, dict[str, Any]]:
    """The uniform W8A8 plan of every seed, computed in a forked child (this process must not
    run onnxruntime, so that forking it stays safe)."""

    def plans() -> dict[str, dict[str, Any]]:
        from dyadiq.frontends.onnx_frontend import load_onnx
        from dyadiq.plan import PrecisionPlan

        return {
            name: PrecisionPlan.uniform(load_onnx(seeds.seed_model(name))).to_json()
            for name in seeds.SEEDS
        }

    outcome = run_forked(plans, timeout_s=300)
    if outcome.ending is not Ending.RETURNED:
        raise RuntimeError(f"the seed models do not load: {outcome.ending} {outcome.output}")
    found: dict[str, dict[str, Any]] = outcome.value
    return found


def save_failure(
    case: Case, outcome_class: str, detail: str, argv: Sequence[str], output: str, folder: Path
) -> Path:
    """Keep the minimised case's files with its argv, output and a replay command."""
    digest = hashlib.sha256(json.dumps(asdict(case)).encode()).hexdigest()[:10]
    name = re.sub(r"[^\w]+", "_", outcome_class) + "_" + digest
    target = folder / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(argv[1]).parent.parent, target)
    replay = [a.replace(str(Path(argv[1]).parent.parent), str(target)) for a in argv]
    (target / "case.json").write_text(
        json.dumps(
            {"class": outcome_class, "detail": detail, "case": asdict(case), "argv": replay},
            indent=1,
        )
    )
    (target / "output.log").write_text(output)
    (target / "replay.sh").write_text("dyadiq " + " ".join(replay) + "\n")
    os.chmod(target / "replay.sh", 0o755)
    return target


CLI_RUNNER = "dyadiq.fuzz.harness:run_cli"


@dataclass(frozen=True)
class CampaignSettings:
    """A campaign: up to ``model_cases`` + ``input_cases`` cases (interleaved) from ``seed``,
    stopped early at ``time_limit_s``; failures minimised and saved under ``crash_dir``.
    ``runner``: ``"module:function"`` taking argv and returning an exit status (the CLI)."""

    model_cases: int
    input_cases: int
    seed: int
    work: Path
    crash_dir: Path
    timeout_s: float = 120.0
    time_limit_s: float | None = None
    integer_share: float = 0.3
    target_share: float = 0.01
    runner: str = CLI_RUNNER

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "work": str(self.work), "crash_dir": str(self.crash_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CampaignSettings:
        return cls(**{**data, "work": Path(data["work"]), "crash_dir": Path(data["crash_dir"])})


def run_campaign(
    settings: CampaignSettings, progress: Callable[[Campaign], None] | None = None
) -> Campaign:
    """Run the campaign in a fresh campaign process (see the module doc); ``progress`` sees
    the campaign after each case."""
    spec = settings.to_json()
    command = [sys.executable, "-m", "dyadiq.fuzz.campaign_process"]
    final = None
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(spec))
        p.stdin.close()
        for line in p.stdout:
            message = json.loads(line)
            campaign = Campaign.from_json(message["campaign"])
            if message["done"]:
                final = campaign
            elif progress is not None:
                progress(campaign)
    if p.returncode != 0 or final is None:
        raise RuntimeError(f"the fuzz campaign process failed (exit status {p.returncode})")
    return final


def campaign_here(
    settings: CampaignSettings,
    runner: Callable[[list[str]], int],
    progress: Callable[[Campaign], None] | None = None,
) -> Campaign:
    """:func:`run_campaign`'s loop, in this process, which must be a declared fork parent
    (:func:`dyadiq.forked.declare_fork_parent`): the campaign process calls it with
    ``settings.runner`` imported as ``runner``."""
    from dyadiq.isolation_server import start_helper

    s = settings
    start = time.monotonic()
    rng = np.random.default_rng(s.seed)
    plans = base_plans()
    if runner is run_cli:  # import once here, so each forked case starts with it loaded
        import dyadiq.cli
        import dyadiq.pipeline  # noqa: F401
    start_helper()  # before forking: every child shares this one helper
    campaign = Campaign()
    kinds = ["model"] * s.model_cases + ["inputs"] * s.input_cases
    rng.shuffle(kinds)
    for index, kind in enumerate(kinds):
        if s.time_limit_s is not None and time.monotonic() - start > s.time_limit_s:
            break
        if kind == "model":
            case = model_case(rng, integer_share=s.integer_share, target_share=s.target_share)
        else:
            case = inputs_case(rng, integer_share=s.integer_share)
        folder = s.work / f"case_{index:06d}"
        outcome_class, detail, argv, outcome = run_case(
            case, folder, plans, timeout_s=s.timeout_s, runner=runner
        )
        campaign.record(case, outcome_class)
        if is_failure(outcome_class):
            small = minimise(
                case, outcome_class, folder, plans, timeout_s=s.timeout_s, runner=runner
            )
            shutil.rmtree(folder, ignore_errors=True)
            _, detail, argv, outcome = run_case(
                small, folder, plans, timeout_s=s.timeout_s, runner=runner
            )
            saved = save_failure(small, outcome_class, detail, argv, outcome.output, s.crash_dir)
            campaign.failures.append(
                {
                    "class": outcome_class,
                    "detail": detail,
                    "saved": str(saved),
                    "case": asdict(small),
                }
            )
        shutil.rmtree(folder, ignore_errors=True)
        campaign.seconds = time.monotonic() - start
        if progress is not None:
            progress(campaign)
    campaign.seconds = time.monotonic() - start
    return campaign
