//! `pgate bench`: prefill and decode throughput of the engine at several batch sizes.
//!
//! Decode is timed over `new_tokens` steps with end-of-sequence ignored, so every batch row runs the
//! same number of steps; aggregate decode tok/s = batch * steps / decode time. End-to-end tok/s
//! (prefill included, as `model.generate` is timed in `../shared/bench/hf_gpu_baseline.py`) =
//! batch * new tokens / wall time of the whole run.
//!
//! On a GPU each decode step is also compared with its memory floor: the time to read the weights
//! once and the KV cache at its mean length once, at the copy bandwidth measured on the device
//! ([`copy_bandwidth`]), the same floor the HF baseline reports.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use crate::intervene::{CompiledPlan, InterventionPlan, LayerSet, PlanHook, ResidualHook};
use crate::model::{KvCache, LogitsAt, Model};
use crate::{Error, Result};

/// The prompt the CPU anchor (`llama_cpp_bench.py`) uses, so both engines see the same tokens.
pub const DEFAULT_PROMPT: &str = "Write a detailed explanation of how a compiler turns source code into machine code, covering lexing, parsing, and code generation.";

/// Names of the built-in steering plans ([`steer_preset`]).
pub const STEER_PRESETS: &[&str] = &["none", "add", "add+ablate"];

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub batches: Vec<usize>,
    pub new_tokens: usize,
    /// Prompt length in tokens; `None` uses the chat-rendered default prompt as is.
    pub prompt_tokens: Option<usize>,
    pub reps: usize,
    pub plan: Option<Arc<CompiledPlan>>,
    /// Name of the plan in the rows (`none`, `add`, a file name...).
    pub plan_name: String,
    /// Full-length warm-up runs before the timed ones (allocator growth, module loads).
    pub warmup: usize,
    /// Device copy bandwidth in GB/s (bytes read + written) for the per-step memory floor.
    pub copy_gbs: Option<f64>,
    /// Decode through recorded CUDA graphs where possible (CUDA only; see `generate::FixedSlot`).
    pub cuda_graphs: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            batches: vec![1, 16],
            new_tokens: 128,
            prompt_tokens: None,
            reps: 1,
            plan: None,
            plan_name: "none".into(),
            warmup: 1,
            copy_gbs: None,
            cuda_graphs: true,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub plan: String,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// batch * new tokens / wall time of the whole run (prefill included).
    pub tok_s: f64,
    /// Wall time of the whole run / new tokens.
    pub step_ms: f64,
    pub prefill_tok_s: f64,
    pub prefill_ms: f64,
    pub decode_tok_s: f64,
    pub decode_ms_per_step: f64,
    /// Host time per decode step spent issuing the forward (GPU: kernel launches); see
    /// [`crate::generate::GenStats::decode_issue_secs`].
    pub issue_ms_per_step: f64,
    /// Memory floor of one decode step: weights + KV cache at its mean length, read once.
    pub floor_ms: Option<f64>,
    /// floor_ms / decode_ms_per_step.
    pub floor_frac: Option<f64>,
    /// Decode steps replayed from recorded CUDA graphs in the timed run (0: every step launched
    /// its kernels one by one).
    pub graph_steps: usize,
}

/// Bytes of the model's parameters as loaded (every parameter at the activation dtype's width in
/// dense modes; the HF baseline counts the same way).
pub fn weight_bytes(model: &Model) -> u64 {
    model.info.n_params * model.decoder.dtype().size_in_bytes() as u64
}

/// KV-cache bytes per token (all layers, K and V).
pub fn kv_bytes_per_token(model: &Model) -> u64 {
    let c = model.config();
    (2 * c.n_layers * c.n_kv_heads * c.head_dim * model.decoder.dtype().size_in_bytes()) as u64
}

/// Device-to-device copy bandwidth in GB/s, counting bytes read and written (2 GiB of bf16 copied
/// 20 times after 3 warm-ups), as `hf_gpu_baseline.py` measures it. `None` on the CPU.
pub fn copy_bandwidth(device: &Device) -> Result<Option<f64>> {
    if device.is_cpu() {
        return Ok(None);
    }
    let n = 1usize << 30;
    let x = Tensor::ones(n, DType::BF16, device)?;
    // `Tensor::copy` is a device-to-device memcpy into a fresh buffer from the memory pool. (Copying
    // into a preallocated tensor with `slice_set` goes through candle's strided copy kernel instead
    // and measured 1.06 TB/s on an H100 where memcpy gives ~3.0.) On an H100 this read 2.4-2.5 TB/s
    // against PyTorch's 3.0 (`y.copy_(x)`, no allocation), so it can overstate the floor fraction:
    // `scripts/gpu/table.py` recomputes the floor with the larger of the two.
    for _ in 0..3 {
        drop(x.copy()?);
    }
    device.synchronize()?;
    let t = std::time::Instant::now();
    let reps = 20;
    for _ in 0..reps {
        drop(x.copy()?);
    }
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Some((reps * 2 * n * 2) as f64 / secs / 1e9))
}

fn unit(rng: &mut rand::rngs::StdRng, d: usize) -> Vec<f32> {
    // Box-Muller normals: a uniformly random direction.
    let mut v: Vec<f32> = (0..d)
        .map(|_| {
            let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random::<f64>());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        })
        .collect();
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// A built-in steering plan of the GPU benchmark, with seeded random unit directions:
/// `none`; `add` (coefficient 4 at layer n/2, layer 16 of 32); `add+ablate` (that, and a second
/// direction ablated at layers 5n/8 .. 5n/8+2: 20, 21, 22 of 32), as in `hf_gpu_baseline.py`.
pub fn steer_preset(name: &str, model: &Model, seed: u64) -> Result<Option<InterventionPlan>> {
    let c = model.config();
    let (n, d) = (c.n_layers, c.d_model);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let u = unit(&mut rng, d);
    let v = unit(&mut rng, d);
    let add_layer = n / 2;
    let ab0 = (5 * n / 8).min(n.saturating_sub(3));
    match name {
        "none" => Ok(None),
        "add" => Ok(Some(InterventionPlan::new().add(
            LayerSet::single(add_layer),
            u,
            4.0,
        ))),
        "add+ablate" => Ok(Some(
            InterventionPlan::new()
                .add(LayerSet::single(add_layer), u, 4.0)
                .ablate(LayerSet((ab0..(ab0 + 3).min(n)).collect()), v),
        )),
        other => Err(Error::InvalidValue(format!(
            "unknown steering preset '{other}' (known: {})",
            STEER_PRESETS.join(", ")
        ))),
    }
}

/// Last-token logits (f32, `[prompts][vocab]`) of `prompts` run as one left-padded batch under
/// `plan`: what `pgate logits` prints and `scripts/gpu/compare_hf.py` checks against transformers.
pub fn last_token_logits(
    model: &Model,
    prompts: &[Vec<u32>],
    plan: Option<Arc<CompiledPlan>>,
) -> Result<Vec<Vec<f32>>> {
    let dev = model.decoder.device();
    let (tokens, rows) = crate::generate::left_padded(prompts, dev)?;
    let mut cache = KvCache::new(model.decoder.n_layers());
    let plans = vec![plan; prompts.len()];
    let mut hook = PlanHook::new(&plans, model.decoder.n_layers());
    let active = hook.is_active();
    let hook: Option<&mut dyn ResidualHook> = if active { Some(&mut hook) } else { None };
    let logits = model
        .decoder
        .forward(&tokens, &rows, &mut cache, hook, LogitsAt::Last)?
        .ok_or_else(|| Error::InvalidValue("model returned no logits".into()))?;
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// [`last_token_logits`] with the last position run as a one-token decode step over the cache the
/// other positions filled (prompts of at least two tokens).
pub fn last_token_logits_by_decode(
    model: &Model,
    prompts: &[Vec<u32>],
    plan: Option<Arc<CompiledPlan>>,
) -> Result<Vec<Vec<f32>>> {
    if prompts.iter().any(|p| p.len() < 2) {
        return Err(Error::InvalidValue(
            "decode-step logits need prompts of at least 2 tokens".into(),
        ));
    }
    let dev = model.decoder.device();
    let (tokens, rows) = crate::generate::left_padded(prompts, dev)?;
    let l = tokens.dim(1)?;
    let mut cache = KvCache::new(model.decoder.n_layers());
    let plans = vec![plan; prompts.len()];
    let mut hook = PlanHook::new(&plans, model.decoder.n_layers());
    let active = hook.is_active();
    let head = tokens.narrow(1, 0, l - 1)?;
    let hk: Option<&mut dyn ResidualHook> = if active { Some(&mut hook) } else { None };
    model
        .decoder
        .forward(&head, &rows, &mut cache, hk, LogitsAt::None)?;
    // The last slot is a real token of every row (prompts are left-padded).
    let last_rows: Vec<crate::intervene::RowCtx> = rows
        .iter()
        .map(|r| crate::intervene::RowCtx {
            chunk_pad: 0,
            start_pos: l - 1 - r.chunk_pad,
            ..*r
        })
        .collect();
    let hk: Option<&mut dyn ResidualHook> = if active { Some(&mut hook) } else { None };
    let logits = model
        .decoder
        .forward(
            &tokens.narrow(1, l - 1, 1)?,
            &last_rows,
            &mut cache,
            hk,
            LogitsAt::Last,
        )?
        .ok_or_else(|| Error::InvalidValue("model returned no logits".into()))?;
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// The benchmark prompt: the chat-rendered default prompt, repeated or cut to `prompt_tokens`.
pub fn bench_prompt(model: &Model, prompt_tokens: Option<usize>) -> Result<Vec<u32>> {
    let mut prompt = encode_chat(model, &ChatPrompt::new(DEFAULT_PROMPT))?;
    if let Some(n) = prompt_tokens {
        if n == 0 {
            return Err(Error::InvalidValue("prompt tokens must be >= 1".into()));
        }
        let base = prompt.clone();
        while prompt.len() < n {
            prompt.extend_from_slice(&base);
        }
        prompt.truncate(n);
    }
    Ok(prompt)
}

pub fn run(model: &Model, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    if cfg.batches.is_empty() || cfg.batches.contains(&0) {
        return Err(Error::InvalidValue("batch sizes must be >= 1".into()));
    }
    let prompt = bench_prompt(model, cfg.prompt_tokens)?;
    let dev = model.decoder.device().clone();
    let mut rows = Vec::new();
    for &b in &cfg.batches {
        let reqs: Vec<GenRequest> = (0..b)
            .map(|_| GenRequest {
                prompt: prompt.clone(),
                max_new_tokens: cfg.new_tokens,
                sampling: Sampling::greedy(),
                stop: Vec::new(),
                plan: cfg.plan.clone(),
            })
            .collect();
        // Warm-ups (allocations, page faults on mmapped weights, kernel loads), then the best of
        // `reps`.
        let mut best: Option<BenchRow> = None;
        for rep in 0..cfg.reps.max(1) + cfg.warmup {
            let mut gen = Generator::new(&model.decoder, b);
            if !cfg.cuda_graphs {
                gen.fixed_slot = crate::generate::FixedSlot::Never;
            }
            dev.synchronize()?;
            let t = std::time::Instant::now();
            gen.run(&reqs, None, |_, _| Ok(()))?;
            dev.synchronize()?;
            let wall = t.elapsed().as_secs_f64();
            if rep < cfg.warmup {
                continue;
            }
            let s = &gen.stats;
            let decode_ms = 1e3 * s.decode_secs / s.decode_steps.max(1) as f64;
            let floor_ms = cfg.copy_gbs.map(|bw| {
                let kv = kv_bytes_per_token(model) as f64
                    * (prompt.len() as f64 + cfg.new_tokens as f64 / 2.0)
                    * b as f64;
                (weight_bytes(model) as f64 + kv) / (bw * 1e9) * 1e3
            });
            let row = BenchRow {
                plan: cfg.plan_name.clone(),
                batch: b,
                prompt_tokens: prompt.len(),
                new_tokens: cfg.new_tokens,
                tok_s: (b * cfg.new_tokens) as f64 / wall.max(1e-9),
                step_ms: 1e3 * wall / cfg.new_tokens.max(1) as f64,
                prefill_tok_s: s.prefill_tokens as f64 / s.prefill_secs.max(1e-9),
                prefill_ms: 1e3 * s.prefill_secs,
                decode_tok_s: s.decode_tokens as f64 / s.decode_secs.max(1e-9),
                decode_ms_per_step: decode_ms,
                issue_ms_per_step: 1e3 * s.decode_issue_secs / s.decode_steps.max(1) as f64,
                floor_ms,
                floor_frac: floor_ms.map(|f| f / decode_ms.max(1e-9)),
                graph_steps: s.graph_replays,
            };
            if best.as_ref().is_none_or(|x| row.tok_s > x.tok_s) {
                best = Some(row);
            }
        }
        rows.extend(best);
    }
    Ok(rows)
}

/// What `pgate bench` measures: every plan (a plan file, then built-in steering presets) at every
/// batch size, with CUDA graphs on, off or both.
///
/// Why a whole operation: the CLI, the GPU scripts and the Python package all want the same table
/// (and the same header with the device's copy bandwidth), not a loop of their own over [`run`].
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct BenchSuite {
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value = "1,16", value_delimiter = ',')
    )]
    pub batches: Vec<usize>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub new_tokens: usize,
    /// Prompt length in tokens (default: the chat-rendered benchmark prompt).
    #[cfg_attr(feature = "cli", arg(long))]
    pub prompt_tokens: Option<usize>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub reps: usize,
    /// Intervention plan (JSON or TOML, directions inline or by file) applied during the
    /// benchmark.
    #[cfg_attr(feature = "cli", arg(long))]
    pub plan: Option<std::path::PathBuf>,
    /// Built-in steering plans to run in turn (seeded random directions): none, add
    /// (coefficient 4 at layer n/2), add+ablate (and an ablation at layers 5n/8..5n/8+2).
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    pub steer: Vec<String>,
    /// Seed of the built-in steering directions.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// CUDA graphs for decode steps: on, off, or both (each row twice, to compare in one run).
    #[cfg_attr(feature = "cli", arg(long, default_value = "on", value_parser = ["on", "off", "both"]))]
    pub cuda_graphs: String,
    /// Full-length warm-up runs before the timed ones.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub warmup: usize,
    /// The numeric mode as named by the caller (reported, not applied: the model is loaded).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub dtype: String,
    /// CPU threads (reported in the header on CPU).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub threads: usize,
}

/// What [`run_suite`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    /// One line: model, size, dtype, device, copy bandwidth or threads.
    pub header: String,
    /// The run's settings and rows as `pgate bench --out` writes them.
    pub json: serde_json::Value,
    pub rows: Vec<BenchRow>,
}

/// Run a [`BenchSuite`]; the header and each row (as JSON) go to `sink` as notes when measured.
pub fn run_suite(
    model: &Model,
    suite: &BenchSuite,
    sink: &mut dyn crate::events::EventSink,
) -> Result<SuiteReport> {
    use crate::events::Event;
    let dev = model.decoder.device().clone();
    let copy_gbs = copy_bandwidth(&dev)?;
    let mut plans = Vec::new();
    if let Some(p) = &suite.plan {
        let name = p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let source = crate::directions::PlanSource::file(p);
        plans.push((name, crate::directions::load_compiled_plan(&source, model)?));
    }
    let steer: Vec<String> = if suite.steer.is_empty() && suite.plan.is_none() {
        vec!["none".into()]
    } else {
        suite.steer.clone()
    };
    for s in &steer {
        let plan = steer_preset(s, model, suite.seed)?
            .map(|p| crate::directions::compile_for(&p, model))
            .transpose()?;
        plans.push((s.clone(), plan));
    }
    let header = format!(
        "model {} ({}, {:.2} B params, dtype {}, device {}{})",
        model.info.name,
        model.info.architecture,
        model.info.n_params as f64 / 1e9,
        suite.dtype,
        if dev.is_cpu() { "cpu" } else { "cuda" },
        match copy_gbs {
            Some(bw) => format!(", copy bandwidth {bw:.0} GB/s"),
            None => format!(", {} threads", suite.threads),
        }
    );
    sink.event(Event::Note(header.clone()));
    let graph_modes: &[bool] = match suite.cuda_graphs.as_str() {
        "off" => &[false],
        "both" => &[true, false],
        _ => &[true],
    };
    let mut rows: Vec<BenchRow> = Vec::new();
    for (name, plan) in plans {
        for &b in &suite.batches {
            for &cuda_graphs in graph_modes {
                let cfg = BenchConfig {
                    batches: vec![b],
                    new_tokens: suite.new_tokens,
                    prompt_tokens: suite.prompt_tokens,
                    reps: suite.reps,
                    plan: plan.clone(),
                    plan_name: name.clone(),
                    warmup: suite.warmup,
                    copy_gbs,
                    cuda_graphs,
                };
                for row in run(model, &cfg)? {
                    sink.event(Event::Note(serde_json::to_string(&row)?));
                    rows.push(row);
                }
            }
        }
    }
    let json = serde_json::json!({
        "model": model.info.name, "n_params": model.info.n_params, "dtype": suite.dtype,
        "device": format!("{dev:?}"), "copy_GBs": copy_gbs,
        "weight_bytes": weight_bytes(model), "kv_bytes_per_token": kv_bytes_per_token(model),
        "rows": rows,
    });
    Ok(SuiteReport { header, json, rows })
}

impl SuiteReport {
    /// The header, then one aligned row per measurement (what `pgate bench` prints).
    pub fn table(&self) -> String {
        let mut o = format!("{}\n", self.header);
        o += &format!(
            "{:>11} {:>6} {:>7} {:>5} {:>10} {:>9} {:>13} {:>12} {:>9} {:>9} {:>9} {:>7} {:>7}\n",
            "plan",
            "batch",
            "prompt",
            "new",
            "tok/s",
            "step ms",
            "prefill tok/s",
            "decode tok/s",
            "dec ms",
            "issue ms",
            "floor ms",
            "floor%",
            "graphs"
        );
        for r in &self.rows {
            o += &format!(
                "{:>11} {:>6} {:>7} {:>5} {:>10.1} {:>9.2} {:>13.1} {:>12.1} {:>9.2} {:>9.2} {:>9} {:>7} {:>7}\n",
                r.plan,
                r.batch,
                r.prompt_tokens,
                r.new_tokens,
                r.tok_s,
                r.step_ms,
                r.prefill_tok_s,
                r.decode_tok_s,
                r.decode_ms_per_step,
                r.issue_ms_per_step,
                r.floor_ms.map_or("-".into(), |f| format!("{f:.2}")),
                r.floor_frac
                    .map_or("-".into(), |f| format!("{:.0}%", 100.0 * f)),
                r.graph_steps,
            );
        }
        o
    }
}

/// What `pgate logits` prints: last-token logits and greedy tokens of token-id prompts.
#[derive(Debug, Clone, Serialize)]
pub struct LogitsReport {
    /// The device, as `Debug` prints it.
    pub device: String,
    /// The numeric mode as named by the caller.
    pub dtype: String,
    /// `[prompts][new tokens]`; empty when none were asked for.
    pub greedy: Vec<Vec<u32>>,
    /// `[prompts][vocab]`, f32.
    pub logits: Vec<Vec<f32>>,
}

/// Parse prompts given as comma-separated token ids (`"1,2,3"`), none empty.
pub fn parse_token_prompts(specs: &[String]) -> Result<Vec<Vec<u32>>> {
    let prompts: Vec<Vec<u32>> = specs
        .iter()
        .map(|s| {
            s.split(',')
                .map(|t| {
                    t.trim().parse::<u32>().map_err(|_| {
                        Error::InvalidValue(format!("token ids are integers, not '{}'", t.trim()))
                    })
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::InvalidValue("empty --tokens".into()));
    }
    Ok(prompts)
}

/// The flags of `pgate logits` besides the model: the prompts as token ids, a plan file, the
/// greedy tokens to add, where the JSON goes.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct LogitsFlags {
    /// Token ids of one prompt, comma-separated (repeatable: prompts run as one left-padded batch).
    #[cfg_attr(feature = "cli", arg(long, required = true))]
    pub tokens: Vec<String>,
    /// Intervention plan (JSON or TOML) applied to every prompt.
    #[cfg_attr(feature = "cli", arg(long))]
    pub plan: Option<std::path::PathBuf>,
    /// Also generate this many greedy tokens per prompt (batched, EOS ignored).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub greedy: usize,
    /// Compute the last position's logits as a decode step (all but the last token prefilled,
    /// then the last one alone through the cache), to check the decode attention path the way the
    /// default checks prefill's.
    #[cfg_attr(feature = "cli", arg(long))]
    pub last_by_decode: bool,
    /// Write the JSON here instead of stdout.
    #[cfg_attr(feature = "cli", arg(short = 'o', long))]
    pub out: Option<std::path::PathBuf>,
}

impl LogitsFlags {
    /// The report for `prompts` (from [`parse_token_prompts`] of `tokens`, parsed before the
    /// model loads) on `model` in numeric mode `dtype`, under the plan file if any.
    pub fn run(&self, model: &Model, prompts: &[Vec<u32>], dtype: &str) -> Result<LogitsReport> {
        let plan = match &self.plan {
            Some(p) => crate::directions::load_compiled_plan(
                &crate::directions::PlanSource::file(p),
                model,
            )?,
            None => None,
        };
        let logits = if self.last_by_decode {
            last_token_logits_by_decode(model, prompts, plan.clone())?
        } else {
            last_token_logits(model, prompts, plan.clone())?
        };
        greedy_report(model, prompts, plan, logits, self.greedy, dtype)
    }
}

/// Last-token logits of `prompts` as one left-padded batch under `plan`, and `greedy` greedy
/// tokens per prompt (batched, end-of-sequence ignored).
pub fn logits_report(
    model: &Model,
    prompts: &[Vec<u32>],
    plan: Option<Arc<CompiledPlan>>,
    greedy: usize,
    dtype: &str,
) -> Result<LogitsReport> {
    let logits = last_token_logits(model, prompts, plan.clone())?;
    greedy_report(model, prompts, plan, logits, greedy, dtype)
}

/// The report around already computed `logits`, with `greedy` greedy tokens per prompt.
fn greedy_report(
    model: &Model,
    prompts: &[Vec<u32>],
    plan: Option<Arc<CompiledPlan>>,
    logits: Vec<Vec<f32>>,
    greedy: usize,
    dtype: &str,
) -> Result<LogitsReport> {
    let greedy = if greedy > 0 {
        let reqs: Vec<GenRequest> = prompts
            .iter()
            .map(|p| GenRequest {
                prompt: p.clone(),
                max_new_tokens: greedy,
                sampling: Sampling::greedy(),
                stop: Vec::new(),
                plan: plan.clone(),
            })
            .collect();
        Generator::new(&model.decoder, prompts.len())
            .run(&reqs, None, |_, _| Ok(()))?
            .into_iter()
            .map(|o| o.tokens)
            .collect()
    } else {
        Vec::new()
    };
    Ok(LogitsReport {
        device: format!("{:?}", model.decoder.device()),
        dtype: dtype.into(),
        greedy,
        logits,
    })
}
