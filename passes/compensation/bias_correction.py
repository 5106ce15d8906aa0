"""Empirical bias correction (Nagel et al. 2019; METHODS.md section 5).

Quantized weights W' shift each output channel's mean by E[(W' - W) x] = (W' - W) mu, with mu
the mean of the layer's input rows (im2col patches, padding included) over the calibration
data, taken from the already-quantized prefix of the network. Adding
    c = (W - W') mu
to the float bias makes the layer's mean output error on that data exactly zero; the
remaining error is centred:  E||(W - W')x - c||^2 = E||(W - W')x||^2 - ||c||^2.
"""

from __future__ import annotations

import numpy as np


def bias_correction(weights: np.ndarray, quantized: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """c per output channel, flattened over groups: weights/quantized [G, R, d], mean [G, d]."""
    delta = weights.astype(np.float64) - quantized.astype(np.float64)
    return np.einsum("grd,gd->gr", delta, mean.astype(np.float64)).reshape(-1)
