#!/usr/bin/env python3
"""Time to first token under a burst (issue 18), standard library only.

1. Idle: 8 streaming requests one after another; their time to first token (TTFT) is the baseline.
2. Busy: 32 streaming requests of 256 tokens start and all reach their first token; then 32 new
   requests arrive at once. Reports the new requests' p50 TTFT against the idle one, and, for the 32
   running streams, the longest gap between tokens during the burst and the tokens they received
   while the burst was being prefilled (running sequences keep decoding when prefill is chunked).
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PROMPTS = [
    "Explain photosynthesis in two sentences.",
    "Write a haiku about autumn leaves.",
    "Describe how a bicycle gear system works.",
    "What does a compiler do?",
]


def stream(url, preset, max_tokens, i, rec):
    """One streaming chat completion; rec gets the send time and each token chunk's arrival time."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({
        "model": preset,
        "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (request {i})"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    })
    rec["sent"] = time.perf_counter()
    rec["tokens"] = []
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        rec["error"] = f"HTTP {resp.status}: {resp.read()[:200]!r}"
        return
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        ch = ev.get("choices") or [{}]
        if ch[0].get("delta", {}).get("content"):
            rec["tokens"].append(time.perf_counter())
    conn.close()


def ttft(rec):
    return rec["tokens"][0] - rec["sent"] if rec.get("tokens") else None


def metrics(url):
    """The server's counters (name -> value), or {} when /metrics does not answer."""
    import urllib.request
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-tokens", type=int, default=256, help="tokens of each running stream")
    a = ap.parse_args()

    idle = []
    for i in range(8):
        r = {}
        stream(a.url, a.preset, 8, i, r)
        idle.append(ttft(r))
    idle = [x for x in idle if x is not None]

    running = [{} for _ in range(32)]
    ths = [threading.Thread(target=stream, args=(a.url, a.preset, a.run_tokens, 100 + i, running[i]))
           for i in range(32)]
    for t in ths:
        t.start()
    t0 = time.perf_counter()
    while not all(r.get("tokens") for r in running) and time.perf_counter() - t0 < 300:
        time.sleep(0.01)
    time.sleep(0.5)
    burst = [{} for _ in range(32)]
    bths = [threading.Thread(target=stream, args=(a.url, a.preset, 16, 200 + i, burst[i]))
            for i in range(32)]
    m0 = metrics(a.url)
    b0 = time.perf_counter()
    for t in bths:
        t.start()
    for t in bths:
        t.join()
    m1 = metrics(a.url)
    b1 = max((r["tokens"][0] for r in burst if r.get("tokens")), default=time.perf_counter())
    for t in ths:
        t.join()

    def gaps(r):
        ts = [x for x in r.get("tokens", []) if b0 - 0.5 <= x <= b1 + 0.5]
        return max((y - x for x, y in zip(ts, ts[1:])), default=None)

    during = [sum(1 for x in r.get("tokens", []) if b0 <= x <= b1) for r in running]
    burst_ttft = [ttft(r) for r in burst if ttft(r) is not None]
    out = {
        "idle_ttft_p50_s": statistics.median(idle) if idle else None,
        "burst_ttft_p50_s": statistics.median(burst_ttft) if burst_ttft else None,
        "burst_ttft_max_s": max(burst_ttft) if burst_ttft else None,
        "burst_window_s": b1 - b0,
        "running_tokens_during_burst_min": min(during),
        "running_tokens_during_burst_median": statistics.median(during),
        "running_max_gap_during_burst_s": max((g for g in map(gaps, running) if g is not None), default=None),
        "errors": [r["error"] for r in running + burst if "error" in r],
    }
    # What the engine did while the burst was served (the running streams' steps included).
    out["engine_during_burst"] = {k.removeprefix("pgate_"): round(m1[k] - m0.get(k, 0.0), 6) for k in m1
                                  if k in ("pgate_decode_steps_total", "pgate_decode_steppers_total",
                                           "pgate_slots_reused_total", "pgate_prefill_seconds_total",
                                           "pgate_graph_record_seconds_total",
                                           "pgate_join_seconds_total")}
    if out["idle_ttft_p50_s"] and out["burst_ttft_p50_s"]:
        out["burst_over_idle"] = out["burst_ttft_p50_s"] / out["idle_ttft_p50_s"]
    print(json.dumps(out, indent=1))
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
