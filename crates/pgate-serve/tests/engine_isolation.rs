//! The serving engine under requests that go wrong (issue 17), on the real SmolLM2-135M-Instruct:
//! - one failing sequence fails only itself: a request whose steering overflows to non-finite
//!   logits gets an error, the request beside it completes;
//! - a prefill is cancelled between chunks: a long prompt whose deadline passes mid-prefill ends
//!   with a timeout before it ever starts, and the engine goes on to the next request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use persona_gate::generate::{encode_chat, ChatPrompt, Sampling};
use persona_gate::intervene::{CompiledPlan, InterventionPlan, LayerSet};
use persona_gate::model::{LoadOptions, Model};
use persona_gate_serve::engine::{self, EngineConfig, Event, FinishReason, Job};
use persona_gate_serve::metrics::Metrics;
use persona_gate_serve::GuardMode;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

fn model() -> Arc<Model> {
    model_in(LoadOptions::default())
}

/// f32 activations and weights: quantized matmuls turn NaN inputs into finite garbage, so the
/// overflow test reads the reference mode, where a non-finite residual reaches the logits.
fn model_in(opts: LoadOptions) -> Arc<Model> {
    let dir = std::env::var_os("PGATE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| persona_gate::model::source::cache_dir().join("models"));
    let p = dir.join("smollm2.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-models.sh",
        p.display()
    );
    Arc::new(Model::load(p.to_str().unwrap(), &opts).unwrap())
}

fn job(
    prompt: Vec<u32>,
    plan: Option<Arc<CompiledPlan>>,
    deadline: Duration,
) -> (Job, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    let j = Job {
        prompt,
        shadow: None,
        plan,
        max_new_tokens: 8,
        sampling: Sampling::greedy(),
        guard: GuardMode::Off,
        deadline: Instant::now() + deadline,
        events: tx,
    };
    (j, rx)
}

/// Every event of one request, up to its end.
fn drain(rx: &mut UnboundedReceiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        let end = matches!(e, Event::Done { .. } | Event::Error(_));
        out.push(e);
        if end {
            break;
        }
    }
    out
}

fn start(
    model: Arc<Model>,
    cfg: EngineConfig,
) -> (
    std::sync::mpsc::SyncSender<Job>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(16);
    let metrics = Arc::new(Metrics::default());
    let h = std::thread::spawn(move || engine::run(model, cfg, rx, metrics));
    (tx, h)
}

fn config(model: &Model) -> EngineConfig {
    EngineConfig {
        batch_size: 8,
        stop: model.tokenizer.stop_token_ids().to_vec(),
        ..EngineConfig::default()
    }
}

#[test]
fn one_failed_sequence_fails_only_itself() {
    let m = model_in(LoadOptions {
        dtype: persona_gate::model::DTypeMode::F32,
        ..LoadOptions::default()
    });
    let cfg = m.config().clone();
    let huge = InterventionPlan::new().add(
        LayerSet::parse("1-29").unwrap(),
        vec![1.0; cfg.d_model],
        f32::MAX,
    );
    let huge = Arc::new(
        huge.compile(cfg.n_layers, cfg.d_model, m.decoder.dtype(), &Device::Cpu)
            .unwrap(),
    );
    let ids = |s: &str| encode_chat(&m, &ChatPrompt::new(s)).unwrap();
    let (bad, mut bad_rx) = job(ids("Write a poem."), Some(huge), Duration::from_secs(120));
    let (good, mut good_rx) = job(
        ids("What is the capital of France?"),
        None,
        Duration::from_secs(120),
    );
    let (tx, h) = start(m.clone(), config(&m));
    tx.send(bad).unwrap();
    tx.send(good).unwrap();
    let bad_events = drain(&mut bad_rx);
    let good_events = drain(&mut good_rx);
    drop(tx);
    h.join().unwrap();
    assert!(
        matches!(bad_events.last(), Some(Event::Error(e)) if e.contains("non-finite")),
        "the overflowing request should fail alone: {bad_events:?}"
    );
    let tokens = good_events
        .iter()
        .filter(|e| matches!(e, Event::Token(_)))
        .count();
    assert!(
        tokens > 0,
        "the other request got no tokens: {good_events:?}"
    );
    assert!(
        matches!(good_events.last(), Some(Event::Done { .. })),
        "the other request did not complete: {good_events:?}"
    );
}

#[test]
fn a_prefill_is_cancelled_between_chunks() {
    let m = model();
    // ~4k tokens of prompt, prefilled 128 tokens per chunk: dozens of chunks.
    let long_text = "Tell me about the history of the sea and its ships. ".repeat(330);
    let long = encode_chat(&m, &ChatPrompt::new(long_text)).unwrap();
    assert!(long.len() > 3000, "prompt of {} tokens", long.len());
    let cfg = EngineConfig {
        prefill_chunk_tokens: 128,
        ..config(&m)
    };
    let (tx, h) = start(m.clone(), cfg);
    let (l, mut l_rx) = job(long, None, Duration::from_millis(300));
    tx.send(l).unwrap();
    let (s, mut s_rx) = job(
        encode_chat(&m, &ChatPrompt::new("hi")).unwrap(),
        None,
        Duration::from_secs(120),
    );
    tx.send(s).unwrap();
    let long_events = drain(&mut l_rx);
    let short_events = drain(&mut s_rx);
    drop(tx);
    h.join().unwrap();
    assert!(
        matches!(
            long_events.as_slice(),
            [Event::Done {
                finish: FinishReason::Timeout,
                completion_tokens: 0
            }]
        ),
        "the long prompt should end at its deadline, mid-prefill: {long_events:?}"
    );
    assert!(
        matches!(short_events.last(), Some(Event::Done { .. })),
        "{short_events:?}"
    );
}

/// Tokens of one request, to its end.
fn tokens(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token(t) => Some(*t),
            _ => None,
        })
        .collect()
}

#[test]
fn long_prompts_decode_in_their_own_lane() {
    // Batch-invariant numerics: a sequence's tokens do not depend on its batch, so the short
    // request must give the same answer beside a long one (other lane) as alone.
    let mut m = Arc::try_unwrap(model()).ok().unwrap();
    m.decoder.set_batch_invariant(true).unwrap();
    let m = Arc::new(m);
    let short = encode_chat(&m, &ChatPrompt::new("What is the capital of France?")).unwrap();
    let long_text = "Tell me about the history of the sea and its ships. ".repeat(60);
    let long = encode_chat(&m, &ChatPrompt::new(long_text)).unwrap();
    let cfg = || EngineConfig {
        long_prompt_tokens: 256,
        ..config(&m)
    };
    assert!(long.len() > 256 && short.len() < 256);

    let (tx, h) = start(m.clone(), cfg());
    let (j, mut rx) = job(short.clone(), None, Duration::from_secs(120));
    tx.send(j).unwrap();
    let alone = tokens(&drain(&mut rx));
    drop(tx);
    h.join().unwrap();

    let (tx, h) = start(m.clone(), cfg());
    let (jl, mut rl) = job(long, None, Duration::from_secs(120));
    let (js, mut rs) = job(short, None, Duration::from_secs(120));
    tx.send(jl).unwrap();
    tx.send(js).unwrap();
    let long_events = drain(&mut rl);
    let beside = tokens(&drain(&mut rs));
    drop(tx);
    h.join().unwrap();
    assert!(
        matches!(long_events.last(), Some(Event::Done { .. })),
        "{long_events:?}"
    );
    assert_eq!(alone, beside, "the short request changed beside a long one");
}
