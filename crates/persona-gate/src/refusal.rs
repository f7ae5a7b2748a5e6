//! Choosing the refusal direction, following Arditi et al. (2024), "Refusal in Language Models Is
//! Mediated by a Single Direction".
//!
//! Candidates are differences in means between harmful and harmless instructions at every layer
//! (and the chosen template positions). Each candidate `r` from layer `l` is scored on held-out
//! prompts by three forward passes (no generation):
//! - **bypass**: mean refusal score on harmful prompts with `r` ablated everywhere (all sites of
//!   every block): lower means ablating it removes refusal;
//! - **induce**: mean refusal score on harmless prompts with `r` (as is, not normalized) added at
//!   layer `l` at every position: higher means adding it brings refusal;
//! - **KL**: mean KL divergence of the next-token distribution on harmless prompts between the
//!   plain model and the ablated one: small means ablation leaves ordinary behaviour alone.
//!
//! Candidates from the last `discard_last_frac` of layers are discarded (too close to the unembedding
//! to be a "reason" for refusal), as are those with induce <= 0 or KL above `kl_max`; the lowest
//! bypass score wins.
//!
//! **Refusal score** (documented, logit-based): with `R` the set of first tokens of refusal openings
//! for this tokenizer ("I", "As", "Sorry", "Unfortunately", ...; see [`refusal_tokens`]) and `p` the
//! next-token distribution after the generation prompt, `score = log(p(R)) - log(1 - p(R))`: the
//! log-odds that the answer opens like a refusal.
//!
//! [`extract_refusal`] is the whole operation behind `pgate extract refusal` (prompt sets by file or
//! name, extraction, selection); [`rates`] measures label rates of a prompt set under a plan
//! (`pgate eval`).

pub mod rates;

use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::directions::{refusal_candidates, CaptureOptions, DirectionSet, Position};
use crate::eval::PromptSet;
use crate::events::{Event, EventSink};
use crate::generate::{encode_chat, ChatPrompt};
use crate::intervene::{CompiledPlan, InterventionPlan, LayerSet, OpKind, PlanHook, Sites};
use crate::model::{KvCache, LogitsAt, Model};
use crate::{Error, Result};

/// Openings whose first token counts as "refusing" in the refusal score.
pub const REFUSAL_OPENINGS: &[&str] = &[
    "I",
    "As",
    "Sorry",
    "I'm",
    "Unfortunately",
    "I cannot",
    "I apologize",
];

/// First-token ids of [`REFUSAL_OPENINGS`] for this model's tokenizer.
pub fn refusal_tokens(model: &Model) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for o in REFUSAL_OPENINGS {
        if let Some(&t) = model.tokenizer.encode(o)?.first() {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Tokenizer(
            "no refusal opening tokenizes to a token".into(),
        ));
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelectOptions {
    /// Template positions to draw candidates from (Arditi et al. use the post-instruction tokens).
    pub positions: Vec<Position>,
    pub discard_last_frac: f64,
    pub kl_max: f64,
    pub batch_size: usize,
    /// Consider every `layer_stride`-th layer (1 = all).
    pub layer_stride: usize,
    /// When no candidate passes the filters, take the first position's candidate at this layer
    /// instead of failing. Drift comparisons need it: a version that lost its refusal (the case
    /// drift exists to catch) often has no candidate whose addition still induces refusal, and
    /// its direction at the old version's layer is still the thing to compare.
    #[serde(default)]
    pub fallback_layer: Option<usize>,
}

impl Default for SelectOptions {
    fn default() -> Self {
        Self {
            positions: vec![Position::LAST],
            discard_last_frac: 0.2,
            kl_max: 0.1,
            batch_size: 16,
            layer_stride: 1,
            fallback_layer: None,
        }
    }
}

/// Scores of one candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateScore {
    pub layer: usize,
    pub position: String,
    pub norm: f64,
    pub bypass: f64,
    pub induce: f64,
    pub kl: f64,
    /// Why it was filtered out, if it was.
    pub filtered: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    /// The candidate set of the chosen position (all layers); `meta.extra` names the chosen layer.
    #[serde(skip)]
    pub direction: DirectionSet,
    pub layer: usize,
    pub position: String,
    pub baseline_harmful: f64,
    pub baseline_harmless: f64,
    pub scores: Vec<CandidateScore>,
}

/// Next-token logits after each prompt (batched, left-padded), under an optional plan.
pub fn last_logits(
    model: &Model,
    prompts: &[Vec<u32>],
    plan: Option<&Arc<CompiledPlan>>,
    batch: usize,
) -> Result<Tensor> {
    let dec = &model.decoder;
    let mut outs = Vec::new();
    for chunk in prompts.chunks(batch.max(1)) {
        let (tokens, rows) = crate::generate::left_padded(chunk, dec.device())?;
        let plans: Vec<Option<Arc<CompiledPlan>>> = vec![plan.cloned(); chunk.len()];
        let mut hook = PlanHook::new(&plans, dec.n_layers());
        let mut cache = KvCache::new(dec.n_layers());
        let hook_ref: Option<&mut dyn crate::intervene::ResidualHook> = if hook.is_active() {
            Some(&mut hook)
        } else {
            None
        };
        let l = dec
            .forward(&tokens, &rows, &mut cache, hook_ref, LogitsAt::Last)?
            .ok_or_else(|| Error::InvalidValue("no logits".into()))?;
        outs.push(l.to_device(&Device::Cpu)?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Mean refusal score of `logits` (`[n, vocab]`).
pub fn refusal_score(logits: &Tensor, refusal: &[u32]) -> Result<f64> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::new(refusal, logits.device())?;
    let p = lp.index_select(&idx, 1)?.exp()?.sum(1)?.to_vec1::<f32>()?;
    let eps = 1e-8f64;
    Ok(p.iter()
        .map(|&p| {
            let p = (p as f64).clamp(eps, 1.0 - eps);
            p.ln() - (1.0 - p).ln()
        })
        .sum::<f64>()
        / p.len().max(1) as f64)
}

/// Mean KL(p || q) over rows of two logit matrices.
pub fn mean_kl(p_logits: &Tensor, q_logits: &Tensor) -> Result<f64> {
    let lp = candle_nn::ops::log_softmax(p_logits, D::Minus1)?;
    let lq = candle_nn::ops::log_softmax(q_logits, D::Minus1)?;
    let kl = (lp.exp()? * (lp - lq)?)?.sum(1)?.to_vec1::<f32>()?;
    Ok(kl.iter().map(|x| *x as f64).sum::<f64>() / kl.len().max(1) as f64)
}

/// A plan ablating `v` at every site of every block (the run-time twin of orthogonalization).
pub fn ablate_everywhere(model: &Model, v: &[f32]) -> Result<Arc<CompiledPlan>> {
    let c = model.config();
    let mut plan = InterventionPlan::new().ablate(LayerSet((0..c.n_layers).collect()), v.to_vec());
    plan.ops[0].sites = Sites::All;
    plan.ops[0].direction_name = "refusal".into();
    Ok(Arc::new(plan.compile(
        c.n_layers,
        c.d_model,
        model.decoder.dtype(),
        model.decoder.device(),
    )?))
}

/// A plan adding `v` as given (raw) at `layer`, all positions.
pub fn add_raw(model: &Model, v: &[f32], layer: usize, coeff: f32) -> Result<Arc<CompiledPlan>> {
    let c = model.config();
    let mut plan = InterventionPlan::new().add(LayerSet::single(layer), v.to_vec(), coeff);
    plan.ops[0].kind = OpKind::Add { coeff, raw: true };
    plan.ops[0].direction_name = "refusal".into();
    Ok(Arc::new(plan.compile(
        c.n_layers,
        c.d_model,
        model.decoder.dtype(),
        model.decoder.device(),
    )?))
}

/// The validation prompts, tokenized, with the unsteered model's scores on them: what every
/// candidate is measured against.
struct Validation {
    harmful: Vec<Vec<u32>>,
    harmless: Vec<Vec<u32>>,
    refusal_tokens: Vec<u32>,
    /// Unsteered next-token logits on the harmless prompts (the KL reference).
    base_harmless: Tensor,
    baseline_harmful: f64,
    baseline_harmless: f64,
}

impl Validation {
    fn new(model: &Model, harmful: &[String], harmless: &[String], batch: usize) -> Result<Self> {
        let enc = |v: &[String]| -> Result<Vec<Vec<u32>>> {
            v.iter()
                .map(|p| encode_chat(model, &ChatPrompt::new(p.clone())))
                .collect()
        };
        let (harmful, harmless) = (enc(harmful)?, enc(harmless)?);
        let refusal_tokens = refusal_tokens(model)?;
        let base_h = last_logits(model, &harmful, None, batch)?;
        let base_harmless = last_logits(model, &harmless, None, batch)?;
        Ok(Validation {
            baseline_harmful: refusal_score(&base_h, &refusal_tokens)?,
            baseline_harmless: refusal_score(&base_harmless, &refusal_tokens)?,
            harmful,
            harmless,
            refusal_tokens,
            base_harmless,
        })
    }

    /// Bypass, induce and KL of the candidate `v` read at `layer` (`None` for a zero vector), and
    /// why the filters drop it, if they do.
    fn score(
        &self,
        model: &Model,
        v: &[f32],
        layer: usize,
        position: &str,
        opts: &SelectOptions,
    ) -> Result<Option<CandidateScore>> {
        let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return Ok(None);
        }
        let (b, rt) = (opts.batch_size, &self.refusal_tokens);
        let abl = ablate_everywhere(model, v)?;
        let bypass = refusal_score(&last_logits(model, &self.harmful, Some(&abl), b)?, rt)?;
        let abl_s = last_logits(model, &self.harmless, Some(&abl), b)?;
        let kl = mean_kl(&self.base_harmless, &abl_s)?;
        let add = add_raw(model, v, layer, 1.0)?;
        let induce = refusal_score(&last_logits(model, &self.harmless, Some(&add), b)?, rt)?;
        let filtered = if induce <= 0.0 {
            Some(format!("induce score {induce:.2} <= 0"))
        } else if kl > opts.kl_max {
            Some(format!("KL {kl:.3} > {}", opts.kl_max))
        } else {
            None
        };
        Ok(Some(CandidateScore {
            layer,
            position: position.to_string(),
            norm,
            bypass,
            induce,
            kl,
            filtered,
        }))
    }
}

/// Extract candidates from `harmful_train` / `harmless_train` and select on the validation sets.
pub fn select_refusal_direction(
    model: &Model,
    harmful_train: &[String],
    harmless_train: &[String],
    harmful_val: &[String],
    harmless_val: &[String],
    opts: &SelectOptions,
    mut progress: impl FnMut(&str),
) -> Result<Selection> {
    if harmful_val.is_empty() || harmless_val.is_empty() {
        return Err(Error::Empty(
            "refusal selection needs harmful and harmless validation prompts".into(),
        ));
    }
    let n_layers = model.config().n_layers;
    if let Some(l) = opts.fallback_layer.filter(|&l| l >= n_layers) {
        return Err(Error::InvalidValue(format!(
            "fallback refusal layer {l} is out of range (the model has {n_layers} layers)"
        )));
    }
    progress("extracting candidates (difference in means)");
    let cands = refusal_candidates(
        model,
        harmful_train,
        harmless_train,
        &opts.positions,
        &CaptureOptions {
            batch_size: opts.batch_size,
            ..Default::default()
        },
    )?;
    let val = Validation::new(model, harmful_val, harmless_val, opts.batch_size)?;
    let max_layer = ((1.0 - opts.discard_last_frac) * n_layers as f64).floor() as usize;
    let mut scores = Vec::new();
    let mut best: Option<(f64, usize, usize)> = None;
    for (ci, set) in cands.iter().enumerate() {
        let pos = opts.positions[ci].name();
        for layer in (0..max_layer.min(n_layers)).step_by(opts.layer_stride.max(1)) {
            progress(&format!("scoring layer {layer} position {pos}"));
            let Some(s) = val.score(model, set.layer(layer)?, layer, &pos, opts)? else {
                continue;
            };
            if s.filtered.is_none() && best.is_none_or(|(b, _, _)| s.bypass < b) {
                best = Some((s.bypass, ci, layer));
            }
            scores.push(s);
        }
    }
    let (ci, layer, selection) = match (best, opts.fallback_layer) {
        (Some((_, ci, layer)), _) => (
            ci,
            layer,
            "arditi2024: min bypass s.t. induce > 0, KL < max, layer < 80%".to_string(),
        ),
        (None, Some(l)) => {
            progress(&format!(
                "no candidate passed the filters (induce > 0, KL below the limit); taking layer {l}, as asked"
            ));
            (
                0,
                l,
                format!("fallback: no candidate passed the filters; layer {l} as given"),
            )
        }
        (None, None) => return Err(no_candidate(&scores, opts.kl_max)),
    };
    let mut direction = cands[ci].clone();
    direction
        .meta
        .extra
        .insert("selected_layer".into(), layer.to_string());
    direction.meta.extra.insert("selection".into(), selection);
    direction.meta.position = opts.positions[ci].name();
    Ok(Selection {
        direction,
        layer,
        position: opts.positions[ci].name(),
        baseline_harmful: val.baseline_harmful,
        baseline_harmless: val.baseline_harmless,
        scores,
    })
}

/// The error when no candidate passes the filters, saying which filter dropped how many and how
/// close the best came, so the user knows which knob to turn (a higher `--kl-max` helps only
/// when some candidate induced refusal).
fn no_candidate(scores: &[CandidateScore], kl_max: f64) -> Error {
    let inducing: Vec<&CandidateScore> = scores.iter().filter(|s| s.induce > 0.0).collect();
    let best_induce = scores
        .iter()
        .map(|s| s.induce)
        .fold(f64::NEG_INFINITY, f64::max);
    let detail = if scores.is_empty() {
        "no candidate could be scored (every difference in means was zero or not finite)"
            .to_string()
    } else if inducing.is_empty() {
        format!(
            "none of the {} candidates induced refusal on harmless prompts (best induce score \
             {best_induce:.2}): this model's validation answers may not refuse; try more prompts",
            scores.len()
        )
    } else {
        let low = inducing
            .iter()
            .min_by(|a, b| a.kl.total_cmp(&b.kl))
            .expect("non-empty");
        format!(
            "{} of {} candidates induced refusal but moved harmless answers too far (lowest KL \
             {:.3} at layer {}, limit {kl_max}); a --kl-max above it would keep one",
            inducing.len(),
            scores.len(),
            low.kl,
            low.layer
        )
    };
    Error::InvalidValue(format!(
        "no refusal-direction candidate passed the filters (induce > 0, KL below the limit): {detail}"
    ))
}

/// One refusal-direction extraction: the prompt sets (files or names, see [`PromptSet::load`]),
/// how many prompts of each, and the selection options.
#[derive(Debug, Clone)]
pub struct RefusalJob {
    /// Harmful instructions for the means.
    pub harmful: String,
    /// Harmless instructions for the means.
    pub harmless: String,
    /// Harmful validation prompts for selection.
    pub harmful_val: String,
    /// Harmless validation prompts for selection.
    pub harmless_val: String,
    pub n_train: usize,
    pub n_val: usize,
    pub select: SelectOptions,
}

/// [`RefusalJob`] as flags (`pgate extract refusal`): positions by name, the selection's knobs,
/// and the files the selection goes to ([`RefusalFlags::write`]).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RefusalFlags {
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: std::path::PathBuf,
    /// Harmful instructions for the means (file or name).
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmful_train"))]
    pub harmful: String,
    /// Harmless instructions for the means (file or name).
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmless_train"))]
    pub harmless: String,
    /// Harmful validation prompts for selection.
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmful_val"))]
    pub harmful_val: String,
    /// Harmless validation prompts for selection.
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmless_val"))]
    pub harmless_val: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub n_train: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub n_val: usize,
    /// Template positions for candidates, e.g. last or -1,-2,-3.
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value = "last", value_delimiter = ',')
    )]
    pub positions: Vec<String>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.1))]
    pub kl_max: f64,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub layer_stride: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub batch_size: usize,
    /// Write the candidate scores as JSON here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub scores: Option<std::path::PathBuf>,
}

impl RefusalFlags {
    /// Save the selected candidate set to `out` and the scores to `scores` (when given).
    pub fn write(&self, sel: &Selection) -> Result<()> {
        sel.direction.save(&self.out)?;
        if let Some(p) = &self.scores {
            std::fs::write(p, serde_json::to_string_pretty(sel)?)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        Ok(())
    }

    /// The job, positions parsed (other selection options at their defaults).
    pub fn job(&self) -> Result<RefusalJob> {
        let positions = self
            .positions
            .iter()
            .map(|p| Position::parse(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(RefusalJob {
            harmful: self.harmful.clone(),
            harmless: self.harmless.clone(),
            harmful_val: self.harmful_val.clone(),
            harmless_val: self.harmless_val.clone(),
            n_train: self.n_train,
            n_val: self.n_val,
            select: SelectOptions {
                positions,
                kl_max: self.kl_max,
                batch_size: self.batch_size,
                layer_stride: self.layer_stride,
                ..Default::default()
            },
        })
    }
}

impl Default for RefusalJob {
    fn default() -> Self {
        RefusalJob {
            harmful: "harmful_train".into(),
            harmless: "harmless_train".into(),
            harmful_val: "harmful_val".into(),
            harmless_val: "harmless_val".into(),
            n_train: 128,
            n_val: 32,
            select: SelectOptions::default(),
        }
    }
}

/// Load the job's prompt sets and select the refusal direction; what is being scored goes to
/// `sink` as notes.
pub fn extract_refusal(
    model: &Model,
    job: &RefusalJob,
    sink: &mut dyn EventSink,
) -> Result<Selection> {
    let load =
        |s: &str, n: usize| -> Result<Vec<String>> { Ok(PromptSet::load(s)?.take(n).texts()) };
    select_refusal_direction(
        model,
        &load(&job.harmful, job.n_train)?,
        &load(&job.harmless, job.n_train)?,
        &load(&job.harmful_val, job.n_val)?,
        &load(&job.harmless_val, job.n_val)?,
        &job.select,
        |msg| sink.event(Event::Note(msg.to_string())),
    )
}

impl Selection {
    /// The closing line of `pgate extract refusal`: what was selected, where it went, how long.
    pub fn selected_line(&self, out: &std::path::Path, seconds: f64) -> String {
        format!(
            "selected layer {} position {} -> {} ({seconds:.0} s)",
            self.layer,
            self.position,
            out.display()
        )
    }

    /// The baseline scores and every candidate's scores with the chosen one marked, as a text table.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "baseline refusal score: harmful {:.2}, harmless {:.2}\n",
            self.baseline_harmful, self.baseline_harmless
        );
        out += &format!(
            "{:>5} {:>6} {:>8} {:>8} {:>8} {:>8}  note\n",
            "layer", "pos", "norm", "bypass", "induce", "KL"
        );
        for s in &self.scores {
            let mark = if s.layer == self.layer && s.position == self.position {
                "<- selected".to_string()
            } else {
                s.filtered.clone().unwrap_or_default()
            };
            out += &format!(
                "{:>5} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.3}  {mark}\n",
                s.layer, s.position, s.norm, s.bypass, s.induce, s.kl
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(layer: usize, induce: f64, kl: f64) -> CandidateScore {
        CandidateScore {
            layer,
            position: "last".into(),
            norm: 1.0,
            bypass: 0.0,
            induce,
            kl,
            filtered: Some("filtered".into()),
        }
    }

    #[test]
    fn no_candidate_error_names_the_filter_that_dropped_them() {
        let none = no_candidate(&[score(0, -1.5, 0.01), score(2, -0.25, 0.02)], 0.1).to_string();
        assert!(
            none.contains("none of the 2 candidates induced refusal")
                && none.contains("best induce score -0.25"),
            "{none}"
        );
        let kl = no_candidate(
            &[score(0, -1.0, 0.01), score(4, 0.5, 0.7), score(6, 0.2, 0.4)],
            0.1,
        )
        .to_string();
        assert!(
            kl.contains("2 of 3 candidates induced refusal")
                && kl.contains("lowest KL 0.400 at layer 6, limit 0.1"),
            "{kl}"
        );
        assert!(no_candidate(&[], 0.1)
            .to_string()
            .contains("could be scored"));
        for e in [none, kl] {
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
