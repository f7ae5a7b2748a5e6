"""Start and stop ``pgate serve`` (the OpenAI-compatible server with persona presets, steering
and continuous batching) from Python.

The server runs in a child Python process that calls the library's server (no ``pgate`` binary
needed); :meth:`Server.stop` ends it with SIGINT, as Ctrl-C ends ``pgate serve``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import List, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

# The child reports a library error as one tab-separated line (class, message) instead of a
# traceback, so :func:`start` raises the same class with the same one-line message as a call in
# this process would.
_ERR = "persona_gate error"
_CHILD = f"""
import json, sys
from persona_gate import _native
try:
    _native.serve_forever(**json.loads(sys.argv[1]))
except _native.Error as e:
    print({_ERR!r}, type(e).__name__, " ".join(str(e).split("\\n")), sep="\\t", file=sys.stderr, flush=True)
    sys.exit(1)
"""


class Server:
    """A running server: ``url`` (``http://HOST:PORT``), :meth:`stop`, and ``with`` support."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"Server({self.url!r}, {state})"


def start(
    model: str,
    port: int = 0,
    host: str = "127.0.0.1",
    dtype: str = "q",
    presets: Optional[PathLike] = None,
    directions: Sequence[PathLike] = (),
    max_batch: int = 32,
    api_key: Optional[str] = None,
    timeout: float = 300.0,
) -> Server:
    """Serve ``model`` (a short name, ``.gguf`` or HF directory) and return once it accepts
    requests (``port=0`` picks a free port; see ``Server.url``). Errors in the presets,
    directions or model are raised with the server's message."""
    args = {
        "model": str(model),
        "host": host,
        "port": int(port),
        "dtype": dtype,
        "presets": None if presets is None else os.fspath(presets),
        "directions": [os.fspath(d) for d in directions],
        "max_batch": int(max_batch),
        "api_key": api_key,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: List[str] = []
    err_reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    err_reader.start()
    url: List[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("listening on "):
                url.append(line.split("listening on ", 1)[1].strip())
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not url:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err_reader.join(5.0)  # the child's last words, read to its end
        raise _child_error(err, timeout)
    return Server(proc, url[0])


def _child_error(err: List[str], timeout: float) -> Exception:
    """The library error the child reported (same class and message), else its last stderr line."""
    from . import _native

    for line in reversed(err):
        parts = line.rstrip("\n").split("\t", 2)
        if len(parts) == 3 and parts[0] == _ERR:
            cls = getattr(_native, parts[1], _native.Error)
            return cls(parts[2]) if isinstance(cls, type) and issubclass(cls, _native.Error) else _native.Error(parts[2])
    last = [l.strip() for l in err if l.strip()]
    return _native.Error(last[-1] if last else f"the server did not start within {timeout:g} s")
