"""The damage models (proxies) a sensitivity report offers, by name: which of a layer's
measured or estimated quantities prices it at a weight width, and what the analysis must compute
for it. A module of its own so that the command line can list them without importing the
analysis (numpy, onnxruntime).

Every proxy can be taken alone or with ``+pairs`` (measured inter-layer terms, ``pairs.py``).
``hessian`` / ``hessian+pairs`` are the older names of ``trace`` / ``trace+pairs`` (HAWQ-V2's
average Hessian trace) and still parse.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from dyadiq.errors import ConfigError


class UnknownProxyError(ConfigError, ValueError):
    """A proxy name that is none of :class:`Proxy` (also a ValueError, as it always was)."""


class Proxy(StrEnum):
    """A damage model over plans: which report field prices a layer at a width. A StrEnum, so a
    member reads as its name in JSON and messages; ``+pairs`` adds the pair terms."""

    EMPIRICAL = "empirical"
    EMPIRICAL_PAIRS = "empirical+pairs"
    TRACE = "trace"  # HAWQ-V2: 1/2 Tr(H)/n ||Q(W) - W||^2
    TRACE_PAIRS = "trace+pairs"
    EIGENVALUE = "eigenvalue"  # HAWQ: 1/2 lambda_max ||Q(W) - W||^2
    EIGENVALUE_PAIRS = "eigenvalue+pairs"
    FISHER = "fisher"
    FISHER_PAIRS = "fisher+pairs"
    TAYLOR = "taylor"
    TAYLOR_PAIRS = "taylor+pairs"
    SNR = "snr"
    SNR_PAIRS = "snr+pairs"
    ENTROPY = "entropy"
    ENTROPY_PAIRS = "entropy+pairs"
    # the older names (aliases: Proxy.HESSIAN is Proxy.TRACE)
    HESSIAN = "trace"
    HESSIAN_PAIRS = "trace+pairs"

    @classmethod
    def _missing_(cls, value: object) -> Proxy | None:
        if isinstance(value, str) and value.startswith("hessian"):
            return cls(value.replace("hessian", "trace", 1))
        return None

    @classmethod
    def parse(cls, name: Proxy | str) -> Proxy:
        try:
            return cls(name)
        except ValueError:
            raise UnknownProxyError(
                f"unknown proxy {name!r}; choose one of {[p.value for p in cls]}"
            ) from None

    @property
    def with_pairs(self) -> bool:
        return self.value.endswith("+pairs")

    @property
    def base(self) -> Proxy:
        """The per-layer proxy without pair terms."""
        return Proxy(self.value.removesuffix("+pairs"))

    @property
    def damage_field(self) -> str:
        """The :class:`LayerSensitivity` field this proxy reads (per weight width)."""
        return _DAMAGE_FIELD[self.base.value]

    def analysis_fields(self) -> dict[str, Any]:
        """``SensitivityConfig`` switches that compute this proxy and nothing else (activation
        sites are the caller's choice: they price activation widths, not weight widths)."""
        base = self.base
        return {
            "empirical": base in (Proxy.EMPIRICAL, Proxy.SNR),
            "trace": base is Proxy.TRACE,
            "gradients": base in (Proxy.EIGENVALUE, Proxy.FISHER, Proxy.TAYLOR),
            "entropy": base is Proxy.ENTROPY,
            "pairs": self.with_pairs,
        }


PROXIES = tuple(Proxy)  # aliases are not members: each proxy once
# the proxies the allocator offers (--proxy): every one; eigenvalue, fisher and taylor need
# TVM's reverse mode (analyze --gradients)
ALLOCATION_PROXIES = PROXIES
_DAMAGE_FIELD = {
    "trace": "hessian_damage",
    "empirical": "empirical_damage",
    "snr": "snr_db",
    "eigenvalue": "eigen_damage",
    "fisher": "fisher_damage",
    "taylor": "taylor_damage",
    "entropy": "entropy_damage",
}
