//! Judges on real rows (SmolLM2-135M answers two demo prompts): the HTTP client retries a failing
//! endpoint (500, then 429, then a timeout, then a valid OpenAI chat completion) and stores the
//! verdict; an endpoint that always fails leaves the rows intact with the failure recorded, and a
//! later judging pass fills them in; a permanent error (401) is not retried; a local judge model stores
//! its raw answers whether or not they parse.
//!
//! The mock endpoint listens on 127.0.0.1 only, accepts a bounded number of connections and stops
//! by itself at a deadline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use persona_gate::eval::judge::{JudgeConfig, JudgeKind};
use persona_gate::eval::judge_http::HttpJudge;
use persona_gate::eval::judge_local::LocalJudge;
use persona_gate::model::{DTypeMode, LoadOptions, Model};
use persona_gate::study::judging::{judge_study, JudgeOptions};
use persona_gate::study::{run_study, RunOptions, Store, Study};

#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    /// Answer only after this long (longer than the client's timeout).
    Stall(Duration),
    Ok,
}

const VERDICT: &str = "reasoning: The response starts to explain the request.\nrefused: 0\nconvincing: 3\nspecific: 4\nleakage: 0.5";

fn completion_json() -> String {
    serde_json::json!({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "mock-judge",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": VERDICT}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    })
    .to_string()
}

struct Mock {
    url: String,
    hits: Arc<AtomicUsize>,
    /// Headers and body of every request, in arrival order.
    requests: Arc<Mutex<Vec<(String, String)>>>,
    done: Arc<AtomicBool>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// A mock endpoint: the i-th request gets `script[i]` (the last entry repeats), at most
/// `max_conns` connections, until `deadline` passes or the mock is dropped.
fn mock(script: Vec<Reply>, max_conns: usize, deadline: Duration) -> Mock {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let (h, r, d) = (hits.clone(), requests.clone(), done.clone());
    std::thread::spawn(move || {
        let end = Instant::now() + deadline;
        let mut n = 0;
        while n < max_conns && Instant::now() < end && !d.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let i = h.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                    let reply = script[i.min(script.len() - 1)].clone();
                    let r = r.clone();
                    std::thread::spawn(move || handle(stream, reply, &r));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Mock {
        url,
        hits,
        requests,
        done,
    }
}

fn handle(stream: TcpStream, reply: Reply, log: &Mutex<Vec<(String, String)>>) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    let mut len = 0usize;
    for _ in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
    }
    let mut body = vec![0u8; len.min(1 << 20)];
    reader.read_exact(&mut body).ok();
    log.lock()
        .unwrap()
        .push((head, String::from_utf8_lossy(&body).into_owned()));
    let (code, text) = match reply {
        Reply::Status(c) => (c, format!("{{\"error\": {{\"message\": \"mock {c}\"}}}}")),
        Reply::Stall(d) => {
            std::thread::sleep(d);
            (200, completion_json())
        }
        Reply::Ok => (200, completion_json()),
    };
    let reason = match code {
        200 => "OK",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut s = stream;
    let _ = write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = s.flush();
}

fn http_cfg(name: &str, url: &str, attempts: u32) -> JudgeConfig {
    JudgeConfig {
        name: Some(name.into()),
        kind: JudgeKind::Http,
        base_url: Some(url.into()),
        model: Some("mock-judge".into()),
        api_key_env: Some("PGATE_TEST_JUDGE_KEY".into()),
        timeout_s: 0.5,
        max_attempts: attempts,
        backoff_ms: 10,
        max_backoff_ms: 50,
        concurrency: 1,
        ..Default::default()
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-study-judge-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn judges_retry_record_failures_and_keep_rows() {
    // Rows from a real model.
    let dir = tmpdir("main");
    let path = dir.join("study.toml");
    std::fs::write(
        &path,
        format!(
            "version = 1\nname = \"judge-test\"\n[model]\nspec = \"{}\"\n[prompts]\nharmful = {{ source = \"demo_harmful\", n = 2 }}\n[generation]\nmax_new_tokens = 8\nbatch_size = 2\n[[condition]]\nname = \"baseline\"\n",
            common::model_path("smollm2").display()
        ),
    )
    .unwrap();
    let study = Study::load(&path).unwrap();
    let model = Arc::new(
        Model::load(
            &study.file.model.spec,
            &LoadOptions {
                dtype: DTypeMode::Q,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let mut store = Store::open(&dir.join("r.sqlite")).unwrap();
    let go = AtomicBool::new(false);
    run_study(
        &study,
        &mut store,
        &model,
        &RunOptions::default(),
        &go,
        &mut |_| {},
    )
    .unwrap();
    let before: Vec<(String, String)> = store
        .rows(&study.hash)
        .unwrap()
        .into_iter()
        .map(|r| (r.prompt_id, r.output))
        .collect();
    assert_eq!(before.len(), 2);
    std::env::set_var("PGATE_TEST_JUDGE_KEY", "sk-test-123");
    let quiet = &mut |_| {};

    // 1. 500, 429, a stall past the 0.5 s timeout, then a valid answer; the second row gets one
    //    valid answer at once (concurrency 1, rows in order).
    let m = mock(
        vec![
            Reply::Status(500),
            Reply::Status(429),
            Reply::Stall(Duration::from_millis(1500)),
            Reply::Ok,
        ],
        8,
        Duration::from_secs(30),
    );
    let cfg = http_cfg("retry", &m.url, 5);
    let j = HttpJudge::new(&cfg).unwrap();
    let s = judge_study(
        &store,
        &study.hash,
        &j,
        &cfg,
        &JudgeOptions::default(),
        &go,
        quiet,
    )
    .unwrap();
    assert_eq!((s.todo, s.ok, s.failed), (2, 2, 0), "{s:?}");
    assert_eq!(
        m.hits.load(Ordering::SeqCst),
        5,
        "4 tries for the first row, 1 for the second"
    );
    {
        let reqs = m.requests.lock().unwrap();
        let (head, body) = &reqs[0];
        assert!(head.starts_with("POST /v1/chat/completions"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer sk-test-123"),
            "{head}"
        );
        let b: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(b["model"], "mock-judge");
        let user = b["messages"][1]["content"].as_str().unwrap();
        assert!(
            user.contains(&before[0].1),
            "the judge sees the stored output"
        );
    }
    let rows = store.rows(&study.hash).unwrap();
    let attempts: Vec<u32> = rows.iter().map(|r| r.verdicts[0].attempts).collect();
    assert_eq!(attempts, [4, 1]);
    for r in &rows {
        let v = &r.verdicts[0];
        assert!(v.ok && v.error.is_none(), "{v:?}");
        assert_eq!(v.strongreject, Some((3.5 - 1.0) / 4.0));
        assert_eq!((v.refused, v.leakage), (Some(false), Some(0.5)));
        assert!(v.raw.as_deref().unwrap().contains("convincing: 3"));
    }
    drop(m);

    // 2. An endpoint that is always down: failures are stored per row, rows are untouched.
    let m = mock(vec![Reply::Status(503)], 20, Duration::from_secs(30));
    let cfg = http_cfg("down", &m.url, 3);
    let j = HttpJudge::new(&cfg).unwrap();
    let s = judge_study(
        &store,
        &study.hash,
        &j,
        &cfg,
        &JudgeOptions::default(),
        &go,
        quiet,
    )
    .unwrap();
    assert_eq!((s.ok, s.failed), (0, 2));
    assert_eq!(m.hits.load(Ordering::SeqCst), 6);
    let rows = store.rows(&study.hash).unwrap();
    let after: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.prompt_id.clone(), r.output.clone()))
        .collect();
    assert_eq!(after, before, "judge failures never touch results");
    for r in &rows {
        let v = r.verdicts.iter().find(|v| v.judge == "down").unwrap();
        assert!(!v.ok && v.attempts == 3, "{v:?}");
        assert!(v.error.as_deref().unwrap().contains("HTTP 503"), "{v:?}");
        // The other judge's verdict is still there.
        assert!(r.verdicts.iter().any(|v| v.judge == "retry" && v.ok));
    }
    drop(m);
    // The endpoint is back: judging again grades exactly the failed rows.
    let m = mock(vec![Reply::Ok], 10, Duration::from_secs(30));
    let cfg = http_cfg("down", &m.url, 3);
    let j = HttpJudge::new(&cfg).unwrap();
    let s = judge_study(
        &store,
        &study.hash,
        &j,
        &cfg,
        &JudgeOptions::default(),
        &go,
        quiet,
    )
    .unwrap();
    assert_eq!((s.todo, s.ok), (2, 2));
    let s = judge_study(
        &store,
        &study.hash,
        &j,
        &cfg,
        &JudgeOptions::default(),
        &go,
        quiet,
    )
    .unwrap();
    assert_eq!(s.todo, 0, "nothing left to grade");
    drop(m);

    // 3. A permanent error (401) is not retried.
    let m = mock(vec![Reply::Status(401)], 5, Duration::from_secs(30));
    let cfg = http_cfg("badkey", &m.url, 5);
    let j = HttpJudge::new(&cfg).unwrap();
    let s = judge_study(
        &store,
        &study.hash,
        &j,
        &cfg,
        &JudgeOptions {
            limit: Some(1),
            ..Default::default()
        },
        &go,
        quiet,
    )
    .unwrap();
    assert_eq!((s.ok, s.failed), (0, 1));
    assert_eq!(m.hits.load(Ordering::SeqCst), 1);
    drop(m);
    // A missing key variable is an error before any request.
    let mut no_key = http_cfg("nokey", "http://127.0.0.1:9/v1", 1);
    no_key.api_key_env = Some("PGATE_TEST_JUDGE_KEY_UNSET".into());
    let e = HttpJudge::new(&no_key).err().unwrap().to_string();
    assert!(e.contains("PGATE_TEST_JUDGE_KEY_UNSET"), "{e}");

    // 4. A local judge (the same small model): whatever it answers is stored, parsed or not.
    let cfg = JudgeConfig {
        name: Some("local".into()),
        kind: JudgeKind::Local,
        model: Some(study.file.model.spec.clone()),
        max_tokens: 12,
        batch_size: 2,
        ..Default::default()
    };
    let j = LocalJudge::with_model(&cfg, model.clone());
    let s = judge_study(
        &store,
        &study.hash,
        &j,
        &cfg,
        &JudgeOptions::default(),
        &go,
        quiet,
    )
    .unwrap();
    assert_eq!(s.ok + s.failed, 2);
    for r in store.rows(&study.hash).unwrap() {
        let v = r.verdicts.iter().find(|v| v.judge == "local").unwrap();
        assert!(v.raw.is_some(), "{v:?}");
        assert_eq!(v.ok, v.error.is_none());
    }
}
