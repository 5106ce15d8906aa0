"""Weight-rounding compensation passes (issue 12): clipping-scale search, GPTQ, bias
correction and cross-layer equalisation, and the per-width compensated quantizer built from
them (:class:`CompensatedWeights`, computed by :func:`compensate`)."""
