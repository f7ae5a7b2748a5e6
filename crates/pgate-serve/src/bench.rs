//! `pgate serve-bench`: a closed-loop load client for a running `pgate serve`.
//!
//! `clients` threads each send one chat completion at a time (non-streaming, greedy, a rotating set
//! of ordinary prompts) until `duration` has passed, then finish the request they have in flight.
//! A 429 (queue full, the documented back-pressure) is counted and retried after its `Retry-After`
//! (capped at 1 s); any other failure is an error. A sampler reads the server's
//! `process_resident_memory_bytes` from `/metrics` every second. Throughput is completion tokens of
//! finished requests over the wall time until the last request returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

pub const BENCH_PROMPTS: &[&str] = &[
    "Explain photosynthesis in two sentences.",
    "Write a haiku about autumn leaves.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give three tips for writing clean Python code.",
    "Describe how a bicycle gear system works.",
    "Summarize the plot of Romeo and Juliet briefly.",
    "What are the health benefits of regular walking?",
    "Explain what a hash map is to a beginner.",
    "Suggest a name for a friendly robot and explain it.",
    "How do I make a simple tomato sauce?",
    "Why is the sky blue?",
    "List four planets and one fact about each.",
    "What does a compiler do?",
    "Give me a short motivational message for a Monday.",
    "How do vaccines train the immune system?",
    "Write a two-line poem about the sea.",
];

/// The flags of `pgate serve-bench`: a [`BenchConfig`] in whole seconds, plus where the report goes.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct BenchFlags {
    #[cfg_attr(feature = "cli", arg(long, default_value = "http://127.0.0.1:8080"))]
    pub url: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub clients: usize,
    /// Seconds of load (requests in flight then finish).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 60))]
    pub duration: u64,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub max_tokens: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value = "default"))]
    pub preset: String,
    #[cfg_attr(feature = "cli", arg(long))]
    pub api_key: Option<String>,
    /// Per-request client timeout, seconds.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 600))]
    pub timeout: u64,
    /// Write the report as JSON here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<std::path::PathBuf>,
}

impl BenchFlags {
    /// The load client's configuration: at least one client, `--api-key` else `$PGATE_API_KEY`.
    pub fn config(&self) -> BenchConfig {
        BenchConfig {
            url: self.url.clone(),
            clients: self.clients.max(1),
            duration: Duration::from_secs(self.duration),
            max_tokens: self.max_tokens,
            preset: self.preset.clone(),
            api_key: self
                .api_key
                .clone()
                .or_else(|| std::env::var("PGATE_API_KEY").ok()),
            timeout: Duration::from_secs(self.timeout),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub clients: usize,
    pub duration: Duration,
    pub max_tokens: usize,
    pub preset: String,
    pub api_key: Option<String>,
    /// Per-request client timeout.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub url: String,
    pub preset: String,
    pub clients: usize,
    pub duration_s: f64,
    pub wall_s: f64,
    pub requests_ok: usize,
    pub rejected_429: usize,
    pub errors: usize,
    pub error_samples: Vec<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub completion_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub latency_p50_s: f64,
    pub latency_p95_s: f64,
    pub latency_max_s: f64,
    pub rss_start_bytes: Option<u64>,
    pub rss_max_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// (seconds since start, bytes), one per sample.
    pub rss_samples: Vec<(f64, u64)>,
}

impl BenchReport {
    /// One line of results, then one line per sampled error (what `pgate serve-bench` prints).
    pub fn summary(&self) -> String {
        let mb = |b: Option<u64>| {
            b.map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
                .unwrap_or_else(|| "?".into())
        };
        let mut o = format!(
            "{} clients x {:.0} s on {} (preset {}): {} ok, {} x 429, {} errors; {} completion tokens in {:.1} s = {:.1} tok/s, {:.2} req/s; latency p50 {:.2} s, p95 {:.2} s, max {:.2} s; server RSS start {}, max {}, end {}\n",
            self.clients,
            self.duration_s,
            self.url,
            self.preset,
            self.requests_ok,
            self.rejected_429,
            self.errors,
            self.completion_tokens,
            self.wall_s,
            self.completion_tokens_per_s,
            self.requests_per_s,
            self.latency_p50_s,
            self.latency_p95_s,
            self.latency_max_s,
            mb(self.rss_start_bytes),
            mb(self.rss_max_bytes),
            mb(self.rss_end_bytes)
        );
        for s in &self.error_samples {
            o += &format!("error: {s}\n");
        }
        o
    }
}

#[derive(Default)]
struct Tally {
    ok: usize,
    r429: usize,
    errors: usize,
    samples: Vec<String>,
    prompt: usize,
    completion: usize,
    latencies: Vec<f64>,
}

/// `/metrics` needs the API key when the server has one (unless it runs with --public-metrics).
fn read_rss(agent: &ureq::Agent, url: &str, key: Option<&str>) -> Option<u64> {
    let mut req = agent.get(&format!("{url}/metrics"));
    if let Some(k) = key {
        req = req.set("authorization", &format!("Bearer {k}"));
    }
    let text = req.call().ok()?.into_string().ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Load the server at `cfg.url` with `cfg.clients` closed-loop clients for `cfg.duration`, then
/// report throughput, latency, 429s, errors and the server's memory.
pub fn run(cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> persona_gate::Result<BenchReport> {
    let url = cfg.url.trim_end_matches('/').to_string();
    let agent = ureq::AgentBuilder::new()
        .timeout(cfg.timeout)
        .max_idle_connections(cfg.clients + 4)
        .max_idle_connections_per_host(cfg.clients + 4)
        .build();
    // The server must be up.
    agent
        .get(&format!("{url}/health"))
        .call()
        .map_err(|e| persona_gate::Error::InvalidValue(format!("{url}/health: {e}")))?;
    let start = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicBool::new(false));
    let rss: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let sampler = spawn_rss_sampler(&agent, &url, cfg.api_key.clone(), start, &done, &rss);
    let handles: Vec<_> = (0..cfg.clients)
        .map(|c| {
            let (agent, url, tally, cfg) = (agent.clone(), url.clone(), tally.clone(), cfg.clone());
            std::thread::spawn(move || client_loop(c, &agent, &url, &tally, &cfg, start))
        })
        .collect();
    wait_with_progress(&handles, &tally, start, &mut progress);
    for h in handles {
        let _ = h.join();
    }
    let wall = start.elapsed().as_secs_f64();
    if let Some(b) = read_rss(&agent, &url, cfg.api_key.as_deref()) {
        lock(&rss).push((wall, b));
    }
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let rss = lock(&rss).clone();
    let g = lock(&tally);
    Ok(g.report(url, cfg, wall, rss))
}

/// A lock that a panicked client thread did not poison for the others.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read the server's resident memory once a second until `done`.
fn spawn_rss_sampler(
    agent: &ureq::Agent,
    url: &str,
    key: Option<String>,
    start: Instant,
    done: &Arc<AtomicBool>,
    rss: &Arc<Mutex<Vec<(f64, u64)>>>,
) -> std::thread::JoinHandle<()> {
    let (agent, url, done, rss) = (agent.clone(), url.to_string(), done.clone(), rss.clone());
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            if let Some(b) = read_rss(&agent, &url, key.as_deref()) {
                lock(&rss).push((start.elapsed().as_secs_f64(), b));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    })
}

/// One client: a request at a time, rotating through the prompts from its own offset, until the
/// duration has passed.
fn client_loop(
    c: usize,
    agent: &ureq::Agent,
    url: &str,
    tally: &Mutex<Tally>,
    cfg: &BenchConfig,
    start: Instant,
) {
    let mut i = c;
    while start.elapsed() < cfg.duration {
        let prompt = BENCH_PROMPTS[i % BENCH_PROMPTS.len()];
        i += cfg.clients;
        let body = json!({
            "model": cfg.preset,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": cfg.max_tokens,
            "temperature": 0,
        });
        let mut req = agent.post(&format!("{url}/v1/chat/completions"));
        if let Some(k) = &cfg.api_key {
            req = req.set("authorization", &format!("Bearer {k}"));
        }
        let t = Instant::now();
        let res = req.send_json(body);
        let lat = t.elapsed().as_secs_f64();
        if let Some(wait) = lock(tally).record(res, lat) {
            std::thread::sleep(wait);
        }
    }
}

/// A progress line every 10 s while any client runs.
fn wait_with_progress(
    handles: &[std::thread::JoinHandle<()>],
    tally: &Mutex<Tally>,
    start: Instant,
    progress: &mut impl FnMut(&str),
) {
    let mut last = Instant::now();
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if last.elapsed() >= Duration::from_secs(10) {
            last = Instant::now();
            let g = lock(tally);
            progress(&format!(
                "{:>5.0} s: {} ok, {} x 429, {} errors, {} completion tokens",
                start.elapsed().as_secs_f64(),
                g.ok,
                g.r429,
                g.errors,
                g.completion
            ));
        }
    }
}

impl Tally {
    /// Count one response; a 429 returns how long to back off (a quarter of its `Retry-After`,
    /// capped at 1 s), which the client sleeps without holding the lock.
    fn record(&mut self, res: Result<ureq::Response, ureq::Error>, lat: f64) -> Option<Duration> {
        match res {
            Ok(r) => match r.into_json::<serde_json::Value>() {
                Ok(v) => {
                    self.ok += 1;
                    self.latencies.push(lat);
                    self.prompt += v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                    self.completion +=
                        v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                }
                Err(e) => self.error(|| format!("bad response body: {e}")),
            },
            Err(ureq::Error::Status(429, r)) => {
                self.r429 += 1;
                let wait = r
                    .header("retry-after")
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(1.0)
                    .min(1.0);
                return Some(Duration::from_secs_f64(wait * 0.25));
            }
            Err(ureq::Error::Status(code, r)) => self.error(|| {
                let body = r.into_string().unwrap_or_default();
                format!("HTTP {code}: {body}")
            }),
            Err(e) => self.error(|| e.to_string()),
        }
        None
    }

    /// An error, with the first five kept as samples.
    fn error(&mut self, sample: impl FnOnce() -> String) {
        self.errors += 1;
        if self.samples.len() < 5 {
            self.samples.push(sample());
        }
    }

    /// The report over everything counted, `wall` seconds after the start.
    fn report(
        &self,
        url: String,
        cfg: &BenchConfig,
        wall: f64,
        rss: Vec<(f64, u64)>,
    ) -> BenchReport {
        let mut lat = self.latencies.clone();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let q = |p: f64| -> f64 {
            if lat.is_empty() {
                0.0
            } else {
                lat[((lat.len() - 1) as f64 * p).round() as usize]
            }
        };
        BenchReport {
            url,
            preset: cfg.preset.clone(),
            clients: cfg.clients,
            duration_s: cfg.duration.as_secs_f64(),
            wall_s: wall,
            requests_ok: self.ok,
            rejected_429: self.r429,
            errors: self.errors,
            error_samples: self.samples.clone(),
            prompt_tokens: self.prompt,
            completion_tokens: self.completion,
            completion_tokens_per_s: self.completion as f64 / wall.max(1e-9),
            requests_per_s: self.ok as f64 / wall.max(1e-9),
            latency_p50_s: q(0.5),
            latency_p95_s: q(0.95),
            latency_max_s: lat.last().copied().unwrap_or(0.0),
            rss_start_bytes: rss.first().map(|x| x.1),
            rss_max_bytes: rss.iter().map(|x| x.1).max(),
            rss_end_bytes: rss.last().map(|x| x.1),
            rss_samples: rss,
        }
    }
}
