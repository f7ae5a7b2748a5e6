"""Vectors in: numpy arrays, lists, and torch tensors (through ``__dlpack__`` or ``__array__``,
so torch is never imported here)."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_f32(x: Any) -> np.ndarray:
    """A float32 C-contiguous array of ``x`` (no copy when it already is one)."""
    if isinstance(x, np.ndarray):
        a = x
    elif hasattr(x, "__dlpack__") and hasattr(np, "from_dlpack"):
        # torch / jax / cupy-on-host tensors: zero-copy view when the layout allows.
        try:
            a = np.from_dlpack(x.detach() if hasattr(x, "detach") else x)
        except Exception:
            a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    else:
        a = np.asarray(x)
    return np.ascontiguousarray(a, dtype=np.float32)


def as_vector(x: Any) -> np.ndarray:
    """A 1-D float32 vector of ``x``."""
    v = as_f32(x)
    if v.ndim != 1:
        v = v.reshape(-1) if v.ndim > 1 and max(v.shape) == v.size else v
    if v.ndim != 1:
        raise ValueError(f"expected one vector, got an array of shape {v.shape}")
    return v
