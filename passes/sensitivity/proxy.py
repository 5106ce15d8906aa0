"""The damage models (proxies) a sensitivity report offers, by name: which of a layer's
measured or estimated quantities prices it at a weight width. A module of its own so that the
command line can list them without importing the analysis (numpy, onnxruntime).
"""

from __future__ import annotations

from enum import StrEnum

from dyadiq.errors import ConfigError


class UnknownProxyError(ConfigError, ValueError):
    """A proxy name that is none of :class:`Proxy` (also a ValueError, as it always was)."""


class Proxy(StrEnum):
    """A damage model over plans: which report field prices a layer at a width. A StrEnum, so a
    member reads as its name in JSON and messages; ``+pairs`` adds the pair terms."""

    HESSIAN = "hessian"
    HESSIAN_PAIRS = "hessian+pairs"
    EMPIRICAL = "empirical"
    EMPIRICAL_PAIRS = "empirical+pairs"
    SNR = "snr"
    EIGENVALUE = "eigenvalue"
    FISHER = "fisher"
    TAYLOR = "taylor"
    ENTROPY = "entropy"

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
    def damage_field(self) -> str:
        """The :class:`LayerSensitivity` field this proxy reads (per weight width)."""
        return _DAMAGE_FIELD[self.value.removesuffix("+pairs")]


PROXIES = tuple(Proxy)
# the proxies the allocator offers (--proxy): the analysis computes them without TVM
ALLOCATION_PROXIES = (Proxy.HESSIAN, Proxy.HESSIAN_PAIRS, Proxy.EMPIRICAL, Proxy.EMPIRICAL_PAIRS)
_DAMAGE_FIELD = {
    "hessian": "hessian_damage",
    "empirical": "empirical_damage",
    "snr": "snr_db",
    "eigenvalue": "eigen_damage",
    "fisher": "fisher_damage",
    "taylor": "taylor_damage",
    "entropy": "entropy_damage",
}
