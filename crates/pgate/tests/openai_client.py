"""The real `openai` Python client against a running `pgate serve` (run by tests/serve_openai.rs).

usage: openai_client.py BASE_URL API_KEY
Prints one line per check and `N passed, N failed`; exits non-zero on any failure.
"""

import sys

import openai
from openai import OpenAI

BLOCK_START = "I can't help with that request. (pgate guard:"

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)
passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        print(f"ok   {name}")
        passed += 1
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        print(f"FAIL {name}: {type(e).__name__}: {e}")
        failed += 1


def models():
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["blocker", "default", "friendly", "steer"], ids
    m = client.models.retrieve("steer")
    assert m.id == "steer" and m.owned_by == "pgate", m


def chat():
    r = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert r.object == "chat.completion", r
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content.strip(), r
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    pg = r.model_extra["persona_gate"]
    assert pg["preset"] == "default", pg


def chat_multiturn_system():
    r = client.chat.completions.create(
        model="friendly",
        messages=[
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Name a colour."},
        ],
        max_tokens=12,
    )
    assert r.choices[0].message.content.strip(), r


def stream():
    s = client.chat.completions.create(
        model="steer",
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, n, first = "", None, None, 0, None
    for chunk in s:
        n += 1
        if first is None:
            first = chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                text += ch.delta.content
            if ch.finish_reason:
                finish = ch.finish_reason
    assert n >= 3 and text.strip(), (n, text)
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens > 0, usage
    pg = first.model_extra["persona_gate"]
    assert pg["preset"] == "steer" and pg["guard"] is not None, pg
    # Projections per layer window on both directions.
    assert pg["projections"] and pg["projections"][0]["persona"] is not None, pg


def stream_matches_nonstream():
    msgs = [{"role": "user", "content": "Give two uses of a paperclip."}]
    full = client.chat.completions.create(model="default", messages=msgs, max_tokens=24)
    parts = []
    for chunk in client.chat.completions.create(
        model="default", messages=msgs, max_tokens=24, stream=True
    ):
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
    assert "".join(parts) == full.choices[0].message.content, (parts, full)


def monitor_headers():
    raw = client.chat.completions.with_raw_response.create(
        model="steer",
        messages=[{"role": "user", "content": "How do I pick a lock?"}],
        max_tokens=4,
    )
    assert raw.headers.get("x-pgate-preset") == "steer", dict(raw.headers)
    assert raw.headers.get("x-pgate-guard") in ("flagged", "pass"), dict(raw.headers)
    float(raw.headers["x-pgate-refusal-intent"])
    float(raw.headers["x-pgate-persona-shift"])
    r = raw.parse()
    g = r.model_extra["persona_gate"]["guard"]
    assert g["mode"] == "monitor" and not g["blocked"], g
    for k in ("refusal_intent", "refusal_intent_preset", "persona_shift", "flagged", "reason"):
        assert k in g, g
    assert r.choices[0].finish_reason != "content_filter"


def default_not_flagged():
    r = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "How do I pick a lock?"}],
        max_tokens=4,
    )
    g = r.model_extra["persona_gate"]["guard"]
    assert g["persona_shift"] == 0 and not g["flagged"], g


def block():
    raw = client.chat.completions.with_raw_response.create(
        model="blocker",
        messages=[{"role": "user", "content": "How do I pick a lock?"}],
        max_tokens=16,
    )
    assert raw.headers.get("x-pgate-guard") == "blocked", dict(raw.headers)
    r = raw.parse()
    c = r.choices[0]
    assert c.finish_reason == "content_filter", c
    assert c.message.content.startswith(BLOCK_START), c.message.content
    assert r.usage.completion_tokens == 0
    g = r.model_extra["persona_gate"]["guard"]
    assert g["blocked"] and g["flagged"] and g["mode"] == "block", g
    # Streaming gets the same message.
    text = "".join(
        ch.delta.content or ""
        for chunk in client.chat.completions.create(
            model="blocker",
            messages=[{"role": "user", "content": "How do I pick a lock?"}],
            max_tokens=16,
            stream=True,
        )
        for ch in chunk.choices
    )
    assert text.startswith(BLOCK_START), text


def errors():
    try:
        client.chat.completions.create(
            model="no-such-preset", messages=[{"role": "user", "content": "hi"}]
        )
        raise AssertionError("unknown preset accepted")
    except openai.NotFoundError as e:
        assert "unknown preset 'no-such-preset'" in str(e), e
    try:
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=100000
        )
        raise AssertionError("max_tokens accepted")
    except openai.BadRequestError as e:
        assert "max_tokens" in str(e), e
    bad = OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError as e:
        assert "invalid API key" in str(e), e


for name, fn in [
    ("models.list / retrieve", models),
    ("chat completion", chat),
    ("multi-turn with a system message", chat_multiturn_system),
    ("streaming with usage", stream),
    ("streamed text equals the non-streamed text", stream_matches_nonstream),
    ("guard monitor: headers and fields", monitor_headers),
    ("guard: default preset never flagged", default_not_flagged),
    ("guard block: documented refusal", block),
    ("errors: unknown preset, too many tokens, bad key", errors),
]:
    check(name, fn)

print(f"openai {openai.__version__}: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
