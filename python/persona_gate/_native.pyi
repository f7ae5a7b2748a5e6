"""Type stubs of the compiled extension (``persona_gate._native``). The public API is the Python
package around it (``persona_gate``); these are its building blocks."""

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

__version__: str

class Error(Exception):
    """Any persona-gate failure (the library's one-line message)."""

class InvalidInput(Error):
    """Bad input: a layer out of range, a wrong width, an empty set, a malformed spec, a NaN."""

class FileError(Error):
    """A file could not be read or written, or is not what it should be."""

class ModelError(Error):
    """A model could not be loaded or failed while running."""

_Cb = Optional[Callable[[str], None]]
_SetParts = Tuple[np.ndarray, str, Optional[np.ndarray], Optional[np.ndarray]]
_FlatSet = Tuple[np.ndarray, int, int, str]

class Model:
    """A loaded chat model (thread-safe)."""

    @staticmethod
    def load(spec: str, dtype: str = "q", device: str = "cpu", threads: Optional[int] = None) -> "Model": ...
    def info_json(self) -> str: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, user: str, system: Optional[str] = None) -> List[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...
    def stop_ids(self) -> List[int]: ...
    def capture(
        self,
        users: Sequence[str],
        systems: Sequence[Optional[str]],
        position: str = "last",
        batch_size: int = 8,
        max_new_tokens: int = 64,
        progress: _Cb = None,
    ) -> Tuple[np.ndarray, List[int]]: ...
    def capture_ids(
        self, ids: Sequence[Sequence[int]], from_end: int = 1, batch_size: int = 8, progress: _Cb = None
    ) -> np.ndarray: ...
    def generate(
        self,
        users: Sequence[str],
        systems: Sequence[Optional[str]],
        plans: Sequence[str],
        plan_of: Sequence[Optional[int]],
        max_tokens: int = 128,
        batch_size: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        progress: _Cb = None,
    ) -> Tuple[List[Tuple[str, List[int], str, int]], str]: ...
    def logits(self, ids: Sequence[Sequence[int]], plan: Optional[str] = None, batch_size: int = 8) -> np.ndarray: ...

def plan_check(model: Model, text: str, base: str = ".", toml: bool = False) -> str: ...
def directions_load(path: str, n_layers: Optional[int] = None) -> _SetParts: ...
def directions_save(path: str, flat: np.ndarray, n_layers: int, d: int, meta: str) -> None: ...
def directions_export_gguf(
    path: str, flat: np.ndarray, n_layers: int, d: int, meta: str, coeff: float = 1.0, unit: bool = False,
    layers: Optional[Sequence[int]] = None,
) -> str: ...
def prompt_set(spec: str, n: Optional[int] = None) -> List[str]: ...
def refusal(
    model: Model, harmful: Sequence[str], harmless: Sequence[str], harmful_val: Sequence[str], harmless_val: Sequence[str],
    positions: Sequence[str], kl_max: float = 0.1, discard_last_frac: float = 0.2, batch_size: int = 16,
    layer_stride: int = 1, progress: _Cb = None,
) -> Tuple[_SetParts, str]: ...
def trait_direction(
    model: Model, spec: str, position: str = "response", method: str = "diff-in-means",
    max_questions: Optional[int] = None, max_pairs: Optional[int] = None, max_new_tokens: int = 64,
    batch_size: int = 8, progress: _Cb = None,
) -> _SetParts: ...
def random_set(
    n_layers: int, d: int, seed: int, like: Optional[Tuple[np.ndarray, str]] = None,
    orthogonal_to: Optional[Tuple[np.ndarray, str]] = None,
) -> _SetParts: ...
def geometry(sets: Sequence[_FlatSet], all_layers: bool = False) -> Tuple[str, str]: ...
def label_rows(
    rows: str, labeler: str = "rules", model: Optional[Model] = None, probe: Optional[str] = None,
    batch_size: int = 8, progress: _Cb = None,
) -> Tuple[str, str]: ...
def study_check(path: str) -> Tuple[str, str]: ...
def study_run(
    study: str, db: str, limit: Optional[int] = None, judge: bool = True, device: str = "cpu",
    wave: Optional[int] = None, progress: _Cb = None,
) -> str: ...
def study_status(db: str, which: Optional[str] = None) -> Tuple[str, str]: ...
def study_table(
    db: str, study: Optional[str] = None, by_category: bool = False, baseline: Optional[str] = None,
    bootstrap: Optional[int] = None,
) -> Tuple[str, str]: ...
def study_compare(db: str, a: str, b: str, show: int = 5) -> Tuple[str, str]: ...
def study_export(db: str, out: str, format: str = "jsonl", which: Optional[str] = None) -> int: ...
def receipts_write(db: str, out: str, study: Optional[str] = None, policy_version: Optional[str] = None) -> Tuple[List[str], str]: ...
def receipts_verify(
    path: str, db: Optional[str] = None, model: Optional[str] = None, pubkey: Optional[str] = None,
    skip_files: bool = False, verbose: bool = False,
) -> Tuple[bool, str, str]: ...
def receipts_check(
    paths: Sequence[str], max_refusal_drop: float = 5.0, bound: str = "upper", max_unsafe_rate: Optional[float] = None,
    max_benign_refusal: Optional[float] = None, min_labeler_accuracy: Optional[float] = None,
    pubkey: Optional[str] = None, db: Optional[str] = None,
) -> Tuple[bool, str, str]: ...
def serve_forever(
    model: str, host: str = "127.0.0.1", port: int = 8080, dtype: str = "q", presets: Optional[str] = None,
    directions: Sequence[str] = (), max_batch: int = 32, api_key: Optional[str] = None,
) -> None: ...
