"""The baseline a user would pick instead: onnxruntime's own ``quantize_static``.

Used by ``dyadiq quantize --compare-ort`` and the benchmarks, always on the same calibration
batches as dyadiq, so the two are compared in one run. Settings match what onnxruntime
recommends for CPUs: QDQ format, per-channel int8 weights, uint8 activations.
"""

from __future__ import annotations

import enum
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter

from dyadiq.graph import default_opset

PER_CHANNEL_MIN_OPSET = 13


class OrtCalibrator(enum.Enum):
    MINMAX = "MinMax"
    ENTROPY = "Entropy"
    PERCENTILE = "Percentile"


class _ListReader:
    """onnxruntime's CalibrationDataReader over an in-memory list of feeds."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # required by newer onnxruntime readers; never needed here
        raise NotImplementedError


def quantize_static_baseline(
    model_path: Path,
    output_path: Path,
    calibration: Iterable[Mapping[str, np.ndarray]],
    *,
    calibrator: OrtCalibrator = OrtCalibrator.MINMAX,
    per_channel: bool = True,
) -> Path:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [dict(b) for b in calibration]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(model_path)
        model = onnx.load(str(source))
        if default_opset(model) < PER_CHANNEL_MIN_OPSET:
            # quantize_static writes per-axis DequantizeLinear, which needs opset 13, without
            # converting the model itself: an opset-11 model (PP-OCR) comes out invalid.
            model = version_converter.convert_version(model, PER_CHANNEL_MIN_OPSET)
            source = Path(tmp) / "opset13.onnx"
            onnx.save(model, str(source))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output_path),
            _ListReader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, calibrator.value),
        )
    return output_path
