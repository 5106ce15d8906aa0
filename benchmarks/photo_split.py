"""A larger MobileNetV2 evaluation split, and paired comparisons that respect its photos.

The zoo's held-out split is 31 photos x 8 crops = 248 crops: one standard error of a top-1
agreement near 0.78 is about 0.027, larger than most differences the compensation benchmark
wants to resolve. There are no more labelled-free photos to add without changing the zoo (the
remaining opencv-doc files are mostly charts, chessboards and text), so this split takes more
crops of the *same evaluation photos* (``CROPS_PER_PHOTO`` each, a seed of its own, so its
crops differ from the zoo split's; calibration photos stay disjoint). Crops of one photo are
correlated, so every uncertainty here is a cluster bootstrap over photos, and two models are
compared *paired* on the same crops (their difference has far less noise than either score).

Nothing in ``dyadiq.zoo`` changes: the zoo split that tests and other benchmarks use is as it was.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

CROPS_PER_PHOTO = 24
SEED = 33  # the zoo's evaluation split uses 22, calibration 11
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class SplitScores:
    """Per-crop float top-1 agreement of each model, and which photo each crop came from."""

    agree: dict[str, np.ndarray]  # model -> [N] bool
    photo: np.ndarray  # [N] photo index

    @property
    def crops(self) -> int:
        return int(self.photo.size)

    def agreement(self, model: str) -> float:
        return float(self.agree[model].mean())

    def _bootstrap(self, values: np.ndarray, seed: int = 0) -> np.ndarray:
        """Means of ``values`` over photo-resampled copies of the split."""
        photos = np.unique(self.photo)
        sums = np.array([values[self.photo == p].sum() for p in photos])
        counts = np.array([np.sum(self.photo == p) for p in photos])
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, photos.size, size=(BOOTSTRAP_DRAWS, photos.size))
        return np.asarray(sums[pick].sum(axis=1) / counts[pick].sum(axis=1))

    def standard_error(self, model: str) -> float:
        return float(self._bootstrap(self.agree[model].astype(np.float64)).std())

    def paired(self, model: str, reference: str) -> dict[str, float]:
        """``model`` minus ``reference``: difference, its photo-bootstrap standard error and
        95% interval, and the share of bootstrap draws in which ``model`` is not worse."""
        diff = self.agree[model].astype(np.float64) - self.agree[reference].astype(np.float64)
        draws = self._bootstrap(diff)
        low, high = np.percentile(draws, [2.5, 97.5])
        return {
            "difference": float(diff.mean()),
            "standard_error": float(draws.std()),
            "ci95_low": float(low),
            "ci95_high": float(high),
            "p_not_worse": float(np.mean(draws >= 0)),
        }


def photo_crops() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(photo index, feeds) for every crop of the larger split, photo by photo."""
    from dyadiq.zoo import mobilenet_v2 as zoo_model

    for index, name in enumerate(zoo_model.EVALUATION_IMAGES):
        # one photo per call: the crop generator seeds each crop with (seed, 0, j), and the
        # photo index goes into the seed so no two photos share crop geometry
        for x in zoo_model.load_crops((name,), seed=SEED * 1000 + index, per_image=CROPS_PER_PHOTO):
            yield index, {zoo_model.INPUT_NAME: x}


def score(float_model: pathlib.Path, models: Mapping[str, pathlib.Path]) -> SplitScores:
    """Top-1 agreement with ``float_model`` per crop, every model run as an exact simulation
    (the sessions of :func:`dyadiq.evaluation.evaluate`)."""
    from dyadiq.ort_sessions import open_session

    sessions = {name: open_session(path) for name, path in models.items()}
    reference = open_session(float_model)
    agree: dict[str, list[bool]] = {name: [] for name in models}
    photos: list[int] = []
    for photo, feeds in photo_crops():
        expected = int(np.argmax(reference.run(None, feeds)[0]))
        photos.append(photo)
        for name, session in sessions.items():
            agree[name].append(int(np.argmax(session.run(None, feeds)[0])) == expected)
    return SplitScores({k: np.asarray(v) for k, v in agree.items()}, np.asarray(photos))


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Score existing QDQ files of MobileNetV2 on the zoo split and on this larger one.

    ``python -m benchmarks.photo_split --reference ort_w8a8_percentile NAME=PATH ... -o x.json``
    """
    import argparse
    import json

    from dyadiq import zoo
    from dyadiq.evaluation import evaluate

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("models", nargs="+", help="NAME=PATH")
    p.add_argument("--reference", help="the model every other one is compared with (paired)")
    p.add_argument("-o", "--output", type=pathlib.Path, required=True)
    args = p.parse_args(argv)
    models = {k: pathlib.Path(v) for k, v in (m.split("=", 1) for m in args.models)}
    artifacts = zoo.get("mobilenet_v2")
    standard = evaluate(artifacts, models)
    scores = score(pathlib.Path(artifacts.model_path), models)
    rows = {
        name: {
            "zoo_split_top1_agreement": standard[name]["top1_agreement"],
            "larger_split_top1_agreement": scores.agreement(name),
            "larger_split_standard_error": scores.standard_error(name),
            "vs_reference": (
                scores.paired(name, args.reference)
                if args.reference and name != args.reference
                else None
            ),
        }
        for name in models
    }
    result: dict[str, object] = {
        "zoo_split_crops": standard["float"]["samples"],
        "larger_split_crops": scores.crops,
        "reference": args.reference,
        "rows": rows,
        "files": {k: str(v) for k, v in models.items()},
        "photo": scores.photo.tolist(),  # per crop, for any other paired comparison
        "agree": {k: v.astype(int).tolist() for k, v in scores.agree.items()},
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
