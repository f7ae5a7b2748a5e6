"""Studies: TOML files of conditions (personas, plans, sweeps) x prompt sets, run into a SQLite
results store that survives interruption, summarized with Wilson intervals and paired statistics.
Rates rest on the study's labeler (rules@2 by default)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Union

from . import _native
from ._progress import Progress, callback

PathLike = Union[str, "os.PathLike[str]"]


class Table:
    """A study's summary table: ``rows`` (dicts, one per condition and prompt set), ``str()`` the
    text ``pgate study table`` prints, :meth:`to_pandas` a DataFrame (pandas optional)."""

    def __init__(self, data: Dict[str, Any], text: str) -> None:
        self.data = data
        self.text = text
        self.rows: List[Dict[str, Any]] = data.get("rows", [])

    def __str__(self) -> str:
        return self.text

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def flat(self) -> List[Dict[str, Any]]:
        """Rows with rates flattened (``refusal``, ``refusal_lo``, ``refusal_hi``, ...)."""
        out = []
        for r in self.rows:
            f: Dict[str, Any] = {}
            for k, v in r.items():
                if isinstance(v, dict) and {"p", "lo", "hi"} <= set(v):
                    f[k] = v.get("p")
                    f[k + "_lo"], f[k + "_hi"] = v.get("lo"), v.get("hi")
                    f[k + "_k"] = v.get("k")
                elif k == "vs_baseline" and isinstance(v, dict):
                    for kk, vv in v.items():
                        if not isinstance(vv, (dict, list)):
                            f["vs_baseline_" + kk] = vv
                elif not isinstance(v, (dict, list)):
                    f[k] = v
            out.append(f)
        return out

    def to_pandas(self):  # type: ignore[no-untyped-def]
        import pandas as pd  # optional dependency

        return pd.DataFrame(self.flat())


class Study:
    """A study file. ``Study.load(path)`` checks it (conditions, prompt sets, judges) without
    running anything; :meth:`run` fills a results database."""

    def __init__(self, path: PathLike, overview: Dict[str, Any], text: str) -> None:
        self.path = os.fspath(path)
        self.overview = overview
        self.text = text
        self.db: Optional[str] = None

    @classmethod
    def load(cls, path: PathLike) -> "Study":
        data, text = _native.study_check(os.fspath(path))
        return cls(path, json.loads(data), text)

    def __repr__(self) -> str:
        return f"Study({self.path!r})"

    def _db(self, db: Optional[PathLike]) -> str:
        d = db if db is not None else self.db
        if d is None:
            raise ValueError("no results database: pass db= (or run the study first)")
        return os.fspath(d)

    def run(
        self,
        db: PathLike,
        limit: Optional[int] = None,
        judge: bool = True,
        device: str = "cpu",
        wave: Optional[int] = None,
        progress: Progress = None,
    ) -> Dict[str, Any]:
        """Generate the missing results into ``db`` (resumable), then grade them with the
        study's model judges. Ctrl-C stops after the current wave with every finished result
        stored (running again continues) and raises KeyboardInterrupt."""
        self.db = os.fspath(db)
        return json.loads(_native.study_run(self.path, self.db, limit, judge, device, wave, callback(progress)))

    def status(self, db: Optional[PathLike] = None) -> Dict[str, Any]:
        data, _ = _native.study_status(self._db(db), None)
        return json.loads(data)

    def table(
        self,
        db: Optional[PathLike] = None,
        by_category: bool = False,
        baseline: Optional[str] = None,
        bootstrap: Optional[int] = None,
        study: Optional[str] = None,
    ) -> Table:
        data, text = _native.study_table(self._db(db), study, by_category, baseline, bootstrap)
        return Table(json.loads(data), text)

    def export(self, out: PathLike, format: str = "jsonl", db: Optional[PathLike] = None) -> int:
        """Write every result row (``jsonl``, ``csv`` or ``parquet``); returns the row count."""
        return _native.study_export(self._db(db), os.fspath(out), format, None)


def compare(db: PathLike, a: str, b: str, show: int = 5) -> Dict[str, Any]:
    """Compare two studies of one database item by item (e.g. local vs endpoint)."""
    data, text = _native.study_compare(os.fspath(db), a, b, show)
    out = json.loads(data)
    out["text"] = text
    return out
