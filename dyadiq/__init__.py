"""dyadiq: mixed-precision post-training quantization as graph-compiler passes.

A float ONNX model and a little calibration data in; a smaller model out, as standard ONNX QDQ
(for onnxruntime, or TensorRT with ``qdq_style="tensorrt"``) and as integer-only (dyadic,
HAWQ-V3) ONNX verified bit for bit against a numpy reference interpreter, optionally compiled
to a TVM library or to C for Cortex-M microcontrollers. Per-layer bit-widths come from a
sensitivity analysis and an integer linear program under a budget, or from bisection to an
accuracy tolerance.

From Python, one call does what ``dyadiq quantize`` does, with the same defaults::

    import dyadiq

    result = dyadiq.quantize("model.onnx", "calib/", out="out/", budget="avg-wbits=5")
    result.paths["qdq"]     # out/model.qdq.onnx (every file written, by role)
    result.report           # report.json as a dict
    result.metrics          # held-out metrics per model (zoo models: "zoo:fashion_cnn")

The steps are importable one by one: :mod:`dyadiq.pipeline` (calibrate, rewrite, export),
:mod:`dyadiq.mixed_precision` (budgets, tolerances), :mod:`dyadiq.evaluation`,
:mod:`dyadiq.zoo`. Errors are :class:`dyadiq.errors.DyadiqError` subclasses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dyadiq.api import QuantizedModel, SearchOptions, TargetOptions, quantize

__all__ = ["QuantizedModel", "SearchOptions", "TargetOptions", "quantize"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import dyadiq` (and the command line's start) stays light;
    # the API pulls in onnx, onnxruntime and every pass.
    if name in __all__:
        from dyadiq import api

        return getattr(api, name)
    raise AttributeError(f"module 'dyadiq' has no attribute {name!r}")
