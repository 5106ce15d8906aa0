"""The last step of every ONNX emitter: the model it wrote must pass onnx.checker."""

from __future__ import annotations

import onnx

from dyadiq.errors import InternalError


def checked(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """``model`` stamped as dyadiq's, after a full onnx.checker pass. A failure is a bug in the
    emitter (``what`` names the model), never the user's input: an :class:`InternalError`."""
    model.producer_name = "dyadiq"
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InternalError(f"the {what} model fails onnx.checker: {exc}") from exc
    return model
