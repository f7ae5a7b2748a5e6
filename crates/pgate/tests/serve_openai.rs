//! `pgate serve` end to end on SmolLM2-135M: the real `openai` Python client (from a venv this test
//! creates), malformed requests, continuous batching against one-at-a-time, back-pressure (429),
//! timeouts, and graceful shutdown on SIGTERM.
//!
//! The guard here is calibrated on random directions (the protocol is under test, not the
//! science), then its thresholds are set so that every request "would be refused" and only a
//! strongly steered preset counts as shifted: the `blocker` preset is always blocked, `default`
//! never flagged. The real guard numbers (Qwen2.5-1.5B, StrongREJECT) are in the README.

mod raw_http;

use raw_http::http;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const KEY: &str = "test-key-123";

fn pgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgate")
}

fn models_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_MODELS_DIR") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    std::env::var_os("PGATE_CACHE")
        .map(PathBuf::from)
        .unwrap_or(home.join(".cache/persona-gate"))
        .join("models")
}

fn smollm2() -> String {
    let p = models_dir().join("smollm2.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-models.sh",
        p.display()
    );
    p.display().to_string()
}

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(pgate_bin())
        .args(args)
        .output()
        .expect("run pgate");
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "pgate {args:?} failed:\n{so}\n{se}");
    so
}

/// Directions, guard files and presets, made once per test binary.
struct Fixture {
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("serve-fixture-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("dirs")).unwrap();
        let m = smollm2();
        let p = |f: &str| dir.join(f).display().to_string();
        run_ok(&[
            "extract",
            "random",
            &m,
            "--seed",
            "1",
            "-o",
            &p("dirs/compliant.safetensors"),
        ]);
        run_ok(&[
            "extract",
            "random",
            &m,
            "--seed",
            "2",
            "-o",
            &p("dirs/refusal.safetensors"),
        ]);
        let out = run_ok(&[
            "guard",
            "calibrate",
            &m,
            "--refusal",
            &p("dirs/refusal.safetensors"),
            "--refusal-layer",
            "20",
            "--persona",
            &p("dirs/compliant.safetensors"),
            "--harmful",
            "demo_harmful",
            "--harmless",
            "demo_harmless",
            "--skip",
            "0",
            "-n",
            "16",
            "--test-harmful",
            "demo_harmful",
            "--test-harmless",
            "demo_harmless",
            "--test-n",
            "8",
            "-o",
            &p("guard.json"),
        ]);
        assert!(out.contains("TPR") && out.contains("held out"), "{out}");
        let mut g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("guard.json")).unwrap())
                .unwrap();
        assert_eq!(g["format"], "pgate-guard/1");
        assert_eq!(g["refusal_layer"], 20);
        // Protocol fixture: everything "would be refused"; only heavy steering counts as shifted.
        g["threshold"] = 0.0.into();
        g["shift_threshold"] = 50.0.into();
        std::fs::write(dir.join("guard-test.json"), g.to_string()).unwrap();
        std::fs::write(
            dir.join("presets.toml"),
            r#"
[presets.default]
description = "default persona"
[presets.friendly]
system = "You are a friendly assistant."
[presets.steer]
add = ["compliant:8@10-14"]
guard = "monitor"
[presets.blocker]
add = ["compliant:400@4-24"]
guard = "block"
"#,
        )
        .unwrap();
        Fixture { dir }
    })
}

struct Server {
    child: Child,
    url: String,
    addr: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let f = fixture();
        let p = |x: &str| f.dir.join(x).display().to_string();
        let mut args: Vec<String> = vec![
            "serve".into(),
            smollm2(),
            "--port".into(),
            "0".into(),
            "--presets".into(),
            p("presets.toml"),
            "--directions".into(),
            p("dirs"),
            "--guard-file".into(),
            p("guard-test.json"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(pgate_bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pgate serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining.
            let mut sink = String::new();
            let _ = r.read_to_string(&mut sink);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("server did not start");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        let addr = url.trim_start_matches("http://").to_string();
        Server { child, url, addr }
    }

    /// One HTTP/1.1 request (connection closed after); returns (status, headers, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: bool,
    ) -> (u16, String, String) {
        http(&self.addr, method, path, body, auth.then_some(KEY))
    }

    fn chat(&self, body: &str) -> (u16, String, serde_json::Value) {
        let (s, h, b) = self.request("POST", "/v1/chat/completions", Some(body), true);
        let v = serde_json::from_str(&b).unwrap_or_else(|_| serde_json::Value::String(b.clone()));
        (s, h, v)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chat_body(model: &str, prompt: &str, max_tokens: usize) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
    .to_string()
}

/// A venv with the real openai client, made once (kept in the target folder between runs).
fn openai_venv() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = venv.join("bin/python");
    let has = |py: &Path| {
        py.exists()
            && Command::new(py)
                .args(["-c", "import openai"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
    };
    if has(&py) {
        return py;
    }
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    let st = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()
        .expect("python3 is needed for the openai client test");
    assert!(
        st.success(),
        "python3 -m venv failed (CI={ci}): install python3-venv"
    );
    let st = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai==3.54.0",
        ])
        .status()
        .expect("pip");
    assert!(
        st.success(),
        "pip install openai failed (CI={ci}): PyPI must be reachable"
    );
    assert!(has(&py), "openai not importable after install");
    py
}

#[test]
fn openai_python_client() {
    let py = openai_venv();
    let srv = Server::start(&["--api-key", KEY, "--max-batch", "8"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&srv.url)
        .arg(KEY)
        .output()
        .expect("run python");
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    println!("{so}\n{se}");
    assert!(
        out.status.success(),
        "openai client checks failed:\n{so}\n{se}"
    );
    assert!(so.contains("9 passed, 0 failed"), "{so}");
    // Metrics saw it: requests by preset, guard flags by preset, histograms.
    let (s, _, m) = srv.request("GET", "/metrics", None, true);
    assert_eq!(s, 200);
    assert!(
        m.contains("pgate_requests_total{preset=\"default\",status=\"200\"}"),
        "{m}"
    );
    assert!(
        m.contains("pgate_guard_flags_total{preset=\"blocker\",mode=\"block\"}"),
        "{m}"
    );
    assert!(
        m.contains("pgate_request_duration_seconds_bucket{preset=\"steer\",le=\"+Inf\"}"),
        "{m}"
    );
    assert!(m.contains("process_resident_memory_bytes"), "{m}");
}

#[test]
fn malformed_requests_get_clear_4xx() {
    let srv = Server::start(&[
        "--api-key",
        KEY,
        "--max-tokens",
        "64",
        "--max-prompt-tokens",
        "200",
    ]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("bad json", "{\"model\": \"default\", \"messages\": [".into(), 400, "not valid JSON"),
        ("not an object", "[1, 2]".into(), 400, "JSON object"),
        ("missing messages", r#"{"model":"default"}"#.into(), 400, "missing required field 'messages'"),
        ("messages of the wrong type", r#"{"model":"default","messages":"hi"}"#.into(), 400, "invalid field 'messages'"),
        ("max_tokens of the wrong type", r#"{"model":"default","messages":[{"role":"user","content":"hi"}],"max_tokens":"lots"}"#.into(), 400, "invalid field 'max_tokens'"),
        ("temperature of the wrong type", r#"{"model":"default","messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#.into(), 400, "invalid field 'temperature'"),
        ("stream of the wrong type", r#"{"model":"default","messages":[{"role":"user","content":"hi"}],"stream":"yes"}"#.into(), 400, "invalid field 'stream'"),
        ("role of the wrong type", r#"{"model":"default","messages":[{"role":5,"content":"hi"}]}"#.into(), 400, "invalid field 'messages[0].role'"),
        ("unknown role", r#"{"model":"default","messages":[{"role":"wizard","content":"hi"}]}"#.into(), 400, "role 'wizard'"),
        ("empty messages", r#"{"model":"default","messages":[]}"#.into(), 400, "must not be empty"),
        ("last message not from the user", r#"{"model":"default","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#.into(), 400, "last message"),
        ("unknown preset", chat_body("nope", "hi", 8), 404, "unknown preset 'nope'"),
        ("too many tokens", chat_body("default", "hi", 65), 400, "max_tokens 65 is more than this server allows (64)"),
        ("zero tokens", chat_body("default", "hi", 0), 400, "max_tokens must be at least 1"),
        ("prompt too long", chat_body("default", &"word ".repeat(400), 8), 400, "more than this server allows (200)"),
        ("temperature out of range", r#"{"model":"default","messages":[{"role":"user","content":"hi"}],"temperature":7}"#.into(), 400, "temperature 7 must be between 0 and 2"),
        ("n > 1", r#"{"model":"default","messages":[{"role":"user","content":"hi"}],"n":3}"#.into(), 400, "n = 3 is not supported"),
        ("image part", r#"{"model":"default","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#.into(), 400, "only text parts"),
    ];
    for (what, body, status, needle) in &cases {
        let (s, h, v) = srv.chat(body);
        assert_eq!(s, *status, "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
        assert!(h.contains("content-type: application/json"), "{what}: {h}");
    }
    // Auth.
    let (s, _, b) = srv.request(
        "POST",
        "/v1/chat/completions",
        Some(&chat_body("default", "hi", 4)),
        false,
    );
    assert_eq!(s, 401, "{b}");
    assert!(b.contains("missing API key"), "{b}");
    let (s, _, b) = http(&srv.addr, "GET", "/v1/models", None, Some("wrong"));
    assert_eq!(s, 401, "{b}");
    // Unknown route; health needs no key (and then says only its status).
    let (s, _, b) = srv.request("GET", "/v2/nothing", None, true);
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("no such route"), "{b}");
    let (s, _, b) = srv.request("GET", "/health", None, false);
    assert_eq!(s, 200);
    assert!(b.contains("\"status\":\"ok\""), "{b}");
    // The server is still fine after all that.
    let (s, _, v) = srv.chat(&chat_body("default", "Say hi.", 4));
    assert_eq!(s, 200, "{v}");
    let (_, _, m) = srv.request("GET", "/metrics", None, true);
    assert!(m.contains("status=\"400\""), "{m}");
}

#[test]
fn continuous_batching_matches_one_at_a_time() {
    let prompts = [
        "What is the capital of France?",
        "Write a haiku about rain.",
        "Explain what a CPU does.",
        "Name three fruits.",
        "How do birds fly?",
        "Give me a tip for studying.",
    ];
    // f32: batch composition must not change a single bit. (In `q` mode the quantized kernels
    // differ between one row and many, so a near-tie can flip a greedy token.)
    let srv = Server::start(&["--api-key", KEY, "--max-batch", "8", "--dtype", "f32"]);
    // A steered preset in the mix: each sequence keeps its own plan.
    let model_of = |i: usize| {
        if i.is_multiple_of(2) {
            "default"
        } else {
            "steer"
        }
    };
    let mut sequential = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (s, _, v) = srv.chat(&chat_body(model_of(i), p, 24));
        assert_eq!(s, 200, "{v}");
        sequential.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (_, _, m0) = srv.request("GET", "/metrics", None, true);
    let addr = srv.addr.clone();
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let addr = addr.clone();
            let body = chat_body(model_of(i), p, 24);
            std::thread::spawn(move || {
                let (s, _, b) = http(
                    &addr,
                    "POST",
                    "/v1/chat/completions",
                    Some(&body),
                    Some(KEY),
                );
                assert_eq!(s, 200, "{b}");
                let v: serde_json::Value = serde_json::from_str(&b).unwrap();
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    let concurrent: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        sequential, concurrent,
        "batched answers differ from one-at-a-time answers"
    );
    // The concurrent round shared decode steps: more tokens than steps.
    let (_, _, m1) = srv.request("GET", "/metrics", None, true);
    let val = |m: &str, k: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let steps = val(&m1, "pgate_decode_steps_total") - val(&m0, "pgate_decode_steps_total");
    let toks = val(&m1, "pgate_decode_tokens_total") - val(&m0, "pgate_decode_tokens_total");
    assert!(
        toks > 1.5 * steps,
        "no batching: {toks} tokens in {steps} steps"
    );
    // Slot reuse is counted (on the CPU no fixed-slot steppers run, so both stay 0 here).
    for k in ["pgate_decode_steppers_total", "pgate_slots_reused_total"] {
        assert_eq!(val(&m1, k), 0.0, "{k}");
    }
    // Where time to first token goes: prefill time is counted; no graphs are recorded on the CPU.
    for k in ["pgate_prefill_seconds_total", "pgate_join_seconds_total"] {
        assert!(val(&m1, k) > 0.0, "{k}");
    }
    assert_eq!(val(&m1, "pgate_graph_record_seconds_total"), 0.0);
}

#[test]
fn full_queue_gets_429_and_timeouts_504() {
    let srv = Server::start(&["--max-batch", "1", "--queue", "1", "--timeout", "60"]);
    let addr = srv.addr.clone();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let addr = addr.clone();
            let body = chat_body("default", &format!("Count from {i} to {}.", i + 20), 24);
            std::thread::spawn(move || {
                http(&addr, "POST", "/v1/chat/completions", Some(&body), None)
            })
        })
        .collect();
    let res: Vec<(u16, String, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = res.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<_> = res.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1 && !busy.is_empty(), "{res:?}");
    assert_eq!(
        ok + busy.len(),
        res.len(),
        "only 200 and 429 expected: {res:?}"
    );
    for (_, h, b) in &busy {
        assert!(h.contains("retry-after: 1"), "{h}");
        assert!(b.contains("queue_full") && b.contains("retry later"), "{b}");
    }
    drop(srv);
    // A 1 s budget cannot fit 400 tokens: 504 with a message.
    let srv = Server::start(&["--timeout", "1", "--max-tokens", "400"]);
    let (s, _, v) = srv.chat(&chat_body(
        "default",
        "Write a very long story about a dragon.",
        400,
    ));
    assert_eq!(s, 504, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{v}"
    );
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    let mut srv = Server::start(&[]);
    let addr = srv.addr.clone();
    let h = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/v1/chat/completions",
            Some(&chat_body("default", "Write a poem about the moon.", 48)),
            None,
        )
    });
    // Wait until it is being generated.
    let t = Instant::now();
    loop {
        let (_, _, b) = srv.request("GET", "/health", None, false);
        if b.contains("\"running\":1") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "request never started: {b}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.signal("-TERM");
    let (s, _, b) = h.join().unwrap();
    assert_eq!(s, 200, "in-flight request was cut: {b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let t = Instant::now();
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(
        TcpStream::connect(&srv.addr).is_err(),
        "still accepting after shutdown"
    );
}
