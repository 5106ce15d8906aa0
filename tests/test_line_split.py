"""benchmarks.line_split: more ppocr_cls lines, none of them a held-out or calibration line."""

import numpy as np
import pytest

from benchmarks import line_split
from dyadiq.zoo import ppocr_cls


def test_more_lines_continue_the_held_out_generator() -> None:
    # line 400 of the generator is what the held-out split would hold were it 401 lines long
    (ours,) = [x for x, _ in ppocr_cls.more_evaluation_samples(400, 1)]
    (same,) = [x for x, _ in ppocr_cls._samples(1, ppocr_cls.EVALUATION_SEED, 1, True, 400)]
    assert np.array_equal(ours, same)
    assert line_split.FIRST_LINE >= ppocr_cls.EVALUATION_SAMPLES


def test_the_held_out_lines_are_refused() -> None:
    with pytest.raises(ValueError, match="held-out"):
        next(ppocr_cls.more_evaluation_samples(399, 2))
