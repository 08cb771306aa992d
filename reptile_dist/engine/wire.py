"""Deltas on the wire: numpy arrays (Ray's object store moves them zero-copy), in the precision
`delta_dtype` asks for; the parameter server always accumulates in float64. bfloat16 has no
numpy dtype, so it travels as its raw 16-bit pattern."""
from __future__ import annotations

import numpy as np
import torch


def encode(delta: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return delta.to(torch.bfloat16).view(torch.int16).numpy()
    return delta.to(getattr(torch, dtype)).numpy()


def decode(payload: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(payload)).view(torch.bfloat16).to(torch.float64).numpy()
    return payload.astype(np.float64, copy=False)
