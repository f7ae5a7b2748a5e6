//! Directions from contrasting prompt sets.
//!
//! - Difference in means (Arditi et al. 2024): `mean(positive) - mean(negative)` of the residual at
//!   each layer. For refusal the sides are harmful and harmless instructions read at the last
//!   prompt token (or another post-instruction position); the candidates at every layer and position
//!   are then ranked by their effect (selection lives with the refusal study).
//! - Persona vectors (Chen et al. 2025): the same difference between answers given under a positive
//!   and a negative system prompt for a trait, averaged over the answer tokens.
//! - Optionally the first principal component of the paired differences (RepE / repeng's
//!   `pca_diff`), when the two sides are paired prompt by prompt.

use sha2::{Digest, Sha256};

use super::capture::{capture_prompts, Activations, CaptureOptions, Position};
use super::set::{DirectionMeta, DirectionSet};
use super::traits::TraitSpec;
use super::util::{dot, norm};
use crate::generate::ChatPrompt;
use crate::model::Model;
use crate::{Error, Result};

/// How a direction is computed from the two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// `mean(pos) - mean(neg)`.
    #[default]
    DiffInMeans,
    /// First principal component of paired differences `pos_i - neg_i` (uncentered, which is what
    /// repeng's pca_diff computes after randomly flipping pairs), signed to agree with the
    /// difference in means and scaled by the mean projection of the differences on it.
    PcaPaired,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mean" | "diff-in-means" | "dim" => Ok(Method::DiffInMeans),
            "pca" | "pca-paired" | "pca-diff" => Ok(Method::PcaPaired),
            _ => Err(Error::InvalidSpec {
                spec: s.into(),
                reason: "method must be diff-in-means (mean) or pca-paired (pca)".into(),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::DiffInMeans => "diff-in-means",
            Method::PcaPaired => "pca-paired",
        }
    }
}

fn check_sides(pos: &Activations, neg: &Activations) -> Result<()> {
    if pos.n == 0 || neg.n == 0 {
        return Err(Error::Empty(format!(
            "one-sided prompt set: {} positive and {} negative prompts (both sides need prompts)",
            pos.n, neg.n
        )));
    }
    if pos.n_layers != neg.n_layers || pos.d != neg.d {
        return Err(Error::InvalidValue(format!(
            "positive activations are {} layers x {}, negative {} layers x {}",
            pos.n_layers, pos.d, neg.n_layers, neg.d
        )));
    }
    Ok(())
}

/// `mean(pos) - mean(neg)` at every layer, with both means: `(diff, pos_mean, neg_mean)`, each
/// `[n_layers, d]` row-major.
pub fn diff_in_means(
    pos: &Activations,
    neg: &Activations,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    check_sides(pos, neg)?;
    let mp = pos.mean()?;
    let mn = neg.mean()?;
    let diff = mp.iter().zip(&mn).map(|(a, b)| a - b).collect();
    Ok((diff, mp, mn))
}

/// First principal component of the paired differences `pos_i - neg_i` at every layer, by power
/// iteration on `D^T D` (never formed: `v <- D^T (D v)`), started from the difference in means.
/// Pairs where either side has no activation are skipped. Returns `[n_layers, d]`, each row the
/// unit component times the mean projection of the differences on it (so its norm is comparable
/// to the difference in means), signed so that projection is positive.
pub fn paired_pc1(pos: &Activations, neg: &Activations) -> Result<Vec<f32>> {
    check_sides(pos, neg)?;
    if pos.n != neg.n {
        return Err(Error::InvalidValue(format!(
            "pca-paired needs paired prompts: {} positive vs {} negative",
            pos.n, neg.n
        )));
    }
    let pairs: Vec<usize> = (0..pos.n)
        .filter(|&i| pos.valid(i) && neg.valid(i))
        .collect();
    if pairs.is_empty() {
        return Err(Error::Empty("no pair has activations on both sides".into()));
    }
    let d = pos.d;
    let mut out = Vec::with_capacity(pos.n_layers * d);
    for l in 0..pos.n_layers {
        let diffs: Vec<Vec<f64>> = pairs
            .iter()
            .map(|&i| {
                pos.row(l, i)
                    .iter()
                    .zip(neg.row(l, i))
                    .map(|(a, b)| *a as f64 - *b as f64)
                    .collect()
            })
            .collect();
        let mut mean = vec![0f64; d];
        for r in &diffs {
            mean.iter_mut().zip(r).for_each(|(m, x)| *m += x);
        }
        let mut v = mean.clone();
        if v.iter().all(|x| *x == 0.0) {
            v = vec![1.0; d];
        }
        normalize(&mut v);
        for _ in 0..500 {
            let mut next = vec![0f64; d];
            for r in &diffs {
                let p: f64 = r.iter().zip(&v).map(|(a, b)| a * b).sum();
                next.iter_mut().zip(r).for_each(|(n, x)| *n += p * x);
            }
            if normalize(&mut next) == 0.0 {
                break;
            }
            let delta: f64 = next
                .iter()
                .zip(&v)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            v = next;
            if delta < 1e-9 {
                break;
            }
        }
        let proj = diffs
            .iter()
            .map(|r| r.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>())
            .sum::<f64>()
            / diffs.len() as f64;
        let sign = if proj < 0.0 { -1.0 } else { 1.0 };
        out.extend(v.iter().map(|x| (x * sign * proj.abs()) as f32));
    }
    Ok(out)
}

fn normalize(v: &mut [f64]) -> f64 {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    n
}

/// sha256 of two prompt sets, so a direction names exactly the prompts it came from: the compact
/// JSON `{"pos": [[system, user], ...], "neg": [...]}` (system `null` when absent).
pub fn prompt_set_sha256(pos: &[ChatPrompt], neg: &[ChatPrompt]) -> String {
    let side = |ps: &[ChatPrompt]| -> Vec<(Option<String>, String)> {
        ps.iter()
            .map(|p| (p.system.clone(), p.user.clone()))
            .collect()
    };
    let v = serde_json::json!({"pos": side(pos), "neg": side(neg)});
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

fn build_set(
    meta: DirectionMeta,
    pos: &Activations,
    neg: &Activations,
    method: Method,
) -> Result<DirectionSet> {
    let (diff, mp, mn) = diff_in_means(pos, neg)?;
    let data = match method {
        Method::DiffInMeans => diff,
        Method::PcaPaired => paired_pc1(pos, neg)?,
    };
    let mut meta = meta;
    meta.method = method.name().into();
    meta.position = pos.position.name();
    meta.n_pos = pos.n_valid();
    meta.n_neg = neg.n_valid();
    let mut set = DirectionSet::from_flat(meta, data, pos.n_layers, pos.d)?;
    set.pos_mean = Some(mp);
    set.neg_mean = Some(mn);
    Ok(set)
}

/// Difference in means between two chat-prompt sets at each of `positions` (one forward pass for
/// all prompt positions): one [`DirectionSet`] per position, named `name`.
pub fn diff_in_means_prompts(
    model: &Model,
    name: &str,
    pos: &[ChatPrompt],
    neg: &[ChatPrompt],
    positions: &[Position],
    method: Method,
    opts: &CaptureOptions,
) -> Result<Vec<DirectionSet>> {
    if pos.is_empty() || neg.is_empty() {
        return Err(Error::Empty(format!(
            "one-sided prompt set: {} positive and {} negative prompts (both sides need prompts)",
            pos.len(),
            neg.len()
        )));
    }
    let mut all = pos.to_vec();
    all.extend_from_slice(neg);
    let acts = capture_prompts(model, &all, positions, opts, |_, _, _| {})?;
    let hash = prompt_set_sha256(pos, neg);
    acts.into_iter()
        .map(|a| {
            let (p, n) = split(&a, pos.len());
            let mut meta =
                DirectionMeta::new(name, method.name(), a.n_layers, a.d).with_model(model, false);
            meta.prompt_set_sha256 = Some(hash.clone());
            build_set(meta, &p, &n, method)
        })
        .collect()
}

/// Split activations of `[pos..., neg...]` into the two sides.
fn split(a: &Activations, n_pos: usize) -> (Activations, Activations) {
    let take = |range: std::ops::Range<usize>| {
        let n = range.len();
        let mut data = Vec::with_capacity(a.n_layers * n * a.d);
        for l in 0..a.n_layers {
            for i in range.clone() {
                data.extend_from_slice(a.row(l, i));
            }
        }
        Activations {
            n_layers: a.n_layers,
            n,
            d: a.d,
            data,
            counts: a.counts[range.clone()].to_vec(),
            position: a.position,
            responses: a.responses.as_ref().map(|r| r[range.clone()].to_vec()),
        }
    };
    (take(0..n_pos), take(n_pos..a.n))
}

/// Refusal-direction candidates: difference in means between harmful and harmless instructions
/// (each sent alone, under the template's default system prompt) at every layer, for each of
/// `positions` (Arditi et al. read the last prompt token and the other post-instruction tokens,
/// `-1..-k`). One [`DirectionSet`] per position, named `refusal`, carrying both means. Choosing the
/// best (layer, position) is left to the caller.
pub fn refusal_candidates(
    model: &Model,
    harmful: &[String],
    harmless: &[String],
    positions: &[Position],
    opts: &CaptureOptions,
) -> Result<Vec<DirectionSet>> {
    let to_prompts = |v: &[String]| -> Vec<ChatPrompt> { v.iter().map(ChatPrompt::new).collect() };
    let mut sets = diff_in_means_prompts(
        model,
        "refusal",
        &to_prompts(harmful),
        &to_prompts(harmless),
        positions,
        Method::DiffInMeans,
        opts,
    )?;
    for s in &mut sets {
        s.meta.extra.insert("pos_side".into(), "harmful".into());
        s.meta.extra.insert("neg_side".into(), "harmless".into());
    }
    Ok(sets)
}

/// Options of a persona-vector extraction.
#[derive(Debug, Clone)]
pub struct TraitOptions {
    pub position: Position,
    pub method: Method,
    /// Use the first N questions (all when `None`).
    pub max_questions: Option<usize>,
    /// Use the first N instruction pairs (all when `None`).
    pub max_pairs: Option<usize>,
    pub capture: CaptureOptions,
    /// Hash the model file when no sha256 sidecar exists (seconds for a gigabyte).
    pub hash_model: bool,
}

impl Default for TraitOptions {
    fn default() -> Self {
        Self {
            position: Position::Response,
            method: Method::DiffInMeans,
            max_questions: None,
            max_pairs: None,
            capture: CaptureOptions::default(),
            hash_model: false,
        }
    }
}

/// [`TraitOptions`] as flags (`pgate extract trait`): names parsed, sampling checked by
/// [`TraitFlags::options`].
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TraitFlags {
    /// Where to read activations: response (mean over the answer), last (last prompt token),
    /// post-instruction (mean over the template tokens after the question), or -K (K-th prompt
    /// token from the end).
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value = "response", allow_hyphen_values = true)
    )]
    pub position: String,
    /// diff-in-means, or pca-paired (first principal component of paired differences).
    #[cfg_attr(feature = "cli", arg(long, default_value = "diff-in-means"))]
    pub method: String,
    /// Use only the first N questions.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_questions: Option<usize>,
    /// Use only the first N instruction pairs.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_pairs: Option<usize>,
    /// New tokens per answer (response position).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub max_tokens: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Sampling temperature of the answers (0 = greedy).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.0))]
    pub temperature: f32,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub top_p: f32,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Do not hash the model file when no sha256 sidecar exists.
    #[cfg_attr(feature = "cli", arg(long))]
    pub no_hash: bool,
}

impl TraitFlags {
    /// The options, with position and method parsed and the sampling checked.
    pub fn options(&self) -> Result<TraitOptions> {
        let opts = TraitOptions {
            position: Position::parse(&self.position)?,
            method: Method::parse(&self.method)?,
            max_questions: self.max_questions,
            max_pairs: self.max_pairs,
            capture: CaptureOptions {
                batch_size: self.batch_size,
                max_new_tokens: self.max_tokens,
                sampling: crate::generate::Sampling {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    seed: self.seed,
                },
            },
            hash_model: !self.no_hash,
        };
        opts.capture.sampling.validate()?;
        Ok(opts)
    }
}

/// The result of [`extract_trait`]: the direction and what it came from.
#[derive(Debug, Clone)]
pub struct TraitExtraction {
    pub set: DirectionSet,
    pub pos: Activations,
    pub neg: Activations,
    pub pos_prompts: Vec<ChatPrompt>,
    pub neg_prompts: Vec<ChatPrompt>,
}

impl TraitExtraction {
    /// Where the two sides' means project on the unit direction, per layer `(pos, neg)`.
    pub fn separation(&self) -> Vec<(Option<f64>, Option<f64>)> {
        let p = self
            .set
            .pos_mean
            .as_ref()
            .map(|m| self.set.projections(m))
            .unwrap_or_default();
        let n = self
            .set
            .neg_mean
            .as_ref()
            .map(|m| self.set.projections(m))
            .unwrap_or_default();
        p.into_iter().zip(n).collect()
    }
}

/// A persona vector for `spec` (Chen et al. 2025): every question asked under each positive and
/// each negative system prompt of the trait; the residual read at `opts.position` (by default
/// averaged over the answer), and the two sides contrasted at every layer. Prompts are paired
/// (same question and instruction index) so `Method::PcaPaired` applies.
///
/// Chen et al. also drop answers a judge scores as not showing the trait; no judge runs here, so
/// every answer counts (the trait's `eval_prompt` is kept in the spec for a judge to use).
pub fn extract_trait(
    model: &Model,
    spec: &TraitSpec,
    opts: &TraitOptions,
    mut on_progress: impl FnMut(&str, usize, usize),
) -> Result<TraitExtraction> {
    let pairs = &spec.instruction[..opts
        .max_pairs
        .unwrap_or(usize::MAX)
        .min(spec.instruction.len())];
    let questions = &spec.questions[..opts
        .max_questions
        .unwrap_or(usize::MAX)
        .min(spec.questions.len())];
    if pairs.is_empty() || questions.is_empty() {
        return Err(Error::Empty(format!(
            "trait '{}': {} instruction pairs and {} questions selected (need at least one of each)",
            spec.name,
            pairs.len(),
            questions.len()
        )));
    }
    let mut pos_prompts = Vec::new();
    let mut neg_prompts = Vec::new();
    for (pi, pair) in pairs.iter().enumerate() {
        for (qi, q) in questions.iter().enumerate() {
            let id = Some(format!("{}:{pi}:{qi}", spec.name));
            pos_prompts.push(ChatPrompt {
                id: id.clone(),
                system: Some(pair.pos.clone()),
                user: q.clone(),
            });
            neg_prompts.push(ChatPrompt {
                id,
                system: Some(pair.neg.clone()),
                user: q.clone(),
            });
        }
    }
    let mut all = pos_prompts.clone();
    all.extend_from_slice(&neg_prompts);
    let acts = capture_prompts(
        model,
        &all,
        &[opts.position],
        &opts.capture,
        &mut on_progress,
    )?
    .pop()
    .ok_or_else(|| Error::InvalidValue("internal: no activations".into()))?;
    let (pos, neg) = split(&acts, pos_prompts.len());
    let mut meta = DirectionMeta::new(&spec.name, opts.method.name(), acts.n_layers, acts.d)
        .with_model(model, opts.hash_model);
    meta.prompt_set_sha256 = Some(prompt_set_sha256(&pos_prompts, &neg_prompts));
    meta.extra.insert("trait".into(), spec.name.clone());
    meta.extra
        .insert("trait_source".into(), spec.source.clone());
    meta.extra
        .insert("instruction_pairs".into(), pairs.len().to_string());
    meta.extra
        .insert("questions".into(), questions.len().to_string());
    if opts.position == Position::Response {
        let c = &opts.capture;
        meta.extra
            .insert("max_new_tokens".into(), c.max_new_tokens.to_string());
        meta.extra.insert(
            "sampling".into(),
            format!(
                "temperature={} top_p={} seed={}",
                c.sampling.temperature, c.sampling.top_p, c.sampling.seed
            ),
        );
        let dropped = acts.n - acts.n_valid();
        meta.extra
            .insert("answers_without_tokens".into(), dropped.to_string());
        if !c.sampling.is_greedy() {
            meta.seed = Some(c.sampling.seed);
        }
    }
    let set = build_set(meta, &pos, &neg, opts.method)?;
    Ok(TraitExtraction {
        set,
        pos,
        neg,
        pos_prompts,
        neg_prompts,
    })
}

/// Cosine of every row of `set` with the difference-in-means direction recomputed from `pos`/`neg`
/// (a check that a stored vector matches its activations).
pub fn agreement(set: &DirectionSet, pos: &Activations, neg: &Activations) -> Result<Vec<f64>> {
    let (diff, _, _) = diff_in_means(pos, neg)?;
    Ok(diff
        .chunks(set.d_model())
        .zip(set.rows())
        .map(|(a, b)| {
            let d = norm(a) * norm(b);
            if d > 0.0 {
                dot(a, b) / d
            } else {
                0.0
            }
        })
        .collect())
}
