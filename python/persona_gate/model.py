"""``Model``: load a chat model, read its residual stream, generate under plans."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from . import _native
from ._progress import Progress, callback
from .plans import Plan, layer_list

Prompts = Union[str, Sequence[str], Sequence[Sequence[int]]]
Systems = Union[None, str, Sequence[Optional[str]]]


@dataclass
class Output:
    """One answer: its text, generated token ids (the stop token included), why it ended
    (``stop`` or ``length``) and the prompt's token count."""

    prompt: str
    system: Optional[str]
    text: str
    tokens: List[int]
    finish: str
    prompt_tokens: int


class Outputs(List[Output]):
    """Answers in prompt order, with the run's counters in ``stats`` (prefill / decode tokens and
    seconds)."""

    stats: Dict[str, float]

    def __init__(self, items: Iterable[Output], stats: Dict[str, float]) -> None:
        super().__init__(items)
        self.stats = stats

    @property
    def texts(self) -> List[str]:
        return [o.text for o in self]

    @property
    def tokens(self) -> List[List[int]]:
        return [o.tokens for o in self]


def _as_list(prompts: Prompts) -> List[Any]:
    if isinstance(prompts, str):
        return [prompts]
    return list(prompts)


def _systems(system: Systems, n: int) -> List[Optional[str]]:
    if system is None or isinstance(system, str):
        return [system] * n
    s = list(system)
    if len(s) != n:
        raise ValueError(f"{len(s)} system prompts for {n} prompts")
    return s


def _is_ids(p: List[Any]) -> bool:
    return bool(p) and not isinstance(p[0], str)


class Model:
    """A loaded chat model.

    >>> m = Model.load("q05", dtype="f32")
    >>> acts = m.capture(["Hi!"], layers="all", position="last")   # float32 [layers, n, d]
    """

    def __init__(self, native: Any) -> None:
        self._m = native
        self._info: Optional[Dict[str, Any]] = None

    @classmethod
    def load(cls, spec: str, dtype: str = "q", device: str = "cpu", threads: Optional[int] = None) -> "Model":
        """Load a model: a cached short name (``q05``, ``q15``, ``smollm2``), a ``.gguf`` file, an HF
        directory or a hub repo id. ``dtype``: ``q`` (quantized matmuls, fast on CPU), ``f32``
        (reference), ``bf16``, ``f16``; ``device``: ``cpu``, ``cuda``, ``cuda:N``, or a comma-separated
        list (``cuda:0,cuda:1``) that splits the layers over those devices in order (a model larger
        than one GPU); ``threads``: CPU kernel threads."""
        return cls(_native.Model.load(str(spec), dtype, device, threads))

    # -- description --------------------------------------------------------------------------
    @property
    def info(self) -> Dict[str, Any]:
        """What ``pgate inspect --json`` prints."""
        if self._info is None:
            self._info = json.loads(self._m.info_json())
        return self._info

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def n_layers(self) -> int:
        return int(self._m.n_layers)

    @property
    def d_model(self) -> int:
        return int(self._m.d_model)

    @property
    def vocab_size(self) -> int:
        return int(self._m.vocab_size)

    def __repr__(self) -> str:
        return repr(self._m)

    # -- tokens -------------------------------------------------------------------------------
    def encode(self, prompt: str, system: Optional[str] = None) -> List[int]:
        """Token ids of a chat prompt in the model's template, generation prompt included."""
        return self._m.encode(prompt, system)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._m.decode(list(ids), skip_special)

    # -- residual stream ----------------------------------------------------------------------
    def capture(
        self,
        prompts: Prompts,
        layers: Union[str, int, Iterable[int]] = "all",
        position: str = "last",
        system: Systems = None,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        progress: Progress = None,
    ) -> np.ndarray:
        """Residual stream at the output of each block (before the final norm), float32
        ``[layers, n, d_model]`` (an int ``layers`` gives ``[n, d_model]``).

        ``prompts``: chat messages (rendered with the model's template and ``system``) or token-id
        lists (taken as they are). ``position``: ``last``, ``-k`` (k-th prompt token from the end),
        ``post-instruction`` (mean over the template tokens after the message) or ``response``
        (mean over a greedy answer of ``max_new_tokens``). The array owns the engine's buffer: no
        copy for ``layers="all"``, an int, or a contiguous range."""
        p = _as_list(prompts)
        cb = callback(progress)
        if _is_ids(p):
            if not position.startswith("-") and position != "last":
                raise ValueError("token-id prompts take position 'last' or '-k'")
            k = 1 if position == "last" else int(position[1:])
            acts = self._m.capture_ids([list(map(int, x)) for x in p], k, batch_size, cb)
        else:
            acts, _ = self._m.capture(p, _systems(system, len(p)), position, batch_size, max_new_tokens, cb)
        return _select_layers(acts, layers, self.n_layers)

    def logits(self, prompts: Prompts, plan: Optional[Plan] = None, system: Systems = None, batch_size: int = 8) -> np.ndarray:
        """Next-token logits after each prompt, float32 ``[n, vocab]``, under an optional plan."""
        p = _as_list(prompts)
        if not _is_ids(p):
            p = [self.encode(u, s) for u, s in zip(p, _systems(system, len(p)))]
        return self._m.logits([list(map(int, x)) for x in p], None if plan is None else plan.to_json(), batch_size)

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompts,
        plan: Optional[Plan] = None,
        max_tokens: int = 128,
        batch_size: int = 16,
        system: Systems = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        plans: Optional[Sequence[Optional[Plan]]] = None,
        progress: Progress = None,
    ) -> Outputs:
        """Answer chat prompts in batches (left-padded, refilled as answers finish), greedy unless
        ``temperature > 0``. ``plan`` applies to every prompt; ``plans`` gives one per prompt
        (``None``: unsteered). Returns the answers with their token ids and the run's counters."""
        users = [str(x) for x in _as_list(prompts)]
        n = len(users)
        systems = _systems(system, n)
        if plans is not None and plan is not None:
            raise ValueError("give plan (one for all prompts) or plans (one per prompt), not both")
        per = list(plans) if plans is not None else [plan] * n
        if len(per) != n:
            raise ValueError(f"{len(per)} plans for {n} prompts")
        texts: List[str] = []
        index: Dict[int, int] = {}
        plan_of: List[Optional[int]] = []
        for p in per:
            if p is None:
                plan_of.append(None)
                continue
            if id(p) not in index:
                index[id(p)] = len(texts)
                texts.append(p.to_json())
            plan_of.append(index[id(p)])
        rows, stats = self._m.generate(
            users, systems, texts, plan_of, max_tokens, batch_size, temperature, top_p, seed, callback(progress)
        )
        outs = (Output(u, s, t, tok, f, pt) for u, s, (t, tok, f, pt) in zip(users, systems, rows))
        return Outputs(outs, json.loads(stats))


def _select_layers(acts: np.ndarray, layers: Union[str, int, Iterable[int]], n_layers: int) -> np.ndarray:
    if isinstance(layers, str) and layers == "all":
        return acts
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not -n_layers <= layers < n_layers:
            raise IndexError(f"layer {layers} is out of range: the model has {n_layers} layers (0..={n_layers - 1})")
        return acts[layers]
    ls = layer_list(layers)  # type: ignore[arg-type]
    bad = [x for x in ls if not 0 <= x < n_layers]
    if bad:
        raise IndexError(f"layer {bad[0]} is out of range: the model has {n_layers} layers (0..={n_layers - 1})")
    if ls and ls == list(range(ls[0], ls[-1] + 1)):
        return acts[ls[0] : ls[-1] + 1]  # a view
    return acts[ls]
