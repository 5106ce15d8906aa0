"""Quantize the zoo's Fashion-MNIST CNN from Python and compare W8A8 with W4A8.

python examples/quantize_with_python_api.py OUTDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from dyadiq import zoo
from dyadiq.evaluation import evaluate
from dyadiq.pipeline import quantize


def main(out: Path) -> dict[str, dict[str, float]]:
    artifacts = zoo.get("fashion_cnn")
    calibration = list(artifacts.calibration_batches())
    models = {}
    for weight_bits in (8, 4):
        folder = out / f"w{weight_bits}a8"
        quantize(artifacts.model_path, folder, calibration, weight_bits=weight_bits)
        models[f"W{weight_bits}A8"] = folder / "model.qdq.onnx"
    metrics = evaluate(artifacts, models)
    for name, values in metrics.items():
        print(f"{name:6s} accuracy {values['accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/example"))
