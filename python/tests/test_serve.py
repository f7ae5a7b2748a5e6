"""`pg.serve.start`: the OpenAI-compatible server in a child process, reached over HTTP.

The child is a Python process running the extension's server (`_native.serve_forever`), not the
`pgate` binary, so this file needs no PGATE_BIN; it runs wherever the wheel is installed."""

import json
import urllib.error
import urllib.request

import pytest
import persona_gate as pg

from conftest import model_path


def _get(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_serve_chat_completion_and_stop():
    with pg.serve.start(model_path("smollm2"), port=0) as server:
        assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")
        models = _get(server.url + "/v1/models")["data"]
        assert models, "the server lists no model"
        out = _post(
            server.url + "/v1/chat/completions",
            {"model": models[0]["id"], "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0},
        )
        choice = out["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str) and choice["message"]["content"].strip()
        assert out["usage"]["completion_tokens"] <= 4
        proc, url = server.proc, server.url
    # Leaving the block stopped the child, and with it the port.
    assert proc.poll() is not None
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _get(url + "/v1/models", timeout=5)


def test_serve_bad_model_raises_one_line(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(pg.Error) as e:
        pg.serve.start(str(missing), port=0, timeout=120)
    msg = str(e.value)
    assert "\n" not in msg and "missing.gguf" in msg, msg
    assert "Traceback" not in msg
    # The same message Model.load gives (the library's one-line error).
    with pytest.raises(pg.Error) as direct:
        pg.Model.load(str(missing))
    assert msg == str(direct.value)
    assert type(e.value) is type(direct.value)
