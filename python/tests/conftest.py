"""Shared fixtures of the Python suite: the real models and the shared PyTorch references, found
as the Rust tests find them (PGATE_MODELS_DIR / PGATE_SHARED, else the cache and ../shared).
Missing models or fixtures fail the suite (never skip): CI must prove the bindings on real models."""

import json
import os
import pathlib
import struct

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def models_dir() -> pathlib.Path:
    if os.environ.get("PGATE_MODELS_DIR"):
        return pathlib.Path(os.environ["PGATE_MODELS_DIR"])
    root = os.environ.get("PGATE_CACHE") or os.path.expanduser("~/.cache/persona-gate")
    return pathlib.Path(root) / "models"


def model_path(short: str) -> str:
    p = models_dir() / f"{short}.gguf"
    assert p.exists(), f"model {p} is missing: run scripts/setup-models.sh {short}"
    return str(p)


def shared_dir() -> pathlib.Path:
    p = pathlib.Path(os.environ.get("PGATE_SHARED") or REPO.parent / "shared")
    assert p.exists(), f"shared data not found at {p} (set PGATE_SHARED)"
    return p


def read_safetensors(path: pathlib.Path) -> dict:
    """A minimal safetensors reader (float32 tensors only), so the suite needs no torch."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", f"{name}: {t['dtype']}"
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(t["shape"])
    return out


def pgate_bin() -> str:
    p = os.environ.get("PGATE_BIN") or str(REPO / "target" / "release" / "pgate")
    assert os.path.exists(p), f"{p} is missing: cargo build --release -p pgate"
    return p


@pytest.fixture(scope="session")
def q05_ref():
    d = shared_dir() / "fixtures" / "q05"
    return json.loads((d / "reference.json").read_text()), read_safetensors(d / "reference.safetensors")


@pytest.fixture(scope="session")
def q05_f32():
    import persona_gate as pg

    return pg.Model.load(model_path("q05"), dtype="f32")
