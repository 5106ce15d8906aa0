"""A larger ppocr_cls evaluation split, and paired comparisons on it.

The zoo's held-out split is 400 rendered text lines: one standard error of an accuracy near
0.90 is 0.015, i.e. 6 lines, so the issue-12 comparison of a 4.5-bit plan with onnxruntime's
W8A8 (a 4-line gap) cannot be resolved on it. Lines are cheap to make: this split renders more
lines from the same generator as the held-out split (same sentences, seed and hard rendering,
line indices from ``FIRST_LINE`` on, so none is a held-out or calibration line), and compares
models paired on the same lines. Lines are independent draws, so each line is its own bootstrap
cluster (:class:`benchmarks.photo_split.SplitScores` with one "photo" per line).

Nothing in ``dyadiq.zoo`` changes for the tests and other benchmarks.

    python -m benchmarks.line_split --reference ort=ORT.onnx ilp=PLAN.onnx ... -o x.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Mapping

import numpy as np

from benchmarks.photo_split import SplitScores

LINES = 4000
FIRST_LINE = 1000  # the held-out split is lines 0-399 of the same generator


def score(models: Mapping[str, pathlib.Path], lines: int = LINES) -> SplitScores:
    """Per line, whether each model (and ``float``, the zoo model) predicts the label; every
    model runs as an exact simulation (the sessions of :func:`dyadiq.evaluation.evaluate`)."""
    from dyadiq import zoo
    from dyadiq.ort_sessions import open_session
    from dyadiq.zoo import ppocr_cls

    paths = {"float": pathlib.Path(zoo.get("ppocr_cls").model_path), **models}
    sessions = {name: open_session(path) for name, path in paths.items()}
    correct: dict[str, list[bool]] = {name: [] for name in paths}
    for x, label in ppocr_cls.more_evaluation_samples(FIRST_LINE, lines):
        feeds = {ppocr_cls.INPUT_NAME: x}
        for name, session in sessions.items():
            correct[name].append(int(np.argmax(session.run(None, feeds)[0])) == label)
    return SplitScores({k: np.asarray(v) for k, v in correct.items()}, np.arange(lines))


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="ppocr_cls QDQ files on 4000 more rendered lines")
    p.add_argument("models", nargs="+", help="NAME=PATH")
    p.add_argument("--reference", help="the model every other one is compared with (paired)")
    p.add_argument("--lines", type=int, default=LINES)
    p.add_argument("-o", "--output", type=pathlib.Path, required=True)
    args = p.parse_args(argv)
    models = {k: pathlib.Path(v) for k, v in (m.split("=", 1) for m in args.models)}
    scores = score(models, args.lines)
    rows = {
        name: {
            "accuracy": scores.agreement(name),
            "standard_error": scores.standard_error(name),
            "vs_reference": (
                scores.paired(name, args.reference)
                if args.reference and name != args.reference
                else None
            ),
        }
        for name in scores.agree
    }
    result: dict[str, object] = {
        "lines": scores.crops,
        "first_line": FIRST_LINE,
        "reference": args.reference,
        "rows": rows,
        "files": {k: str(v) for k, v in models.items()},
        "correct": {k: v.astype(int).tolist() for k, v in scores.agree.items()},
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(name, json.dumps(row))
    return result


if __name__ == "__main__":
    main()
