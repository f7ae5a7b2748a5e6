"""Labels: refusal / bypass / degenerate for (request, answer) pairs, by the labelers of
``pgate label`` (``docs/labels.md``). The default, ``rules`` (rules@2), agrees with careful
reading on 96.9% of the development set's held split; ``probe`` and ``ensemble`` read with a model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from . import _native
from ._progress import Progress, callback


@dataclass
class Label:
    """One verdict: ``label`` (``refusal``, ``bypass`` or ``degenerate``), the labeler's reason in
    one line, and the numbers behind it."""

    label: str
    reason: str
    scores: Dict[str, float] = field(default_factory=dict)
    parts: Dict[str, str] = field(default_factory=dict)


class Labels(List[Label]):
    """Verdicts in row order; ``labeler`` names the labeler and version that gave them."""

    labeler: str

    def __init__(self, items: Sequence[Label], labeler: str) -> None:
        super().__init__(items)
        self.labeler = labeler

    def counts(self) -> Dict[str, int]:
        return dict(Counter(v.label for v in self))

    def rate(self, label: str = "refusal") -> float:
        """Share of rows with ``label`` (no interval: see studies for Wilson intervals)."""
        return sum(v.label == label for v in self) / max(len(self), 1)


def label(
    model: Any,
    prompts: Union[str, Sequence[str]],
    outputs: Any,
    labeler: str = "rules",
    probe: Optional[str] = None,
    system: Union[None, str, Sequence[Optional[str]]] = None,
    batch_size: int = 8,
    progress: Progress = None,
) -> Labels:
    """Label answers to requests. ``outputs``: the result of :meth:`Model.generate`, or texts.
    ``model`` is the reader for ``probe`` / ``ensemble`` (may be None for ``rules``)."""
    ps = [prompts] if isinstance(prompts, str) else list(prompts)
    outs = [outputs] if isinstance(outputs, str) else list(outputs)
    texts = [getattr(o, "text", o) for o in outs]
    if len(texts) != len(ps):
        raise ValueError(f"{len(texts)} outputs for {len(ps)} prompts")
    systems = [system] * len(ps) if system is None or isinstance(system, str) else list(system)
    rows = [{"prompt": str(p), "output": str(t), "system": s} for p, t, s in zip(ps, texts, systems)]
    m = None if model is None else getattr(model, "_m", model)
    labeler_id, verdicts = _native.label_rows(json.dumps(rows), labeler, m, probe, batch_size, callback(progress))
    items = [Label(v["label"], v.get("reason", ""), v.get("scores", {}), v.get("parts", {})) for v in json.loads(verdicts)]
    return Labels(items, labeler_id)
