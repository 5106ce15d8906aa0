"""Greedy decoding over a KV-cache decode step, whatever runs the step (onnxruntime, a TVM
build), and how two runs' logits compare.

A step is ``(token, position, cache) -> (logits [V], cache)`` on the decode graph of
:mod:`dyadiq.zoo.gemma3_decode` (``input_ids`` [1, 1], ``position`` [1], ``past_*`` ->
``logits``, ``present_*``). The prompt is fed one token at a time through the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dyadiq.errors import ZooError
from dyadiq.zoo.gemma3_decode import (
    INPUT_IDS,
    LOGITS,
    POSITION,
    CacheShape,
    past_names,
    present_names,
)


@dataclass(frozen=True)
class Decoded:
    """Greedy decoding's result: every token (prompt then generated) and the logits [V] of
    every step run, ``step_logits[p]`` from the step fed the token at position p (so it
    predicts position p + 1)."""

    tokens: list[int]
    prompt_length: int
    step_logits: list[np.ndarray]

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]


class DecodeStep(Protocol):
    """Anything that runs one step: ``(token, position, cache) -> (logits [V], cache)``.
    The first step gets :meth:`CacheShape.empty` (numpy arrays); each later step gets the
    cache the step before returned, whatever its tensors are (a TVM step keeps its own)."""

    def __call__(
        self, token: int, position: int, cache: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]: ...


class OnnxruntimeStep:
    """One decode step in onnxruntime (any form of the decode graph: float, DequantizeLinear
    or MatMulNBits weights)."""

    def __init__(self, session: Any, layers: int) -> None:
        self.session = session
        self.pasts = past_names(layers)
        self.outputs = [LOGITS, *present_names(layers)]

    def __call__(
        self, token: int, position: int, cache: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {
            INPUT_IDS: np.array([[token]], np.int64),
            POSITION: np.array([position], np.int64),
            **cache,
        }
        logits, *presents = self.session.run(self.outputs, feeds)
        return logits.reshape(-1), dict(zip(self.pasts, presents, strict=True))


def greedy_decode(
    step: DecodeStep, cache: CacheShape, prompt: Sequence[int], new_tokens: int
) -> Decoded:
    """Feed ``prompt`` one token at a time, then append the argmax token ``new_tokens``
    times; the prompt plus the new tokens must fit the cache."""
    if not prompt or new_tokens < 1:
        raise ZooError(
            f"greedy decoding needs a prompt (got {len(prompt)} tokens) and at least one new "
            f"token (got {new_tokens})"
        )
    if len(prompt) + new_tokens > cache.max_positions:
        raise ZooError(
            f"prompt ({len(prompt)}) + new tokens ({new_tokens}) exceed the decode graph's "
            f"{cache.max_positions} cache positions"
        )
    state = cache.empty()
    tokens = [int(t) for t in prompt]
    step_logits: list[np.ndarray] = []
    while True:
        position = len(step_logits)
        logits, state = step(tokens[position], position, state)
        step_logits.append(logits)
        if position + 1 < len(prompt):
            continue
        tokens.append(int(np.argmax(logits)))
        if len(tokens) == len(prompt) + new_tokens:
            return Decoded(tokens, len(prompt), step_logits)


@dataclass(frozen=True)
class Agreement:
    """How a decode run's logits compare with another run's (or the prefill graph's) over
    the same positions."""

    positions: int
    max_abs_logit_diff: float
    argmax_agree: int  # positions whose argmax tokens agree

    def to_json(self) -> dict[str, float | int]:
        return {
            "positions": self.positions,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "argmax_agree": self.argmax_agree,
        }


def agreement(expected: np.ndarray, got: Sequence[np.ndarray]) -> Agreement:
    """``expected`` [T, V] (e.g. the prefill graph's logits over the decoded tokens) against
    the first T entries of ``got`` (a decode run's ``step_logits``)."""
    count = min(len(expected), len(got))
    if count == 0:
        raise ZooError("no positions to compare")
    stacked = np.stack([np.asarray(g, np.float32).reshape(-1) for g in got[:count]])
    diff = float(np.max(np.abs(stacked - expected[:count])))
    agree = int(np.sum(stacked.argmax(-1) == expected[:count].argmax(-1)))
    return Agreement(count, diff, agree)


def prefill_logits(session: Any, tokens: Sequence[int], seq_len: int) -> np.ndarray:
    """Logits [len(tokens), V] of a fixed-length prefill graph (``input_ids`` [1, seq_len]
    -> ``logits`` [1, seq_len, V]) over ``tokens``, padded at the end with token 0: causal
    attention keeps the padding from reaching earlier positions."""
    if len(tokens) > seq_len:
        raise ZooError(f"{len(tokens)} tokens do not fit the prefill graph's {seq_len}")
    ids = np.zeros((1, seq_len), np.int64)
    ids[0, : len(tokens)] = tokens
    return np.asarray(session.run([LOGITS], {INPUT_IDS: ids})[0][0, : len(tokens)])
