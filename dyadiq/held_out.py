"""Held-out data for choosing a plan and, separately, for reporting on it.

A plan chosen because it measured well on some samples, then reported on those same samples, is
reported optimistically: the search selected for those very samples. So ``--max-drop`` measures
plans on a *search* split and reports the chosen one on a disjoint *report* split:

- the user's data: ``--val DIR`` is the search split and ``--test DIR`` the report split.
  Without ``--test``, ``--val`` is split in two: samples at even positions (counting across
  its batches, in file-name order) search, odd ones report. When the model's batch dimension
  is fixed (a batch cannot be cut), whole batches alternate instead;
- a zoo model: its held-out samples (disjoint from its calibration samples by construction),
  split the same way, even positions searching.

The split depends on sample order only, so every run splits the same data the same way.
Reading the user's data checks every batch against the model's inputs and reports every
problem at once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dyadiq.errors import CalibrationDataError, DyadiqError

if TYPE_CHECKING:
    from dyadiq.passes.calibration.data import InputSpecs

Feeds = dict[str, np.ndarray]


class Part(enum.Enum):
    """Which samples of a held-out set a measurement reads."""

    ALL = "all"
    SEARCH = "search"  # even positions: the plan is chosen on these
    REPORT = "report"  # odd positions: the chosen plan is reported on these

    def holds(self, position: int) -> bool:
        if self is Part.ALL:
            return True
        return (position % 2 == 0) == (self is Part.SEARCH)


def split_rows(
    feeds: Mapping[str, np.ndarray], labels: np.ndarray | None, first: int, part: Part
) -> tuple[Feeds, np.ndarray | None, list[int]]:
    """The rows of one batch (sample positions ``first``, ``first + 1``, ...) that ``part``
    holds: (feeds, labels, their positions); empty positions when it holds none."""
    rows = len(next(iter(feeds.values())))
    keep = [r for r in range(rows) if part.holds(first + r)]
    positions = [first + r for r in keep]
    if len(keep) == rows:
        return dict(feeds), labels, positions
    index = np.asarray(keep, dtype=np.int64)
    chosen = {name: np.asarray(value)[index] for name, value in feeds.items()}
    return chosen, (np.asarray(labels)[index] if labels is not None else None), positions


def zoo_part(
    batches: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray | None]], part: Part
) -> Iterator[tuple[Feeds, np.ndarray | None]]:
    """A zoo model's held-out ``(feeds, labels)`` batches, only the samples ``part`` holds."""
    first = 0
    for feeds, labels in batches:
        rows = len(next(iter(feeds.values())))
        chosen, chosen_labels, positions = split_rows(feeds, labels, first, part)
        first += rows
        if positions:
            yield chosen, chosen_labels


@dataclass(frozen=True)
class HeldOut:
    """Batches of the user's held-out data (already checked against the model's inputs), their
    labels (one per sample, or None), and where they came from, for the report."""

    batches: tuple[Feeds, ...]
    labels: np.ndarray | None
    source: str  # "--val DIR", "--val DIR, even samples", ...
    positions: tuple[int, ...]  # each sample's position in its source

    @property
    def samples(self) -> int:
        return len(self.positions)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": self.samples}


@dataclass(frozen=True)
class Splits:
    """The user's search and report splits, and how they were made."""

    search: HeldOut
    report: HeldOut
    note: str  # one sentence for the summary and report.json


def read_held_out(
    source: Any,
    specs: InputSpecs,
    *,
    option: str,
    labels: np.ndarray | None = None,
    image_preset: str | None = None,
) -> HeldOut:
    """Every batch of ``source`` (a folder of .npz/.npy batches or images, or an iterable of
    feed dicts), each checked against the model's inputs; every problem (and a label count that
    does not match the samples) in one :class:`CalibrationDataError`."""
    from dyadiq.passes.calibration.data import check_batch, open_source

    problems: list[str] = []
    batches: list[Feeds] = []
    try:
        for index, feeds in enumerate(open_source(source, list(specs), image_preset=image_preset)):
            try:
                batches.append(check_batch(index, feeds, specs))
            except CalibrationDataError as exc:
                problems.append(str(exc).replace("calibration batch", f"{option} batch", 1))
    except DyadiqError as exc:
        problems.append(f"{option}: {exc}")
    if not batches and not problems:
        problems.append(f"{option} holds no batches")
    samples = sum(len(next(iter(b.values()))) for b in batches)
    if labels is not None and not problems and len(labels) != samples:
        problems.append(f"{option} has {samples} samples but its labels file {len(labels)}")
    if problems:
        raise CalibrationDataError(
            f"{option} data does not fit the model:\n  - " + "\n  - ".join(problems)
        )
    name = str(source) if isinstance(source, str | Path) else "data"
    return HeldOut(tuple(batches), labels, f"{option} {name}", tuple(range(samples)))


def split_in_two(data: HeldOut, *, fixed_batch: bool) -> Splits:
    """``data`` as a search split (even positions) and a report split (odd ones), by sample,
    or by whole batch when ``fixed_batch`` (the model cannot take a part of a batch)."""
    halves: dict[Part, tuple[list[Feeds], list[np.ndarray], list[int]]] = {
        part: ([], [], []) for part in (Part.SEARCH, Part.REPORT)
    }
    first = 0
    labels = data.labels
    for number, feeds in enumerate(data.batches):
        rows = len(next(iter(feeds.values())))
        batch_labels = labels[first : first + rows] if labels is not None else None
        for part, (batches, kept_labels, positions) in halves.items():
            if fixed_batch:
                if not part.holds(number):
                    continue
                chosen, chosen_labels = feeds, batch_labels
                where = list(range(first, first + rows))
            else:
                chosen, chosen_labels, where = split_rows(feeds, batch_labels, first, part)
            if where:
                batches.append(chosen)
                positions.extend(where)
                if chosen_labels is not None:
                    kept_labels.append(np.asarray(chosen_labels))
        first += rows
    unit = "batches" if fixed_batch else "samples"
    made = {}
    for part, (batches, kept_labels, positions) in halves.items():
        if not batches:
            raise CalibrationDataError(
                f"{data.source} has {len(data.batches)} batch(es) of {first} sample(s): too few "
                f"to split into a search and a report half; give --test DIR, or more --val data"
            )
        which = "even" if part is Part.SEARCH else "odd"
        made[part] = HeldOut(
            tuple(batches),
            np.concatenate(kept_labels) if labels is not None else None,
            f"{data.source}, {which} {unit}",
            tuple(positions),
        )
    search, report = made[Part.SEARCH], made[Part.REPORT]
    note = (
        f"no --test: {data.source} split in two, the plan chosen on its {search.samples} "
        f"samples at even {unit[:-1]} positions and reported on the other {report.samples}"
    )
    return Splits(search, report, note)


def has_fixed_batch(specs: InputSpecs) -> bool:
    """True when some input's first dimension is a fixed number (batches cannot be cut)."""
    return any(shape and isinstance(shape[0], int) for _, shape in specs.values())
