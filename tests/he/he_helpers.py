"""Helpers shared by the HE tests: CNN-shaped tensors and simulated local training."""

from __future__ import annotations

import numpy as np

# Tensor shapes of a small 2D CNN classifier for 1x28x28 inputs (conv-bn-relu x2, linear head),
# including BatchNorm's integer counter.
CNN_SHAPES = {
    "conv1.weight": ((16, 1, 3, 3), np.float32),
    "conv1.bias": ((16,), np.float32),
    "bn1.weight": ((16,), np.float32),
    "bn1.bias": ((16,), np.float32),
    "bn1.running_mean": ((16,), np.float32),
    "bn1.running_var": ((16,), np.float32),
    "bn1.num_batches_tracked": ((), np.int64),
    "conv2.weight": ((32, 16, 3, 3), np.float32),
    "conv2.bias": ((32,), np.float32),
    "fc.weight": ((2, 32 * 7 * 7), np.float32),
    "fc.bias": ((2,), np.float32),
}


def cnn_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Initial weights with realistic magnitudes (BN var 1, counters 0)."""
    out = {}
    for name, (shape, dtype) in CNN_SHAPES.items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, dtype)
        elif name.endswith("running_var") or name == "bn1.weight":
            out[name] = np.ones(shape, dtype)
        elif name.endswith(("bias", "running_mean")):
            out[name] = np.zeros(shape, dtype)
        else:
            fan_in = int(np.prod(shape[1:]))
            out[name] = rng.normal(scale=1 / np.sqrt(fan_in), size=shape).astype(dtype)
    return out


def local_update(global_w: dict, rng: np.random.Generator, scale: float = 0.01, steps: int = 10) -> dict:
    """A site's model after local training: small float deltas, the counter advanced by ``steps``."""
    out = {}
    for name, v in global_w.items():
        if np.issubdtype(v.dtype, np.integer):
            out[name] = v + steps
        else:
            out[name] = (v + rng.normal(scale=scale, size=v.shape)).astype(v.dtype)
    return out
