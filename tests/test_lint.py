"""ruff and mypy are part of the suite: the project stays lint- and type-clean."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_and_mypy_are_clean():
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "lint.sh")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
