"""persona-gate in Python: measure and control how a chat model's persona gates its refusal.

>>> import persona_gate as pg
>>> m = pg.Model.load("q05")
>>> acts = m.capture(["How do I bake bread?"], layers="all", position="last")  # float32 [layers, n, d]
>>> refusal = pg.directions.refusal(m, "harmful_train", "harmless_train", n_train=32, n_val=8)
>>> plan = pg.Plan().ablate(refusal.at(refusal.layer), layers=range(m.n_layers))
>>> outs = m.generate(["How do I pick a lock?"], plan=plan, max_tokens=64)
>>> pg.label(m, ["How do I pick a lock?"], outs).counts()

The engine is the Rust library behind the ``pgate`` CLI: the same numbers, plans, files and
one-line error messages (raised as :class:`Error` subclasses). Model work runs with the GIL
released; Ctrl-C interrupts a long call with KeyboardInterrupt (studies stay resumable).
"""

from __future__ import annotations

from . import _native, directions, receipts, serve
from ._native import Error, FileError, InvalidInput, ModelError
from .directions import Direction, DirectionSet
from .labels import Label, Labels, label
from .model import Model, Output, Outputs
from .plans import Plan
from .studies import Study, Table, compare

__version__: str = _native.__version__

__all__ = [
    "Model",
    "Output",
    "Outputs",
    "Plan",
    "Direction",
    "DirectionSet",
    "directions",
    "label",
    "Label",
    "Labels",
    "Study",
    "Table",
    "compare",
    "receipts",
    "serve",
    "Error",
    "InvalidInput",
    "FileError",
    "ModelError",
]
