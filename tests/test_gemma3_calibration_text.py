"""The Gemma zoo's in-domain calibration windows (dyadiq/zoo/gemma3.py) never touch the
windows evaluation reads; checked on stand-in windows (no download)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from dyadiq.errors import ZooError
from dyadiq.zoo import gemma3

WINDOWS = 1265  # the Britannica text's count


@pytest.fixture
def numbered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Window k is 64 copies of k."""
    every = tuple(np.full(gemma3.SEQ_LEN, k, np.int64) for k in range(WINDOWS))
    monkeypatch.setattr(gemma3, "_evaluation_windows", lambda cache: every)


def _ids(text: str, limit: int) -> list[int]:
    batches = gemma3.calibration_batches(limit, cache=pathlib.Path("/unused"), text=text)
    return [int(b[gemma3.INPUT_NAME][0, 0]) for b in batches]


@pytest.mark.usefixtures("numbered")
def test_tail_and_spread_stay_after_the_evaluated_windows() -> None:
    assert _ids(gemma3.BRITANNICA_TAIL, 64) == list(range(1201, 1265))
    spread = _ids(gemma3.BRITANNICA_SPREAD, 64)
    assert len(set(spread)) == 64 and spread == sorted(spread)
    assert spread[0] == gemma3.EVALUATION_RESERVED and spread[-1] == WINDOWS - 1
    free = WINDOWS - gemma3.EVALUATION_RESERVED
    assert min(_ids(gemma3.BRITANNICA_SPREAD, free)) == gemma3.EVALUATION_RESERVED
    for text in (gemma3.BRITANNICA_TAIL, gemma3.BRITANNICA_SPREAD):
        with pytest.raises(ZooError):
            _ids(text, free + 1)
        with pytest.raises(ZooError):
            list(gemma3.calibration_batches(None, cache=pathlib.Path("/unused"), text=text))
    with pytest.raises(ZooError):
        _ids("poems", 4)
