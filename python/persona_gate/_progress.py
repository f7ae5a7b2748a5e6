"""Progress of long calls: the library's events, drawn with tqdm when it is installed.

Every long call takes ``progress``: ``None`` (quiet), ``True`` (a tqdm bar, or one line per phase on
stderr without tqdm) or a callable that receives each event as a dict, e.g.
``{"event": "progress", "data": {"done": 3, "total": 20}}``. An exception raised by the callable
stops the call and is raised from it.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Dict, Optional, Union

Progress = Union[None, bool, Callable[[Dict[str, Any]], Any]]


class _Bar:
    """Renders phase/progress events with tqdm, or plain lines when tqdm is missing."""

    def __init__(self) -> None:
        try:
            from tqdm.auto import tqdm  # type: ignore

            self._tqdm = tqdm
        except Exception:  # tqdm is optional
            self._tqdm = None
        self._bar: Any = None

    def __call__(self, ev: Dict[str, Any]) -> None:
        kind, data = ev.get("event"), ev.get("data")
        if kind == "phase":
            self._close()
            if self._tqdm is not None:
                self._bar = self._tqdm(total=data["total"], desc=data["name"], unit=data["unit"])
            else:
                print(f"[persona_gate] {data['name']}: {data['total']} {data['unit']}", file=sys.stderr)
        elif kind == "progress" and self._bar is not None:
            self._bar.total = data["total"]
            self._bar.n = data["done"]
            self._bar.refresh()
        elif kind in ("note", "warning"):
            msg = f"[persona_gate] {data}"
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, file=sys.stderr)
        elif kind == "phase_end":
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def callback(progress: Progress) -> Optional[Callable[[str], None]]:
    """The native side hands over each event as JSON text."""
    if progress is None or progress is False:
        return None
    fn: Callable[[Dict[str, Any]], Any] = _Bar() if progress is True else progress  # type: ignore

    def on_event(text: str) -> None:
        fn(json.loads(text))

    return on_event
