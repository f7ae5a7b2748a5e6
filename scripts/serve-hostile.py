#!/usr/bin/env python3
"""Mixed hostile load against `pgate serve` beside normal clients (issue 17), Python stdlib only.

Starts `pgate serve MODEL` (or attaches to a running server with --url and --pid), then for
--duration seconds runs side by side:

  normal     N clients sending short chat requests (half streamed), one after another
  health     GET /health every 50 ms, latency measured from connect to the end of the response
  slow       S sockets that trickle a request head one byte per second (slowloris); reopened when
             the server closes them
  big        clients posting ~4 MB bodies (one huge user message)
  long       clients posting ~--long-tokens-token prompts
  cancel     clients opening a stream and hanging up after the first chunks
  stops      clients asking for non-ASCII text with non-ASCII `stop` strings (streamed and not)

Then waits --settle seconds with no load and reports: panics in the server log, lost normal requests
(no 200 after up to 3 tries on 429), /health p50/p99/max, server RSS before, peak (VmHWM) and after
the load stopped (VmRSS), and what the hostile clients saw. Exit status 1 when a panic was logged, a
normal request was lost or /health p99 exceeded --health-p99-ms.

  scripts/serve-hostile.py --model q05 --duration 120 --json /tmp/hostile.json
  scripts/serve-hostile.py --model smollm2 --duration 5 --slow 64 --long-tokens 1000   # quick check
"""

import argparse
import http.client
import json
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

KEY = "hostile-test-key"


def now():
    return time.monotonic()


class Stats:
    """Thread-safe counters and samples."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.samples = {}
        self.notes = {}

    def inc(self, key, n=1):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def add(self, key, v):
        with self.lock:
            self.samples.setdefault(key, []).append(v)

    def note(self, key, text):
        with self.lock:
            lst = self.notes.setdefault(key, [])
            if len(lst) < 5:
                lst.append(text[:300])


def request(host, port, method, path, body=None, key=None, timeout=300.0, headers=None):
    """One request on a fresh connection: (status, headers dict, body bytes)."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        h = {"Content-Type": "application/json"}
        if key:
            h["Authorization"] = f"Bearer {key}"
        if headers:
            h.update(headers)
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def chat_body(prompt, max_tokens, stream=False, stop=None, model="default"):
    b = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stop is not None:
        b["stop"] = stop
    return json.dumps(b).encode()


def check_stream(data):
    """(ok, why) for an SSE body: ends with [DONE], no error event."""
    text = data.decode("utf-8", "replace")
    events = [l[6:] for l in text.split("\n") if l.startswith("data: ")]
    if not events or events[-1].strip() != "[DONE]":
        return False, "stream did not end with [DONE]: " + text[-200:]
    for e in events[:-1]:
        if '"error"' in e:
            return False, "error event: " + e
    return True, ""


PROMPTS = [
    "What is the capital of France?",
    "Name three fruits.",
    "Write a haiku about rain.",
    "How do birds fly?",
    "Give me a tip for studying.",
    "Explain what a CPU does.",
]


def normal_client(i, a, host, port, stop_at, st):
    """Short requests one after another; a 429 is retried (as OpenAI clients do), up to 3 tries."""
    n = 0
    while now() < stop_at:
        stream = (n + i) % 2 == 1
        body = chat_body(PROMPTS[(n + i) % len(PROMPTS)], a.normal_tokens, stream=stream)
        n += 1
        t0 = now()
        ok, why = False, ""
        for attempt in range(3):
            try:
                s, h, data = request(host, port, "POST", "/v1/chat/completions", body, KEY, timeout=a.client_timeout)
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                why = f"{type(e).__name__}: {e}"
                break
            if s == 429:
                st.inc("normal_429")
                time.sleep(float(h.get("retry-after", "1")))
                why = "429 three times"
                continue
            if s != 200:
                why = f"HTTP {s}: {data[:200]!r}"
                break
            if stream:
                ok, why = check_stream(data)
            else:
                try:
                    v = json.loads(data)
                    ok = v["choices"][0]["message"]["content"] is not None
                except Exception as e:  # noqa: BLE001
                    why = f"bad JSON: {e}"
            break
        st.inc("normal_sent")
        if ok:
            st.inc("normal_ok")
            st.add("normal_latency", now() - t0)
        else:
            st.inc("normal_lost")
            st.note("normal_lost", why)


def health_poller(host, port, stop_at, st):
    while now() < stop_at:
        t0 = now()
        try:
            s, _, data = request(host, port, "GET", "/health", timeout=30)
            dt = now() - t0
            if s == 200 and b'"status"' in data:
                st.add("health_ms", dt * 1000.0)
            else:
                st.inc("health_bad")
                st.note("health_bad", f"HTTP {s}: {data[:100]!r}")
        except Exception as e:  # noqa: BLE001
            st.inc("health_bad")
            st.note("health_bad", f"{type(e).__name__}: {e}")
        time.sleep(0.05)


def slow_sockets(n, host, port, stop_at, st):
    """Keep n sockets trickling a request head, one byte per second each; count server closes."""
    if n <= 0:
        return
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nX-Slow: " + "a" * 10000).encode()
    sel = selectors.DefaultSelector()
    socks = {}  # sock -> [opened_at, bytes sent]

    def open_one():
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect_ex((host, port))
        except OSError:
            s.close()
            return
        socks[s] = [now(), 0]
        sel.register(s, selectors.EVENT_READ)
        st.inc("slow_opened")

    def close(s, by_server):
        if s not in socks:
            return
        opened, _ = socks.pop(s)
        sel.unregister(s)
        s.close()
        if by_server:
            st.inc("slow_closed_by_server")
            st.add("slow_lifetime_s", now() - opened)

    for _ in range(n):
        open_one()
    next_tick = now()
    while now() < stop_at:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                st.inc("slow_got_response")
            close(s, True)
        if now() >= next_tick:
            next_tick = now() + 1.0
            for s in list(socks):
                try:
                    i = socks[s][1]
                    s.send(head[i : i + 1])
                    socks[s][1] = i + 1
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    close(s, True)
        while len(socks) < n and now() < stop_at:
            open_one()
    for s in list(socks):
        close(s, False)


def big_bodies(host, port, stop_at, st, size):
    text = "a " * (size // 2 - 100)
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": text}], "max_tokens": 8}).encode()
    while now() < stop_at:
        try:
            s, h, data = request(host, port, "POST", "/v1/chat/completions", body, KEY, timeout=120)
            st.inc(f"big_{s}")
            if s >= 400 and not data.startswith(b'{"error"'):
                st.inc("big_not_openai_error")
                st.note("big_not_openai_error", f"HTTP {s}: {data[:100]!r}")
        except Exception as e:  # noqa: BLE001
            st.inc("big_exception")
            st.note("big_exception", f"{type(e).__name__}: {e}")


def long_prompts(host, port, stop_at, st, tokens, client_timeout):
    prompt = "Summarize this text. " + " ".join(f"word{i % 50}" for i in range(tokens // 2))
    body = chat_body(prompt, 8)
    while now() < stop_at:
        t0 = now()
        try:
            s, _, data = request(host, port, "POST", "/v1/chat/completions", body, KEY, timeout=client_timeout)
            st.inc(f"long_{s}")
            if s == 200:
                st.add("long_latency", now() - t0)
            elif s >= 500 and s != 504:
                st.note("long_5xx", f"HTTP {s}: {data[:200]!r}")
            if s == 429:
                time.sleep(1)
        except Exception as e:  # noqa: BLE001
            st.inc("long_exception")
            st.note("long_exception", f"{type(e).__name__}: {e}")


def cancelled_streams(host, port, stop_at, st):
    """Open a long stream, read a little, hang up."""
    body = chat_body("Write a very long story about a dragon and a knight.", 256, stream=True)
    while now() < stop_at:
        try:
            s = socket.create_connection((host, port), timeout=60)
            s.sendall(
                (
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            got = b""
            while got.count(b"data: ") < 3:
                d = s.recv(4096)
                if not d:
                    break
                got += d
            s.close()
            st.inc("cancelled")
        except Exception as e:  # noqa: BLE001
            st.inc("cancel_exception")
            st.note("cancel_exception", f"{type(e).__name__}: {e}")
        time.sleep(0.2)


STOP_PROMPTS = [
    "Écris une phrase en français sur l'été.",
    "Schreibe einen Satz über Grüße und Bäume.",
    "日本語で自己紹介してください。",
    "Напиши одно предложение о зиме.",
]


def stop_clients(i, host, port, stop_at, st):
    n = 0
    while now() < stop_at:
        stream = n % 2 == 0
        body = chat_body(STOP_PROMPTS[(n + i) % len(STOP_PROMPTS)], 24, stream=stream, stop=["é", "ü", "日本", "зи"])
        n += 1
        try:
            s, _, data = request(host, port, "POST", "/v1/chat/completions", body, KEY, timeout=300)
            if s == 429:
                time.sleep(1)
                continue
            ok = s == 200 and (check_stream(data)[0] if stream else b'"choices"' in data)
            st.inc("stops_ok" if ok else "stops_bad")
            if not ok:
                st.note("stops_bad", f"HTTP {s}: {data[-200:]!r}")
        except Exception as e:  # noqa: BLE001
            st.inc("stops_bad")
            st.note("stops_bad", f"{type(e).__name__}: {e}")


def rss(pid):
    """(VmRSS, VmHWM) in bytes from /proc/PID/status."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out.get("VmRSS"), out.get("VmHWM")


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def start_server(a, log):
    args = [a.bin, "serve", a.model, "--port", "0", "--api-key", KEY, "--max-connections", str(a.max_connections),
            "--header-timeout", str(a.header_timeout)] + a.serve_args.split()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    line = p.stdout.readline()
    m = re.match(r"listening on http://([^:]+):(\d+)", line)
    if not m:
        p.kill()
        sys.exit(f"server did not start: {line!r} (log: {log.name})")
    threading.Thread(target=p.stdout.read, daemon=True).start()
    return p, m.group(1), int(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/pgate")
    ap.add_argument("--model", default="q05")
    ap.add_argument("--serve-args", default="", help="extra `pgate serve` flags")
    ap.add_argument("--url", help="attach to a running server (started with --api-key %s)" % KEY)
    ap.add_argument("--pid", type=int, help="its process id (for RSS)")
    ap.add_argument("--log", help="its log file (for panics)")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--settle", type=float, default=10, help="idle seconds before the after-load RSS")
    ap.add_argument("--normal", type=int, default=16)
    ap.add_argument("--normal-tokens", type=int, default=16)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--big", type=int, default=2, help="clients posting --big-bytes bodies")
    ap.add_argument("--big-bytes", type=int, default=4_000_000)
    ap.add_argument("--long", type=int, default=2, help="clients posting long prompts")
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--cancel", type=int, default=4)
    ap.add_argument("--stops", type=int, default=2)
    ap.add_argument("--max-connections", type=int, default=256)
    ap.add_argument("--header-timeout", type=float, default=10)
    ap.add_argument("--client-timeout", type=float, default=600)
    ap.add_argument("--health-p99-ms", type=float, default=50)
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args()

    proc = None
    if a.url:
        m = re.match(r"http://([^:/]+):(\d+)", a.url)
        host, port, pid, log_path = m.group(1), int(m.group(2)), a.pid, a.log
    else:
        log = tempfile.NamedTemporaryFile("w", prefix="pgate-hostile-", suffix=".log", delete=False)
        proc, host, port = start_server(a, log)
        pid, log_path = proc.pid, log.name
    st = Stats()
    rss_start = rss(pid)[0] if pid else None
    peak = [rss_start or 0]
    stop_at = now() + a.duration
    sampling = [True]

    def sampler():
        while sampling[0]:
            r = rss(pid)[0] if pid else None
            if r:
                peak[0] = max(peak[0], r)
            time.sleep(0.25)

    threads = [threading.Thread(target=sampler, daemon=True)]
    threads[0].start()
    load = []
    load += [threading.Thread(target=normal_client, args=(i, a, host, port, stop_at, st)) for i in range(a.normal)]
    load += [threading.Thread(target=health_poller, args=(host, port, stop_at, st))]
    load += [threading.Thread(target=slow_sockets, args=(a.slow, host, port, stop_at, st))]
    load += [threading.Thread(target=big_bodies, args=(host, port, stop_at, st, a.big_bytes)) for _ in range(a.big)]
    load += [threading.Thread(target=long_prompts, args=(host, port, stop_at, st, a.long_tokens, a.client_timeout)) for _ in range(a.long)]
    load += [threading.Thread(target=cancelled_streams, args=(host, port, stop_at, st)) for _ in range(a.cancel)]
    load += [threading.Thread(target=stop_clients, args=(i, host, port, stop_at, st)) for i in range(a.stops)]
    t0 = now()
    for t in load:
        t.daemon = True
        t.start()
    for t in load:
        t.join()
    load_s = now() - t0
    time.sleep(a.settle)
    sampling[0] = False
    rss_after, hwm = rss(pid) if pid else (None, None)
    peak_rss = max(peak[0], hwm or 0) or None
    # The server must still answer normally after all that.
    try:
        s, _, _ = request(host, port, "POST", "/v1/chat/completions", chat_body("Say hi.", 4), KEY, timeout=300)
        after_ok = s == 200
    except Exception:  # noqa: BLE001
        after_ok = False
    metrics = ""
    try:
        _, _, m = request(host, port, "GET", "/metrics", key=KEY, timeout=30)
        metrics = m.decode()
    except Exception:  # noqa: BLE001
        pass
    panics = 0
    if proc:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            panics = sum(1 for l in f if "panicked" in l or "handler panic" in l)
    h = st.samples.get("health_ms", [])

    def metric(name):
        for line in metrics.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    report = {
        "model": a.model,
        "duration_s": round(load_s, 1),
        "normal_clients": a.normal,
        "normal_sent": st.counts.get("normal_sent", 0),
        "normal_ok": st.counts.get("normal_ok", 0),
        "normal_lost": st.counts.get("normal_lost", 0),
        "normal_429_retried": st.counts.get("normal_429", 0),
        "normal_latency_p50_s": pct(st.samples.get("normal_latency"), 50),
        "normal_latency_p99_s": pct(st.samples.get("normal_latency"), 99),
        "health_n": len(h),
        "health_bad": st.counts.get("health_bad", 0),
        "health_p50_ms": pct(h, 50),
        "health_p99_ms": pct(h, 99),
        "health_max_ms": max(h) if h else None,
        "panics": panics,
        "after_load_request_ok": after_ok,
        "rss_start_mb": rss_start and round(rss_start / 2**20, 1),
        "rss_peak_mb": peak_rss and round(peak_rss / 2**20, 1),
        "rss_after_mb": rss_after and round(rss_after / 2**20, 1),
        "settle_s": a.settle,
        "slow_sockets": a.slow,
        "slow_opened": st.counts.get("slow_opened", 0),
        "slow_closed_by_server": st.counts.get("slow_closed_by_server", 0),
        "slow_lifetime_max_s": max(st.samples.get("slow_lifetime_s", [0]) or [0]),
        "connections_evicted": metric("pgate_connections_evicted_total"),
        "connection_header_timeouts": metric("pgate_connection_header_timeouts_total"),
        "hostile": {k: v for k, v in sorted(st.counts.items()) if not k.startswith(("normal", "slow", "health"))},
        "notes": st.notes,
        "server_log": log_path,
    }
    failures = []
    if panics:
        failures.append(f"{panics} panic lines in the server log")
    if report["normal_lost"]:
        failures.append(f"{report['normal_lost']} normal requests lost")
    if not report["normal_ok"]:
        failures.append("no normal request succeeded")
    if report["health_p99_ms"] is None or report["health_p99_ms"] > a.health_p99_ms:
        failures.append(f"/health p99 {report['health_p99_ms']} ms over {a.health_p99_ms} ms")
    if report["health_bad"]:
        failures.append(f"{report['health_bad']} /health requests failed")
    if not after_ok:
        failures.append("a request after the load failed")
    report["failures"] = failures
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    print(
        f"\n{a.model}: {report['normal_ok']}/{report['normal_sent']} normal requests ok ({report['normal_lost']} lost), "
        f"/health p50 {report['health_p50_ms'] and round(report['health_p50_ms'], 1)} ms p99 "
        f"{report['health_p99_ms'] and round(report['health_p99_ms'], 1)} ms, panics {panics}, "
        f"RSS start {report['rss_start_mb']} MiB peak {report['rss_peak_mb']} MiB after {report['rss_after_mb']} MiB "
        f"({a.settle:.0f} s after the load)"
    )
    if failures:
        print("FAIL: " + "; ".join(failures))
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
