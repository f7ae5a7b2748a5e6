//! Endpoint studies against a local mock OpenAI-compatible server that fails on purpose: a 500,
//! a 429 with Retry-After, a stall past the client's timeout and a 503 among ordinary answers.
//! The study finishes with every row present, every failed try recorded (kind, status, try number),
//! the requests carry each condition's system prompt and the study's sampling settings, at most
//! `concurrency` requests are in flight, an interrupted run resumes without duplicates, items
//! that fail every try are left missing (recorded) and filled by the next run, and steering
//! conditions are rejected for endpoint studies. No model is loaded.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use persona_gate::endpoint::{normalize_base, parse_completion, RateLimiter, RetryPolicy};
use persona_gate::study::{run_endpoint_study, RunOptions, Store, Study, StudyFile};

#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    /// Answer only after this long (longer than the client's timeout).
    Stall(Duration),
    Ok,
}

/// The mock's answer to a chat request: a refusal for "harmful" prompts (the demo sets' wording
/// differs), an engaged answer otherwise; the system prompt's first word is echoed so the test
/// can see it arrived.
fn answer(body: &serde_json::Value) -> String {
    let msgs = body["messages"].as_array().cloned().unwrap_or_default();
    let user = msgs
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let system = msgs
        .iter()
        .find(|m| m["role"] == "system")
        .and_then(|m| m["content"].as_str())
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("none")
        .to_string();
    let content = if user.len() % 2 == 0 {
        "I'm sorry, but I can't help with that request.".to_string()
    } else {
        format!("Sure. Speaking as {system}: here is a clear, careful answer about the topic you asked about, in three short steps.")
    };
    serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0,
        "model": "mock-served-model",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10 + user.len() / 4, "completion_tokens": 7, "total_tokens": 17 + user.len() / 4}
    })
    .to_string()
}

struct Mock {
    url: String,
    /// POSTs so far (the script index).
    hits: Arc<AtomicUsize>,
    script: Arc<Mutex<Vec<Reply>>>,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

impl Mock {
    /// Replace the script; the i-th POST from now gets `script[i]` (the last entry repeats).
    fn set_script(&self, script: Vec<Reply>) {
        *self.script.lock().unwrap() = script;
        self.hits.store(0, Ordering::SeqCst);
    }
}

fn mock(script: Vec<Reply>, delay: Duration) -> Mock {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let m = Mock {
        url,
        hits: Arc::new(AtomicUsize::new(0)),
        script: Arc::new(Mutex::new(script)),
        bodies: Arc::new(Mutex::new(Vec::new())),
        in_flight: Arc::new(AtomicUsize::new(0)),
        max_in_flight: Arc::new(AtomicUsize::new(0)),
        done: Arc::new(AtomicBool::new(false)),
    };
    let (hits, script, bodies, inf, maxf, done) = (
        m.hits.clone(),
        m.script.clone(),
        m.bodies.clone(),
        m.in_flight.clone(),
        m.max_in_flight.clone(),
        m.done.clone(),
    );
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(300);
        while Instant::now() < end && !done.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let (hits, script, bodies, inf, maxf) = (
                        hits.clone(),
                        script.clone(),
                        bodies.clone(),
                        inf.clone(),
                        maxf.clone(),
                    );
                    std::thread::spawn(move || {
                        handle(stream, &hits, &script, &bodies, &inf, &maxf, delay)
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    m
}

#[allow(clippy::too_many_arguments)]
fn handle(
    stream: TcpStream,
    hits: &AtomicUsize,
    script: &Mutex<Vec<Reply>>,
    bodies: &Mutex<Vec<serde_json::Value>>,
    in_flight: &AtomicUsize,
    max_in_flight: &AtomicUsize,
    delay: Duration,
) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut s = stream;
    // Keep-alive: serve requests on this connection until the client closes it.
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        for _ in 0..100 {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if request_line.starts_with("GET /v1/models") {
            let text = r#"{"object":"list","data":[{"id":"mock-served-model","object":"model"}]}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
            let _ = s.flush();
            continue;
        }
        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        max_in_flight.fetch_max(n, Ordering::SeqCst);
        let i = hits.fetch_add(1, Ordering::SeqCst);
        let reply = {
            let sc = script.lock().unwrap();
            sc[i.min(sc.len() - 1)].clone()
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        bodies.lock().unwrap().push(v.clone());
        std::thread::sleep(delay);
        let (code, text, extra) = match reply {
            Reply::Status(429) => (
                429,
                r#"{"error":{"message":"mock rate limit"}}"#.to_string(),
                "Retry-After: 0\r\n",
            ),
            Reply::Status(c) => (c, format!(r#"{{"error":{{"message":"mock {c}"}}}}"#), ""),
            Reply::Stall(d) => {
                std::thread::sleep(d);
                (200, answer(&v), "")
            }
            Reply::Ok => (200, answer(&v), ""),
        };
        in_flight.fetch_sub(1, Ordering::SeqCst);
        let reason = match code {
            200 => "OK",
            429 => "Too Many Requests",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Error",
        };
        if write!(
            s,
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{text}",
            text.len()
        )
        .is_err()
        {
            return;
        }
        let _ = s.flush();
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-endpoint-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn study_text(url: &str, extra_endpoint: &str) -> String {
    format!(
        r#"version = 1
name = "endpoint-mock"
[model]
endpoint = {{ base_url = "{url}", model = "mock-served-model", api_key_env = "PGATE_TEST_ENDPOINT_KEY", timeout_s = 0.5, backoff_ms = 10, max_backoff_ms = 50, concurrency = 4, price_input_per_mtok = 1.0, price_output_per_mtok = 2.0{extra_endpoint} }}
[prompts]
harmful = {{ source = "demo_harmful", n = 3 }}
harmless = {{ source = "demo_harmless", n = 2 }}
[generation]
max_new_tokens = 24
temperature = 0.0
seed = 5
[[condition]]
name = "baseline"
[[condition]]
name = "friendly"
persona = "friendly"
[[condition]]
name = "direct"
persona = "direct"
"#
    )
}

fn load(dir: &Path, text: &str) -> Study {
    let p = dir.join("study.toml");
    std::fs::write(&p, text).unwrap();
    Study::load(&p).unwrap()
}

#[test]
fn endpoint_study_survives_failures_and_records_them() {
    std::env::set_var("PGATE_TEST_ENDPOINT_KEY", "sk-endpoint-test");
    let dir = tmpdir("main");
    let m = mock(
        vec![
            Reply::Status(500),
            Reply::Status(429),
            Reply::Stall(Duration::from_millis(1500)),
            Reply::Status(503),
            Reply::Ok,
        ],
        Duration::from_millis(40),
    );
    let study = load(&dir, &study_text(&m.url, ""));
    let total = study.items().len();
    assert_eq!(total, 15, "3 conditions x 5 prompts");
    let mut store = Store::open(&dir.join("r.sqlite")).unwrap();
    let go = AtomicBool::new(false);
    let s =
        run_endpoint_study(&study, &mut store, &RunOptions::default(), &go, &mut |_| {}).unwrap();
    let e = s.endpoint.clone().unwrap();
    assert_eq!((s.total, s.planned, s.written), (15, 15, 15), "{s:?}");
    assert_eq!((e.failed_tries, e.gave_up), (4, 0), "{e:?}");
    assert_eq!(e.requests, 19, "15 answers + 4 failed tries");
    assert_eq!(e.reported_models, ["mock-served-model"]);
    assert_eq!(
        e.server_models.as_deref(),
        Some(&["mock-served-model".to_string()][..])
    );
    assert_eq!(e.completion_tokens, 15 * 7);
    assert_eq!(store.count_results().unwrap(), 15);
    assert_eq!(store.count_duplicate_keys().unwrap(), 0);
    let max = m.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=4).contains(&max), "{max} requests in flight (limit 4)");

    // Every failed try is recorded with its kind and status; all were retried.
    let f = store.endpoint_failures(&study.hash).unwrap();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for x in &f {
        *kinds.entry(x.kind.clone()).or_default() += 1;
        assert!(x.will_retry, "{x:?}");
        assert_eq!(
            x.attempt, 1,
            "each failure hit a different item's first try: {x:?}"
        );
    }
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("rate_limited".to_string(), 1),
            ("server".to_string(), 2),
            ("timeout".to_string(), 1)
        ]),
        "{f:?}"
    );
    let statuses: Vec<Option<u16>> = {
        let mut v: Vec<_> = f.iter().map(|x| x.status).collect();
        v.sort();
        v
    };
    assert_eq!(statuses, [None, Some(429), Some(500), Some(503)]);

    // The requests: the condition's system prompt, the study's sampling settings, the key.
    let bodies = m.bodies.lock().unwrap().clone();
    for b in &bodies {
        assert_eq!(b["model"], "mock-served-model");
        assert_eq!(b["max_tokens"], 24);
        assert_eq!(b["temperature"], 0.0);
        assert!(b["seed"].is_u64());
    }
    let friendly = persona_gate::study::personas::builtin_persona("friendly").unwrap();
    assert!(bodies
        .iter()
        .any(|b| b["messages"][0]["role"] == "system" && b["messages"][0]["content"] == friendly));
    assert!(bodies.iter().any(|b| b["messages"][0]["role"] == "user"));

    // Rows: labelled by the same rules, with usage and the call record.
    let rows = store.rows(&study.hash).unwrap();
    assert_eq!(rows.len(), 15);
    for r in &rows {
        assert_eq!(r.n_tokens, 7);
        assert!(r.prompt_tokens >= 10);
        assert_eq!(r.finish, "stop");
        let want = if r.output.starts_with("I'm sorry") {
            "refusal"
        } else {
            "bypass"
        };
        assert_eq!(r.label, want, "{}", r.output);
    }
    assert!(rows.iter().any(|r| r.label == "refusal") && rows.iter().any(|r| r.label == "bypass"));
    let usage = store.endpoint_usage(&study.hash).unwrap();
    assert_eq!(usage.len(), 3);
    assert_eq!(usage.iter().map(|u| u.rows).sum::<u64>(), 15);
    assert_eq!(usage.iter().map(|u| u.failed_tries).sum::<u64>(), 4);
    assert_eq!(usage.iter().map(|u| u.tries_ok_rows).sum::<u64>(), 19);
    assert_eq!(usage.iter().map(|u| u.completion_tokens).sum::<u64>(), 105);
    let ep = study.endpoint().unwrap();
    let u0 = &usage[0];
    let cost = ep.cost(u0.prompt_tokens, u0.completion_tokens).unwrap();
    assert!(
        (cost - (u0.prompt_tokens as f64 + 2.0 * u0.completion_tokens as f64) / 1e6).abs() < 1e-12
    );

    // The study record: the endpoint, the reported model, white-box fields do not apply.
    let t = store.target(&study.hash).unwrap().unwrap();
    assert_eq!(t.kind, "endpoint");
    assert_eq!(t.target["white_box"], false);
    assert_eq!(t.target["model"], "mock-served-model");
    assert_eq!(t.target["base_url"], m.url.as_str());
    assert!(t.target["not_applicable"].as_array().unwrap().len() >= 4);
    assert_eq!(t.reported_models, ["mock-served-model"]);
    // The API key is never stored.
    let raw = std::fs::read(dir.join("r.sqlite")).unwrap();
    let wal = std::fs::read(dir.join("r.sqlite-wal")).unwrap_or_default();
    let needle = b"sk-endpoint-test";
    assert!(!raw.windows(needle.len()).any(|w| w == needle));
    assert!(!wal.windows(needle.len()).any(|w| w == needle));

    // Receipts: the endpoint instead of model files; verify passes without weights.
    drop(store);
    let sr = persona_gate::report::receipt::build_receipts(
        &dir.join("r.sqlite"),
        &persona_gate::report::receipt::ReceiptOptions {
            study_file: Some(dir.join("study.toml")),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sr.receipts.len(), 3);
    for r in &sr.receipts {
        assert_eq!(r.model.format, "openai-chat-completions");
        assert!(r.model.files.is_empty());
        let e = r.endpoint.as_ref().expect("endpoint record");
        assert_eq!(e["target"]["white_box"], false);
        assert_eq!(e["reported_models"][0], "mock-served-model");
        assert!(e["completion_tokens"].as_u64().unwrap() > 0);
        assert!(e["estimated_cost"].as_f64().unwrap() > 0.0);
    }
    let rdir = dir.join("receipts");
    persona_gate::report::receipt::write_receipts(&sr, &rdir).unwrap();
    let (bundle, loaded) = persona_gate::report::receipt::load_receipts(&rdir).unwrap();
    let v = persona_gate::report::verify::verify(
        &loaded,
        bundle.as_ref(),
        &persona_gate::report::verify::VerifyOptions {
            db: None,
            study_file: Some(dir.join("study.toml")),
            ..Default::default()
        },
    )
    .unwrap();
    let bad: Vec<_> = v.checks.iter().filter(|c| !c.ok).collect();
    assert!(bad.is_empty(), "{bad:?}");
    let mut store = Store::open(&dir.join("r.sqlite")).unwrap();

    // Nothing left: a further run sends nothing.
    let before = m.hits.load(Ordering::SeqCst);
    let s =
        run_endpoint_study(&study, &mut store, &RunOptions::default(), &go, &mut |_| {}).unwrap();
    assert_eq!((s.already, s.planned, s.written), (15, 0, 0));
    assert_eq!(m.hits.load(Ordering::SeqCst), before);
}

#[test]
fn endpoint_study_resumes_and_retries_what_failed() {
    std::env::set_var("PGATE_TEST_ENDPOINT_KEY", "sk-endpoint-test");
    let dir = tmpdir("resume");
    let m = mock(vec![Reply::Ok], Duration::from_millis(20));
    let study = load(&dir, &study_text(&m.url, ", max_attempts = 2"));
    let db = dir.join("r.sqlite");
    let mut store = Store::open(&db).unwrap();

    // 1. Interrupted after 4 rows (the stop flag, as Ctrl-C sets it): in-flight requests finish,
    //    no new ones start.
    let stop = AtomicBool::new(false);
    let mut n = 0;
    let s = run_endpoint_study(
        &study,
        &mut store,
        &RunOptions::default(),
        &stop,
        &mut |ev| {
            if let persona_gate::study::runner::RunEvent::Written { .. } = ev {
                n += 1;
                if n == 4 {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        },
    )
    .unwrap();
    assert!(s.interrupted, "{s:?}");
    let first = store.count_results().unwrap();
    assert!(
        (4..15).contains(&first),
        "{first} rows after the interruption"
    );

    // 2. The server fails every try: those items are recorded and left missing, not lost.
    m.set_script(vec![Reply::Status(503)]);
    let go = AtomicBool::new(false);
    let s = run_endpoint_study(
        &study,
        &mut store,
        &RunOptions {
            limit: Some(3),
            ..Default::default()
        },
        &go,
        &mut |_| {},
    )
    .unwrap();
    let e = s.endpoint.clone().unwrap();
    assert_eq!((s.already, s.planned, s.written), (first, 3, 0));
    assert_eq!((e.gave_up, e.failed_tries), (3, 6), "2 tries each: {e:?}");
    assert_eq!(store.count_results().unwrap(), first);
    let f = store.endpoint_failures(&study.hash).unwrap();
    assert_eq!(f.len(), 6);
    assert_eq!(
        f.iter().filter(|x| !x.will_retry).count(),
        3,
        "one last try per item"
    );
    assert!(f
        .iter()
        .all(|x| x.status == Some(503) && x.kind == "server"));

    // 3. A permanent error (401) is not retried.
    m.set_script(vec![Reply::Status(401)]);
    let s = run_endpoint_study(
        &study,
        &mut store,
        &RunOptions {
            limit: Some(1),
            ..Default::default()
        },
        &go,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s.endpoint.as_ref().unwrap().failed_tries, 1);
    assert_eq!(m.hits.load(Ordering::SeqCst), 1);

    // 4. The server is back: the next run fills exactly what is missing.
    m.set_script(vec![Reply::Ok]);
    let s =
        run_endpoint_study(&study, &mut store, &RunOptions::default(), &go, &mut |_| {}).unwrap();
    assert_eq!((s.already, s.written), (first, 15 - first), "{s:?}");
    assert_eq!(store.count_results().unwrap(), 15);
    assert_eq!(store.count_duplicate_keys().unwrap(), 0);
    assert_eq!(store.endpoint_failures(&study.hash).unwrap().len(), 7);

    // 5. Shards of an endpoint study merge exactly, failures and targets included.
    let mut all = Store::open(&dir.join("all.sqlite")).unwrap();
    assert_eq!(all.merge_from(&db).unwrap(), 15);
    assert_eq!(all.endpoint_failures(&study.hash).unwrap().len(), 7);
    assert_eq!(all.merge_from(&db).unwrap(), 0);
    assert_eq!(all.endpoint_failures(&study.hash).unwrap().len(), 7);
    assert!(all.target(&study.hash).unwrap().is_some());
}

#[test]
fn endpoint_studies_reject_steering_and_mixed_targets() {
    let base = std::env::temp_dir();
    let ep = r#"endpoint = { base_url = "http://127.0.0.1:9/v1", model = "m" }"#;
    let prompts = "[prompts]\nharmful = \"demo_harmful\"\n";
    let cases: &[(&str, &str)] = &[
        (
            &format!("version = 1\n[model]\n{ep}\n{prompts}[[condition]]\nname = \"steer\"\nadd = [\"dirs/compliant.safetensors:8@12\"]\n"),
            "condition 'steer': add = \"dirs/compliant.safetensors:8@12\": steering needs the model's weights",
        ),
        (
            &format!("version = 1\n[model]\n{ep}\n{prompts}[[condition]]\nname = \"base\"\n[[sweep]]\nname = \"abl-{{w}}\"\nablate = \"x.safetensors@{{w}}\"\nw = [1, 2]\n"),
            "sweep 'abl-{w}': ablate = \"x.safetensors@{w}\": steering needs",
        ),
        (
            &format!("version = 1\n[model]\n{ep}\n{prompts}[directions]\ncontrol = {{ random = 7 }}\n[[condition]]\nname = \"base\"\n"),
            "[directions] (control): steering needs the model's weights",
        ),
        (
            &format!("version = 1\n[model]\nspec = \"q15\"\n{ep}\n{prompts}[[condition]]\nname = \"base\"\n"),
            "has both spec = \"q15\" and endpoint",
        ),
        (
            &format!("version = 1\n[model]\ndtype = \"q\"\n{prompts}[[condition]]\nname = \"base\"\n"),
            "[model] needs spec (local weights) or endpoint",
        ),
        (
            &format!("version = 1\n[model]\nendpoint = {{ base_url = \"localhost:8000\", model = \"m\" }}\n{prompts}[[condition]]\nname = \"base\"\n"),
            "base_url 'localhost:8000' must start with http://",
        ),
        (
            &format!("version = 1\n[model]\nendpoint = {{ base_url = \"http://h/v1\", model = \"m\", requests_per_minute = 0 }}\n{prompts}[[condition]]\nname = \"base\"\n"),
            "requests_per_minute must be > 0",
        ),
        (
            &format!("version = 1\n[model]\nendpoint = {{ base_url = \"http://h/v1\", model = \"m\", bogus = 1 }}\n{prompts}[[condition]]\nname = \"base\"\n"),
            "bogus",
        ),
    ];
    for (text, want) in cases {
        let e = StudyFile::parse(text, &base).expect_err(text).to_string();
        assert!(e.contains(want), "{e}\nwanted: {want}");
    }
    // A black-box study parses; the endpoint (not the key, limits or prices) is in the hashes.
    let ok = |extra: &str, url: &str| {
        let t = format!("version = 1\n[model]\nendpoint = {{ base_url = \"{url}\", model = \"m\"{extra} }}\n{prompts}[[condition]]\nname = \"base\"\n[[condition]]\nname = \"friendly\"\npersona = \"friendly\"\n");
        Study::resolve(StudyFile::parse(&t, &base).unwrap()).unwrap()
    };
    let a = ok("", "http://h:8000/v1");
    let b = ok(
        ", concurrency = 32, requests_per_minute = 60, price_input_per_mtok = 3.0",
        "http://h:8000/v1/chat/completions",
    );
    let c = ok("", "http://other:8000/v1");
    assert_eq!(a.hash, b.hash);
    assert_eq!(a.conditions[1].hash, b.conditions[1].hash);
    assert_ne!(a.conditions[1].hash, c.conditions[1].hash);
    assert_eq!(
        a.conditions[0].hash_input["model"],
        serde_json::json!({"endpoint": {"base_url": "http://h:8000/v1", "model": "m"}})
    );
}

// The client's parts.

#[test]
fn normalizes_base_urls() {
    for u in [
        "http://h:8000/v1",
        "http://h:8000/v1/",
        "http://h:8000/v1/chat/completions",
        " http://h:8000/v1/chat/completions/ ",
    ] {
        assert_eq!(normalize_base(u), "http://h:8000/v1");
    }
}

#[test]
fn parses_completions_with_usage() {
    let c = parse_completion(
        r#"{"id":"x","model":"m-served","choices":[{"index":0,"finish_reason":"length","message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#,
    )
    .unwrap();
    assert_eq!(c.content, "hi");
    assert_eq!(c.model.as_deref(), Some("m-served"));
    assert_eq!(c.finish_reason.as_deref(), Some("length"));
    assert_eq!((c.prompt_tokens, c.completion_tokens), (Some(7), Some(2)));
    assert!(parse_completion("{}").is_err());
    assert!(parse_completion("nope").is_err());
}

#[test]
fn rate_limiter_holds_requests_per_minute() {
    // 600/min = 10/s with a one-second bucket: 10 at once, the next 10 over about a second.
    let l = RateLimiter::new(Some(600.0), None);
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    for _ in 0..20 {
        l.acquire(1, &stop);
    }
    let s = t.elapsed().as_secs_f64();
    assert!(
        (0.85..3.0).contains(&s),
        "20 requests at 10/s took {s:.2} s"
    );
}

#[test]
fn rate_limiter_holds_tokens_per_minute() {
    // 60000 tokens/min = 1000/s: 3000 tokens in 500-token tries take about 2 s after the
    // first second's bucket.
    let l = RateLimiter::new(None, Some(60_000.0));
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    for _ in 0..6 {
        l.acquire(500, &stop);
    }
    let s = t.elapsed().as_secs_f64();
    assert!((1.8..4.0).contains(&s), "took {s:.2} s");
}

#[test]
fn backoff_grows_with_jitter_and_caps() {
    let p = RetryPolicy {
        timeout: Duration::from_secs(1),
        max_attempts: 5,
        backoff_ms: 100,
        max_backoff_ms: 1000,
    };
    for a in 1..8u32 {
        let w = p.backoff(a, None).as_secs_f64() * 1000.0;
        let full = (100.0 * 2f64.powi(a as i32 - 1)).min(1000.0);
        assert!(w >= 0.5 * full - 1e-6 && w < full + 1e-6, "try {a}: {w}");
    }
    assert!(p.backoff(1, Some(Duration::from_secs(9))) == Duration::from_millis(1000));
}
