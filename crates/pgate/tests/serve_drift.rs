//! Runtime persona drift on a live `pgate serve` (SmolLM2-135M): a steered preset is flagged by
//! its **8th request**, the `default` preset is not, and `/v1/drift`, `/metrics` and the log line
//! agree. Also: `/v1/drift` needs the API key like the rest of `/v1`, and with
//! `PGATE_SERVE_DRIFT=0` it answers 200 saying the monitor is off.
//!
//! Prompts are real: harmful and harmless instructions (`../shared/data/refusal_splits`,
//! validation splits), alternating. The calibration window is the first 32 `default` requests
//! (16 + 16 prompts); then 16 other prompts go to both `steer` and `default` (the same prompts,
//! so the presets differ only by the steering), one pair at a time, and `/v1/drift` is read after
//! each pair.
//!
//! Directions are seeded random unit vectors, as in `serve_openai` (the monitor is under test,
//! not the science): `compliant` is both what `steer` adds (coefficient 8 at layers 10-14) and
//! what the projections report as `persona`. Each layer's direction is drawn on its own, so the
//! steering moves the persona projection of layers 10-14 by 8 each: +4 on the window 8-11
//! (measured +4.0, about 18 calibration standard deviations) and +6 on 12-15 (measured +5.7,
//! about 6 sd). Every steered projection then lies beyond the calibration's range, and the rank
//! test's score is 3.59 at 8 requests (the threshold is 3; before 8 a preset is not scored), so
//! 8 is both the stated bound and the earliest possible. Measured on the same prompts, the
//! default preset's score stayed under 0.9 over 64 requests.

mod raw_http;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

const KEY: &str = "drift-key-20";
/// Requests of a steered preset by which it must be flagged (the monitor's `min_requests`).
const FLAGGED_BY: usize = 8;
/// Requests sent to each of `steer` and `default` after the calibration.
const AFTER: usize = 16;
/// The monitor's calibration window (requests of `default`).
const CALIBRATION: usize = 32;
/// The monitor's threshold on the score (-log10 of the corrected p).
const THRESHOLD: f64 = 3.0;

fn pgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgate")
}

fn smollm2() -> String {
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    let dir = std::env::var_os("PGATE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("PGATE_CACHE")
                .map(PathBuf::from)
                .unwrap_or(home.join(".cache/persona-gate"))
                .join("models")
        });
    let p = dir.join("smollm2.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-models.sh",
        p.display()
    );
    p.display().to_string()
}

fn shared_dir() -> PathBuf {
    std::env::var_os("PGATE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

/// `n` instructions of a refusal split (`harmful_val`, `harmless_val`), from `skip` on.
fn instructions(split: &str, skip: usize, n: usize) -> Vec<String> {
    let p = shared_dir().join(format!("data/refusal_splits/{split}.json"));
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (set PGATE_SHARED)", p.display()));
    let rows: Vec<Value> = serde_json::from_str(&text).expect("refusal split JSON");
    let out: Vec<String> = rows
        .iter()
        .skip(skip)
        .take(n)
        .map(|r| r["instruction"].as_str().expect("instruction").to_string())
        .collect();
    assert_eq!(out.len(), n, "{} has too few rows", p.display());
    out
}

/// Harmful and harmless instructions alternating, `n` of each from `skip` on.
fn prompts(skip: usize, n: usize) -> Vec<String> {
    let (h, s) = (
        instructions("harmful_val", skip, n),
        instructions("harmless_val", skip, n),
    );
    h.into_iter().zip(s).flat_map(|(a, b)| [a, b]).collect()
}

/// Random directions and the presets file, made once per test binary.
fn fixture() -> &'static PathBuf {
    static F: OnceLock<PathBuf> = OnceLock::new();
    F.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("serve-drift-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("dirs")).unwrap();
        for (name, seed) in [("compliant", "1"), ("refusal", "2")] {
            let out = dir.join(format!("dirs/{name}.safetensors"));
            let st = Command::new(pgate_bin())
                .args(["extract", "random", &smollm2(), "--seed", seed, "-o"])
                .arg(&out)
                .output()
                .expect("run pgate extract random");
            assert!(st.status.success(), "{st:?}");
        }
        std::fs::write(
            dir.join("presets.toml"),
            r#"
[presets.default]
description = "default persona"
[presets.steer]
description = "compliant (random unit direction) x 8 at layers 10-14"
add = ["compliant:8@10-14"]
"#,
        )
        .unwrap();
        dir
    })
}

struct Server {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Server {
    fn start(name: &str, env: &[(&str, &str)]) -> Server {
        let dir = fixture();
        let log = dir.join(format!("{name}.stderr"));
        let mut cmd = Command::new(pgate_bin());
        cmd.arg("serve")
            .arg(smollm2())
            .args(["--port", "0", "--api-key", KEY, "--presets"])
            .arg(dir.join("presets.toml"))
            .arg("--directions")
            .arg(dir.join("dirs"))
            .env_remove("PGATE_SERVE_DRIFT")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn pgate serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let _ = r.read_to_string(&mut String::new());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("server did not start");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        let addr = url.trim_start_matches("http://").to_string();
        Server { child, addr, log }
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        http(&self.addr, "GET", path, None, key)
    }

    fn drift(&self) -> Value {
        let (s, b) = self.get("/v1/drift", Some(KEY));
        assert_eq!(s, 200, "{b}");
        serde_json::from_str(&b).unwrap_or_else(|e| panic!("/v1/drift: {e}: {b}"))
    }

    /// One greedy chat request of one token; panics unless it is answered.
    fn chat(&self, preset: &str, prompt: &str) {
        let body = serde_json::json!({
            "model": preset,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
        })
        .to_string();
        let (s, b) = http(
            &self.addr,
            "POST",
            "/v1/chat/completions",
            Some(&body),
            Some(KEY),
        );
        assert_eq!(s, 200, "{preset}: {b}");
    }

    /// The requests at once (so the engine batches them), each answered before this returns.
    fn chat_all(&self, reqs: &[(&str, &str)]) {
        std::thread::scope(|sc| {
            for &(preset, prompt) in reqs {
                sc.spawn(move || self.chat(preset, prompt));
            }
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (status, body) of one request ([`raw_http::http`]).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = raw_http::http(addr, method, path, body, key);
    (status, body)
}

/// A preset's entry in `/v1/drift`.
fn preset<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["presets"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["preset"] == name))
        .unwrap_or_else(|| panic!("no preset {name} in {d}"))
}

/// The value of one Prometheus sample line `NAME{LABELS} VALUE`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn steered_preset_is_flagged_by_its_8th_request_default_is_not() {
    let srv = Server::start("monitor", &[]);
    let d = srv.drift();
    assert_eq!(d["enabled"], true, "{d}");
    assert_eq!(d["calibrated"], false, "{d}");
    assert!(
        d["status"]
            .as_str()
            .unwrap()
            .starts_with("calibrating (0 of 32"),
        "{d}"
    );
    assert_eq!(d["config"]["calibration"], CALIBRATION, "{d}");
    assert_eq!(d["config"]["min_requests"], FLAGGED_BY, "{d}");
    assert_eq!(d["config"]["threshold"], THRESHOLD, "{d}");

    // Calibration: 32 default requests, 8 at a time.
    let calib = prompts(0, CALIBRATION / 2);
    for chunk in calib.chunks(8) {
        let reqs: Vec<(&str, &str)> = chunk.iter().map(|p| ("default", p.as_str())).collect();
        srv.chat_all(&reqs);
    }
    let d = srv.drift();
    assert_eq!(d["calibrated"], true, "{d}");
    assert_eq!(d["status"], "monitoring", "{d}");
    assert_eq!(d["calibration_requests"], CALIBRATION, "{d}");
    assert_eq!(preset(&d, "default")["requests"], CALIBRATION, "{d}");
    assert!(preset(&d, "default")["score"].is_null(), "{d}");

    // Then the same other prompts to both presets, one pair at a time.
    let after = prompts(CALIBRATION / 2, AFTER / 2);
    let mut flagged_at = None;
    let mut default_max = 0f64;
    println!("n  steer(score, p, at, shift_sd, drifted)  default(score, drifted)");
    for (i, p) in after.iter().enumerate() {
        let n = i + 1;
        srv.chat_all(&[("steer", p), ("default", p)]);
        let d = srv.drift();
        let (s, df) = (preset(&d, "steer"), preset(&d, "default"));
        println!(
            "{n:2} {} {} {} {} {}  {} {}",
            s["score"], s["p"], s["at"], s["shift_sd"], s["drifted"], df["score"], df["drifted"]
        );
        assert_eq!(s["requests"], n, "{d}");
        assert_eq!(df["requests"], CALIBRATION + n, "{d}");
        // Neither is scored before 8 requests.
        assert_eq!(s["score"].is_null(), n < FLAGGED_BY, "{d}");
        assert_eq!(df["score"].is_null(), n < FLAGGED_BY, "{d}");
        if s["drifted"] == true && flagged_at.is_none() {
            flagged_at = Some(n);
        }
        if let Some(k) = flagged_at {
            assert_eq!(
                s["drifted"], true,
                "steer cleared after being flagged at {k}: {d}"
            );
        }
        assert_eq!(
            df["drifted"], false,
            "default flagged after {n} requests: {d}"
        );
        default_max = default_max.max(df["score"].as_f64().unwrap_or(0.0));
    }
    let n = flagged_at.unwrap_or(usize::MAX);
    assert!(
        n <= FLAGGED_BY,
        "the steered preset was to be flagged within {FLAGGED_BY} requests; flagged at {n}"
    );
    assert!(default_max <= THRESHOLD, "{default_max}");
    println!("steer flagged at request {n}; default's largest score {default_max:.2}");

    // Where and how much: the persona projection at the steered layers (10-14), shifted up.
    let d = srv.drift();
    let (s, df) = (preset(&d, "steer"), preset(&d, "default"));
    let at = s["at"].as_str().unwrap();
    assert!(at == "persona@8-11" || at == "persona@12-15", "{d}");
    assert!(s["shift_sd"].as_f64().unwrap() > 3.0, "{d}");
    assert_eq!(s["alerts"], 1, "{d}");
    assert_eq!(df["alerts"], 0, "{d}");

    // /metrics says the same as /v1/drift.
    let (st, m) = srv.get("/metrics", Some(KEY));
    assert_eq!(st, 200, "{m}");
    for (name, p) in [("steer", s), ("default", df)] {
        let alert = sample(&m, &format!("pgate_drift_alert{{preset=\"{name}\"}}"));
        assert_eq!(
            alert,
            Some(if p["drifted"] == true { 1.0 } else { 0.0 }),
            "{name}: {m}"
        );
        let score = sample(&m, &format!("pgate_drift_score{{preset=\"{name}\"}}")).unwrap();
        assert!(
            (score - p["score"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: {score} vs {p}"
        );
        let alerts = sample(
            &m,
            &format!("pgate_drift_alerts_total{{preset=\"{name}\"}}"),
        );
        assert_eq!(alerts, p["alerts"].as_f64(), "{name}: {m}");
    }
    assert!(
        m.contains(
            "pgate_projection_count{preset=\"steer\",layers=\"8-11\",direction=\"persona\"} 16"
        ),
        "{m}"
    );

    // One log line, for the steered preset only.
    let log = std::fs::read_to_string(&srv.log).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("drift: preset"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("preset steer score"), "{log}");

    // Same auth as the rest of /v1.
    let (st, b) = srv.get("/v1/drift", None);
    assert_eq!(st, 401, "{b}");
    assert!(b.contains("missing API key"), "{b}");
    let (st, b) = srv.get("/v1/drift", Some("wrong"));
    assert_eq!(st, 401, "{b}");
}

#[test]
fn drift_off_says_so() {
    let srv = Server::start("off", &[("PGATE_SERVE_DRIFT", "0")]);
    srv.chat("default", "Name three fruits.");
    let d = srv.drift();
    assert_eq!(d["enabled"], false, "{d}");
    assert!(
        d["status"]
            .as_str()
            .unwrap()
            .starts_with("off (PGATE_SERVE_DRIFT=0)"),
        "{d}"
    );
    assert_eq!(d["presets"].as_array().map(Vec::len), Some(0), "{d}");
    let (st, m) = srv.get("/metrics", Some(KEY));
    assert_eq!(st, 200, "{m}");
    assert!(!m.contains("pgate_drift_alert{"), "{m}");
    assert!(!m.contains("pgate_projection_count{"), "{m}");
    let (st, b) = srv.get("/v1/drift", None);
    assert_eq!(st, 401, "{b}");
}
