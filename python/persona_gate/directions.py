"""Directions in the residual stream: one vector per layer, ``[n_layers, d_model]``.

- :func:`refusal`: the refusal direction of Arditi et al. (2024), difference in means of harmful and
  harmless prompts, with their selection by bypass / induce / KL scores (``.selection``).
- :func:`trait`: persona vectors (Chen et al. 2025) for a built-in trait (``compliant``, ...) or a
  trait file.
- :func:`random`: seeded random controls, optionally norm-matched and orthogonal to a set.
- :func:`geometry`: norms and cosines between sets, layer by layer.
- :func:`load` / :meth:`DirectionSet.save`: the safetensors files of ``pgate extract``, and
  llama.cpp control-vector GGUF files (:meth:`DirectionSet.export_gguf`).

Vectors are numpy float32 arrays; sets add, subtract and scale like numbers
(``0.5 * happy - sad``), as repeng's control vectors do.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _native
from ._arrays import as_f32, as_vector
from ._progress import Progress, callback

PromptsArg = Union[str, Sequence[str]]


class Direction:
    """One vector (width ``d_model``) with where it came from: the set's name and layer."""

    def __init__(self, vector: Any, name: str = "", layer: Optional[int] = None, meta: Optional[Dict[str, Any]] = None) -> None:
        self.vector = as_vector(vector)
        self.name = name
        self.layer = layer
        self.meta = meta or {}

    @property
    def label(self) -> str:
        """``name[layer]``, as plans and receipts name it."""
        return f"{self.name}[{self.layer}]" if self.layer is not None else self.name

    def norm(self) -> float:
        return float(np.linalg.norm(self.vector))

    def unit(self) -> "Direction":
        return Direction(self.vector / max(self.norm(), 1e-30), self.name, self.layer, self.meta)

    def cosine(self, other: Any) -> float:
        b = as_vector(getattr(other, "vector", other))
        return float(self.vector @ b / max(np.linalg.norm(self.vector) * np.linalg.norm(b), 1e-30))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.vector if dtype is None else self.vector.astype(dtype)

    def __mul__(self, k: float) -> "Direction":
        return Direction(self.vector * np.float32(k), self.name, self.layer, self.meta)

    __rmul__ = __mul__

    def __neg__(self) -> "Direction":
        return self * -1.0

    def __add__(self, other: Any) -> "Direction":
        return Direction(self.vector + as_vector(getattr(other, "vector", other)), self.name, self.layer, self.meta)

    def __sub__(self, other: Any) -> "Direction":
        return self + (-as_vector(getattr(other, "vector", other)))

    def __repr__(self) -> str:
        return f"Direction({self.label!r}, d={self.vector.shape[0]}, norm={self.norm():.3g})"


class DirectionSet:
    """Vectors ``[n_layers, d_model]`` (float32) with their metadata (model, method, position,
    prompts' hash, ...), as ``pgate`` writes them. ``selection`` holds the refusal candidate table."""

    def __init__(
        self,
        vectors: Any,
        meta: Optional[Dict[str, Any]] = None,
        pos_mean: Optional[np.ndarray] = None,
        neg_mean: Optional[np.ndarray] = None,
        selection: Optional[Dict[str, Any]] = None,
    ) -> None:
        v = as_f32(vectors)
        if v.ndim == 1:
            v = v.reshape(1, -1)
        if v.ndim != 2:
            raise ValueError(f"a direction set is [n_layers, d_model], got shape {v.shape}")
        self.vectors = v
        self.meta: Dict[str, Any] = dict(meta) if meta else _default_meta(v.shape[0], v.shape[1])
        self.pos_mean = pos_mean
        self.neg_mean = neg_mean
        self.selection = selection

    @classmethod
    def _from_native(cls, parts: Any, selection: Optional[Dict[str, Any]] = None) -> "DirectionSet":
        vectors, meta, pos, neg = parts
        return cls(vectors, json.loads(meta), pos, neg, selection)

    def _parts(self) -> Any:
        return (self.vectors.reshape(-1), self.n_layers, self.d_model, json.dumps(self._meta_for_native()))

    def _meta_for_native(self) -> Dict[str, Any]:
        m = dict(self.meta)
        m["n_layers"], m["d_model"] = self.n_layers, self.d_model
        m["extra"] = {k: str(v) for k, v in (m.get("extra") or {}).items()}
        return m

    # -- shape and access ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.meta.get("name", ""))

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def layer(self) -> Optional[int]:
        """The selected layer of a refusal direction (``selection["layer"]``), else None."""
        return None if self.selection is None else int(self.selection["layer"])

    def at(self, layer: int) -> Direction:
        """The vector of ``layer`` as a :class:`Direction` (use it at other layers in a plan)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} is out of range: the set has {self.n_layers} layers (0..={self.n_layers - 1})")
        return Direction(self.vectors[layer], self.name, layer, self.meta)

    def __getitem__(self, layer: int) -> Direction:
        return self.at(layer)

    def __len__(self) -> int:
        return self.n_layers

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.vectors if dtype is None else self.vectors.astype(dtype)

    def norms(self) -> np.ndarray:
        return np.linalg.norm(self.vectors.astype(np.float64), axis=1)

    def unit(self) -> "DirectionSet":
        n = np.maximum(self.norms(), 1e-30)[:, None]
        return self._derived((self.vectors / n).astype(np.float32), "unit")

    def cosines(self, other: "DirectionSet") -> np.ndarray:
        """Cosine per layer with another set of the same shape."""
        a, b = self.vectors.astype(np.float64), as_f32(other).astype(np.float64)
        return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)

    # -- arithmetic ---------------------------------------------------------------------------
    def _derived(self, v: np.ndarray, how: str) -> "DirectionSet":
        m = copy.deepcopy(self.meta)
        m["method"] = "arithmetic"
        m.setdefault("extra", {})["arithmetic"] = how
        return DirectionSet(v, m)

    def __mul__(self, k: float) -> "DirectionSet":
        return self._derived(self.vectors * np.float32(k), f"{k:g} * {self.name}")

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> "DirectionSet":
        return self * (1.0 / k)

    def __neg__(self) -> "DirectionSet":
        return self * -1.0

    def __add__(self, other: "DirectionSet") -> "DirectionSet":
        o = as_f32(other)
        if o.shape != self.vectors.shape:
            raise ValueError(f"direction sets of shapes {self.vectors.shape} and {o.shape} do not add")
        return self._derived(self.vectors + o, f"{self.name} + {getattr(other, 'name', 'array')}")

    def __sub__(self, other: "DirectionSet") -> "DirectionSet":
        return self + (-other if isinstance(other, DirectionSet) else -as_f32(other))

    def __repr__(self) -> str:
        sel = f", selected layer {self.layer}" if self.selection else ""
        return f"DirectionSet({self.name!r}, {self.n_layers} x {self.d_model}, {self.meta.get('method', '')}{sel})"

    # -- files --------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the set as safetensors with its metadata (what every ``pgate`` command reads)."""
        _native.directions_save(os.fspath(path), *self._parts())

    def export_gguf(
        self, path: Union[str, os.PathLike], coeff: float = 1.0, unit: bool = False, layers: Optional[Sequence[int]] = None
    ) -> str:
        """Write a llama.cpp control vector (``--control-vector``); returns the summary."""
        return _native.directions_export_gguf(os.fspath(path), *self._parts(), coeff, unit, None if layers is None else list(layers))


def _default_meta(n_layers: int, d: int) -> Dict[str, Any]:
    return {
        "name": "custom",
        "model": "",
        "model_sha256": None,
        "architecture": "",
        "d_model": d,
        "n_layers": n_layers,
        "method": "numpy",
        "position": "",
        "prompt_set_sha256": None,
        "n_pos": 0,
        "n_neg": 0,
        "seed": None,
        "tool_version": "",
        "created": "",
        "extra": {},
    }


def load(path: Union[str, os.PathLike], n_layers: Optional[int] = None) -> DirectionSet:
    """Read a direction set: a ``.safetensors`` of ``pgate``, or a llama.cpp control-vector
    ``.gguf`` (``n_layers``: the model's layer count, for files that skip layers)."""
    return DirectionSet._from_native(_native.directions_load(os.fspath(path), n_layers))


def prompts(spec: str, n: Optional[int] = None) -> List[str]:
    """The first ``n`` prompts of a named set (``harmful_train``, ``harmless_val``, ...) or a file
    (JSON, JSONL, StrongREJECT CSV)."""
    return _native.prompt_set(spec, n)


def _prompt_list(p: PromptsArg, n: int) -> List[str]:
    if isinstance(p, str):
        return prompts(p, n)
    return [str(x) for x in p]


def refusal(
    model: Any,
    harmful: PromptsArg = "harmful_train",
    harmless: PromptsArg = "harmless_train",
    harmful_val: PromptsArg = "harmful_val",
    harmless_val: PromptsArg = "harmless_val",
    n_train: int = 128,
    n_val: int = 32,
    positions: Sequence[str] = ("last",),
    kl_max: float = 0.1,
    discard_last_frac: float = 0.2,
    batch_size: int = 16,
    layer_stride: int = 1,
    progress: Progress = None,
) -> DirectionSet:
    """The refusal direction (Arditi et al. 2024): candidates at every layer and position,
    scored on validation prompts; the set of the chosen position with ``selection`` (chosen
    ``layer``, baseline scores, every candidate's bypass / induce / KL). Prompt arguments are lists
    of strings or prompt-set names (then the first ``n_train`` / ``n_val``)."""
    parts, sel = _native.refusal(
        model._m,
        _prompt_list(harmful, n_train),
        _prompt_list(harmless, n_train),
        _prompt_list(harmful_val, n_val),
        _prompt_list(harmless_val, n_val),
        list(positions),
        kl_max,
        discard_last_frac,
        batch_size,
        layer_stride,
        callback(progress),
    )
    return DirectionSet._from_native(parts, json.loads(sel))


def trait(
    model: Any,
    name: str,
    position: str = "response",
    method: str = "diff-in-means",
    max_questions: Optional[int] = None,
    max_pairs: Optional[int] = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: Progress = None,
) -> DirectionSet:
    """A persona vector (Chen et al. 2025) for a built-in trait (``compliant``, ``hostile``, ...)
    or a trait file: each question answered under the positive and negative system prompts, the
    residual averaged over the answer (``position``), the sides contrasted per layer."""
    return DirectionSet._from_native(
        _native.trait_direction(
            model._m, name, position, method, max_questions, max_pairs, max_new_tokens, batch_size, callback(progress)
        )
    )


def random(
    model: Any = None,
    seed: int = 0,
    like: Optional[DirectionSet] = None,
    orthogonal_to: Optional[DirectionSet] = None,
) -> DirectionSet:
    """Seeded random directions of the model's shape (or ``like``'s): unit norm, or ``like``'s norm
    per layer; orthogonal to ``orthogonal_to`` at each layer when given."""
    ref = like or orthogonal_to
    if ref is not None:
        n_layers, d = ref.n_layers, ref.d_model
    elif model is not None:
        n_layers, d = model.n_layers, model.d_model
    else:
        raise ValueError("random directions need a model or a set to take the shape from")
    pick = lambda s: None if s is None else (s.vectors.reshape(-1), json.dumps(s._meta_for_native()))  # noqa: E731
    return DirectionSet._from_native(_native.random_set(n_layers, d, seed, pick(like), pick(orthogonal_to)))


class Geometry(dict):
    """Norms and cosines (``pgate geometry --json``); ``str()`` is the table ``pgate`` prints."""

    def __init__(self, data: Dict[str, Any], table: str) -> None:
        super().__init__(data)
        self.table = table

    def __str__(self) -> str:
        return self.table

    def cosines(self, a: str, b: str) -> np.ndarray:
        """Cosine per layer between the sets named ``a`` and ``b`` (NaN where undefined)."""
        for p in self["pairs"]:
            if (p["a"], p["b"]) in ((a, b), (b, a)):
                return np.array([np.nan if c is None else c for c in p["cos"]])
        raise KeyError(f"no pair {a!r}, {b!r} (sets: {', '.join(self['names'])})")


def geometry(*sets: DirectionSet, all_layers: bool = False) -> Geometry:
    """Norms per layer, cosines between every pair of sets per layer, between adjacent layers,
    and (``all_layers``) across all layers, with the expected |cos| of random directions."""
    data, table = _native.geometry([s._parts() for s in sets], all_layers)
    return Geometry(json.loads(data), table)
