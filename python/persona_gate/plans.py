"""Intervention plans: add, ablate and cap directions in the residual stream, per layer.

A :class:`Plan` is the plan-file JSON of ``pgate generate --plan``: operations applied in order at
the output of the named blocks (``resid[l]`` = output of block ``l``, 0-based, before the final
norm). ``plan.save("plan.json")`` writes a file the CLI runs unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Union

from ._arrays import as_vector

Layers = Union[int, str, Iterable[int]]


def layer_list(layers: Layers) -> List[int]:
    """Layers as a sorted list: ``12``, ``range(10, 15)``, ``[3, 5]`` or ``"10-14,20"``."""
    if isinstance(layers, bool):
        raise TypeError("layers must be ints, a range or a string like '10-14'")
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, str):
        out: List[int] = []
        for part in (p.strip() for p in layers.split(",")):
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        return sorted(set(out))
    return sorted({int(x) for x in layers})


def _layer_string(layers: Layers) -> str:
    ls = layer_list(layers)
    if not ls:
        raise ValueError("no layers given")
    return ",".join(str(x) for x in ls)


class Plan:
    """An ordered list of residual-stream operations.

    >>> plan = Plan().add(persona, 3.0, layers=range(10, 15)).ablate(refusal.at(21), layers=range(15, 28))

    A direction is a :class:`~persona_gate.directions.Direction` (one vector, used at every listed
    layer), a :class:`~persona_gate.directions.DirectionSet` (each layer's own vector), or any
    1-D array (numpy, list, torch tensor). Methods return the plan, so calls chain.
    """

    def __init__(self, ops: Optional[List[Dict[str, Any]]] = None) -> None:
        self.ops: List[Dict[str, Any]] = list(ops or [])

    # -- building -----------------------------------------------------------------------------
    def _push(self, kind: Dict[str, Any], direction: Any, layers: Layers, positions: str, sites: str) -> "Plan":
        if positions not in ("all", "prompt", "generated"):
            raise ValueError(f"positions must be all, prompt or generated, not {positions!r}")
        base = dict(kind, positions=positions)
        if sites != "output":
            base["sites"] = sites
        per_layer = getattr(direction, "vectors", None)
        if per_layer is not None and getattr(per_layer, "ndim", 1) == 2:
            # A direction set: each layer gets its own vector.
            name = direction.name
            for layer in layer_list(layers):
                op = dict(base, layers=str(layer), direction_name=f"{name}[{layer}]")
                op["direction"] = as_vector(per_layer[layer]).tolist()
                self.ops.append(op)
            return self
        name = getattr(direction, "label", None) or getattr(direction, "name", None) or ""
        vec = getattr(direction, "vector", direction)
        op = dict(base, layers=_layer_string(layers), direction_name=str(name))
        op["direction"] = as_vector(vec).tolist()
        self.ops.append(op)
        return self

    def add(self, direction: Any, coeff: float, layers: Layers, positions: str = "all", raw: bool = False) -> "Plan":
        """Add ``coeff`` times the unit direction (``raw=True``: the vector as given)."""
        return self._push({"op": "add", "coeff": float(coeff), "raw": bool(raw)}, direction, layers, positions, "output")

    def ablate(self, direction: Any, layers: Layers, positions: str = "all", sites: str = "output") -> "Plan":
        """Project the direction out: ``h - (h.u) u`` (``sites="all"``: also before attention and MLP)."""
        return self._push({"op": "ablate"}, direction, layers, positions, sites)

    def cap(
        self,
        direction: Any,
        layers: Layers,
        lo: Optional[float] = None,
        hi: Optional[float] = None,
        positions: str = "all",
        sites: str = "output",
    ) -> "Plan":
        """Clamp the projection ``h.u`` into ``[lo, hi]`` (either bound may be omitted)."""
        kind: Dict[str, Any] = {"op": "cap", "lo": None if lo is None else float(lo), "hi": None if hi is None else float(hi)}
        return self._push(kind, direction, layers, positions, sites)

    def __add__(self, other: "Plan") -> "Plan":
        return Plan(self.ops + other.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        parts = []
        for op in self.ops:
            what = op["op"] + (f" {op['coeff']:g}" if op["op"] == "add" else "")
            parts.append(f"{what} {op.get('direction_name') or 'vector'} @ {op['layers']}")
        return "Plan(" + "; ".join(parts) + ")"

    # -- files --------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The plan-file JSON (``pgate generate --plan``)."""
        return json.dumps({"ops": self.ops})

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan as a JSON plan file the CLI reads."""
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: Any) -> "Plan":
        """Read a plan file (JSON or TOML; directions inline or by file, relative to the file)
        and check it against ``model``."""
        from . import _native

        p = os.fspath(path)
        with open(p) as f:
            text = f.read()
        base = os.path.dirname(os.path.abspath(p))
        norm = _native.plan_check(_native_model(model), text, base, p.lower().endswith(".toml"))
        return cls(json.loads(norm)["ops"])

    def check(self, model: Any) -> "Plan":
        """Check the plan against ``model`` (layers in range, widths, finite values); the same
        checks and messages as the CLI. Returns the plan."""
        from . import _native

        _native.plan_check(_native_model(model), self.to_json())
        return self


def _native_model(model: Any) -> Any:
    return getattr(model, "_m", model)
