"""Weight-only quantization for language models (issue 17): group-wise integer weights
(2..8 bits, one scale per 32 / 64 / 128 inputs), float activations.

Modules, in the order the data flows:

- :mod:`.model_file`: a model handled through its header (external data never loaded whole);
- :mod:`.layers`: which weights may be quantized (MatMul / Gemm / Gather, tied weights once);
- :mod:`.groupwise`: the group-wise grid (quantize / dequantize);
- :mod:`.statistics`: each layer's input Hessian from one calibration pass;
- :mod:`.quantize`: round to nearest or GPTQ per layer and width;
- :mod:`.sensitivity`: per-layer, per-width damage as next-token KL to the float model;
- :mod:`.allocation`: that damage as the existing ILP's problem (``avg-wbits=`` / ``size=``);
- :mod:`.width_plans`: a plan's widths: uniform, or the damage the ILP chooses from;
- :mod:`.pipeline`: the whole run, writing ONNX through ``backends/onnx/weight_only.py``.
"""
