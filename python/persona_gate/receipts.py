"""Refusal receipts (``pgate-receipt/1``): write them from a study, verify them (every hash
recomputed), and gate a deployment on them (``pgate check``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

from . import _native

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Result:
    """``ok``: every check passed (verify) or the gate passed (check); ``report``: the JSON form;
    ``text``: what ``pgate`` prints. ``bool(result)`` is ``ok``."""

    ok: bool
    report: Dict[str, Any]
    text: str

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.text


def write(db: PathLike, out: PathLike, study: Optional[str] = None, policy_version: Optional[str] = None) -> List[str]:
    """Write the receipts of a study in ``db`` (default: the latest run) to the folder ``out``."""
    files, _ = _native.receipts_write(os.fspath(db), os.fspath(out), study, policy_version)
    return [os.fspath(f) for f in files]


def verify(
    path: PathLike,
    db: Optional[PathLike] = None,
    model: Optional[PathLike] = None,
    pubkey: Optional[PathLike] = None,
    skip_files: bool = False,
    verbose: bool = False,
) -> Result:
    """Verify receipts (a receipt, a ``bundle.json`` or a folder): every hash and number
    recomputed from the files, the rows and the database."""
    f = lambda p: None if p is None else os.fspath(p)  # noqa: E731
    ok, data, text = _native.receipts_verify(os.fspath(path), f(db), f(model), f(pubkey), skip_files, verbose)
    return Result(ok, json.loads(data), text)


def check(
    paths: Union[PathLike, Sequence[PathLike]],
    max_refusal_drop: float = 5.0,
    bound: str = "upper",
    max_unsafe_rate: Optional[float] = None,
    max_benign_refusal: Optional[float] = None,
    min_labeler_accuracy: Optional[float] = None,
    pubkey: Optional[PathLike] = None,
    db: Optional[PathLike] = None,
) -> Result:
    """The deployment gate: each condition's refusal drop (percentage points, at the interval
    ``bound``) within ``max_refusal_drop``, and the optional limits."""
    ps = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    f = lambda p: None if p is None else os.fspath(p)  # noqa: E731
    ok, data, text = _native.receipts_check(
        ps, max_refusal_drop, bound, max_unsafe_rate, max_benign_refusal, min_labeler_accuracy, f(pubkey), f(db)
    )
    return Result(ok, json.loads(data), text)
