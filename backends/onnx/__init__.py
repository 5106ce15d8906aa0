"""ONNX backends: fake-quantized QDQ models (:mod:`.qdq`) and integer-only models
(:mod:`.integer`)."""
