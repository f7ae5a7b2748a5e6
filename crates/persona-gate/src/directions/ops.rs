//! Whole direction operations, files in and files out, as `pgate extract trait|random` and
//! `pgate directions ...` run them (and the Python package calls them): each returns a typed
//! result whose `summary` / `to_table` is what the command prints.
//!
//! Why here and not in the command: the side files of an extraction (activations, answers), the
//! provenance of a random control and the per-layer table are part of the operation; a caller
//! other than `pgate` should get the same files and numbers.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::capture::Position;
use super::extract::{extract_trait, TraitExtraction, TraitFlags, TraitOptions};
use super::gguf::{export_control_vector, ExportOptions, ExportSummary};
use super::random::{random_directions, RandomOptions};
use super::set::DirectionSet;
use super::traits::TraitSpec;
use crate::events::{Event, EventSink};
use crate::model::Model;
use crate::{Error, Result};

/// Where a trait extraction writes: the direction, and optionally the activations of both sides
/// (`PREFIX.pos.safetensors`, `PREFIX.neg.safetensors`) and the answers (JSONL).
#[derive(Debug, Clone, Default)]
pub struct TraitOutputs {
    pub direction: PathBuf,
    pub activations: Option<PathBuf>,
    pub responses: Option<PathBuf>,
}

/// The flags of `pgate extract trait` after the trait and the model: the direction file, the
/// extraction ([`TraitFlags`]) and the side files.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TraitFiles {
    /// Output direction file (.safetensors).
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub opts: TraitFlags,
    /// Also write the activations: PREFIX.pos.safetensors and PREFIX.neg.safetensors ([layers, n, d]).
    #[cfg_attr(feature = "cli", arg(long, value_name = "PREFIX"))]
    pub save_activations: Option<PathBuf>,
    /// Write the answers (JSONL: side, system, question, answer) here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub responses: Option<PathBuf>,
}

impl TraitFiles {
    /// Where [`extract_trait_files`] writes.
    pub fn outputs(&self) -> TraitOutputs {
        TraitOutputs {
            direction: self.out.clone(),
            activations: self.save_activations.clone(),
            responses: self.responses.clone(),
        }
    }
}

/// A finished trait extraction and what it wrote.
#[derive(Debug, Clone)]
pub struct TraitRun {
    pub extraction: TraitExtraction,
    pub model: String,
    pub position: Position,
    pub seconds: f64,
    pub direction: PathBuf,
}

impl TraitRun {
    /// The line saying what was written, then the per-layer table.
    pub fn summary(&self) -> String {
        let m = &self.extraction.set.meta;
        format!(
            "wrote {}: trait {}, {} on {}, position {}, {} + {} prompts, {:.1}s\n{}",
            self.direction.display(),
            m.name,
            m.method,
            self.model,
            self.position,
            m.n_pos,
            m.n_neg,
            self.seconds,
            self.extraction.set.layer_table()
        )
    }
}

/// Extract the persona vector of `spec` and write it with its side files. Announces the prompt
/// count as a note and reports progress by answer (or prompt) through `sink`.
pub fn extract_trait_files(
    model: &Model,
    spec: &TraitSpec,
    opts: &TraitOptions,
    outputs: &TraitOutputs,
    sink: &mut dyn EventSink,
) -> Result<TraitRun> {
    opts.capture.sampling.validate()?;
    let n_pairs = opts
        .max_pairs
        .unwrap_or(usize::MAX)
        .min(spec.instruction.len());
    let n_q = opts
        .max_questions
        .unwrap_or(usize::MAX)
        .min(spec.questions.len());
    let total = 2 * n_pairs * n_q;
    sink.event(Event::Note(format!(
        "trait {} ({}): {n_pairs} instruction pairs x {n_q} questions x 2 sides = {total} prompts, position {}",
        spec.name, spec.source, opts.position
    )));
    let unit = if opts.position == Position::Response {
        "answers"
    } else {
        "prompts"
    };
    sink.event(Event::Phase {
        name: "capture".into(),
        unit: unit.into(),
        total,
    });
    let t0 = std::time::Instant::now();
    let ex = extract_trait(model, spec, opts, |_, done, _| {
        sink.event(Event::Progress { done, total })
    })?;
    sink.event(Event::PhaseEnd {
        name: "capture".into(),
    });
    ex.set.save(&outputs.direction)?;
    if let Some(prefix) = &outputs.activations {
        ex.save_activations(prefix)?;
    }
    if let Some(path) = &outputs.responses {
        ex.write_responses(path)?;
    }
    Ok(TraitRun {
        model: model.info.name.clone(),
        position: opts.position,
        seconds: t0.elapsed().as_secs_f64(),
        direction: outputs.direction.clone(),
        extraction: ex,
    })
}

impl TraitExtraction {
    /// `PREFIX.pos.safetensors` and `PREFIX.neg.safetensors` (`[layers, n, d]`).
    pub fn save_activations(&self, prefix: &Path) -> Result<()> {
        let with = |suffix: &str| {
            let mut s = prefix.to_path_buf().into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        self.pos.save(&with(".pos.safetensors"))?;
        self.neg.save(&with(".neg.safetensors"))
    }

    /// The answers the direction was read from, one JSON line each: side, id, system, question,
    /// answer, tokens averaged. Nothing for positions that generate no answer.
    pub fn write_responses(&self, path: &Path) -> Result<()> {
        let io = |e| Error::io(path, e);
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        for (side, acts, prompts) in [
            ("pos", &self.pos, &self.pos_prompts),
            ("neg", &self.neg, &self.neg_prompts),
        ] {
            let Some(answers) = &acts.responses else {
                continue;
            };
            for ((p, ans), n) in prompts.iter().zip(answers).zip(&acts.counts) {
                let line = serde_json::json!({
                    "side": side, "id": p.id, "system": p.system, "question": p.user,
                    "answer": ans, "tokens_averaged": n,
                });
                writeln!(f, "{line}").map_err(io)?;
            }
        }
        f.flush().map_err(io)
    }
}

/// Where a random control comes from, and the file it goes to.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RandomJob {
    #[cfg_attr(feature = "cli", arg(long))]
    pub seed: u64,
    /// Match this direction's norm at every layer (unit vectors otherwise).
    #[cfg_attr(feature = "cli", arg(long))]
    pub like: Option<PathBuf>,
    /// Make every layer's vector orthogonal to this direction's vector at that layer.
    #[cfg_attr(feature = "cli", arg(long))]
    pub orthogonal_to: Option<PathBuf>,
    /// Output direction file (.safetensors).
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
}

/// A random control written to a file.
#[derive(Debug, Clone)]
pub struct RandomRun {
    pub set: DirectionSet,
    pub seed: u64,
    pub out: PathBuf,
    pub like: Option<String>,
    pub orthogonal_to: Option<String>,
}

impl RandomRun {
    pub fn summary(&self) -> String {
        let norms = self.set.norms();
        format!(
            "wrote {}: random-gaussian seed {}, {} layers x {}{}{}; norms {:.3}..{:.3}",
            self.out.display(),
            self.seed,
            self.set.n_layers(),
            self.set.d_model(),
            self.orthogonal_to
                .as_ref()
                .map(|o| format!(", orthogonal to {o}"))
                .unwrap_or_default(),
            self.like
                .as_ref()
                .map(|o| format!(", norm-matched to {o}"))
                .unwrap_or_default(),
            norms.iter().cloned().fold(f64::INFINITY, f64::min),
            norms.iter().cloned().fold(0.0, f64::max),
        )
    }
}

/// Read the reference files of `job` (before a model is loaded, so a bad path fails fast).
pub fn random_references(job: &RandomJob) -> Result<(Option<DirectionSet>, Option<DirectionSet>)> {
    let load = |p: &Option<PathBuf>| p.as_deref().map(DirectionSet::load).transpose();
    Ok((load(&job.like)?, load(&job.orthogonal_to)?))
}

/// A seeded random control for `model` (its shape and identity), written to `job.out`.
pub fn random_file(
    model: &Model,
    job: &RandomJob,
    references: &(Option<DirectionSet>, Option<DirectionSet>),
) -> Result<RandomRun> {
    let (like, orth) = references;
    let cfg = model.config();
    let mut set = random_directions(
        cfg.n_layers,
        cfg.d_model,
        &RandomOptions {
            seed: job.seed,
            orthogonal_to: orth.as_ref(),
            like: like.as_ref(),
        },
    )?;
    set.meta = set.meta.clone().with_model(model, false);
    set.save(&job.out)?;
    Ok(RandomRun {
        set,
        seed: job.seed,
        out: job.out.clone(),
        like: like.as_ref().map(|s| s.name().to_string()),
        orthogonal_to: orth.as_ref().map(|s| s.name().to_string()),
    })
}

/// A control vector written from a direction file.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub summary: ExportSummary,
    pub name: String,
    pub architecture: String,
}

impl GgufExport {
    /// Notes on layers left out (for stderr).
    pub fn notes(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.summary.skipped_layer0 {
            v.push(
                "note: layer 0 left out (llama.cpp control vectors start at the output of block 1)"
                    .into(),
            );
        }
        if !self.summary.skipped_zero.is_empty() {
            v.push(format!(
                "note: zero layers left out: {:?}",
                self.summary.skipped_zero
            ));
        }
        v
    }

    pub fn describe(&self, out: &Path, opts: &ExportOptions) -> String {
        let l = &self.summary.layers;
        format!(
            "wrote {}: control vector '{}' for {} ({} layers: {}..={}), coeff {}{}",
            out.display(),
            self.name,
            if self.architecture.is_empty() {
                "unknown"
            } else {
                &self.architecture
            },
            l.len(),
            l.first().copied().unwrap_or(0),
            l.last().copied().unwrap_or(0),
            opts.coeff,
            if opts.unit { ", unit vectors" } else { "" }
        )
    }
}

/// Write the direction file `input` as a llama.cpp control vector at `out`.
pub fn export_gguf_file(input: &Path, out: &Path, opts: &ExportOptions) -> Result<GgufExport> {
    let set = DirectionSet::load(input)?;
    let summary = export_control_vector(&set, out, opts)?;
    Ok(GgufExport {
        summary,
        name: set.name().to_string(),
        architecture: set.meta.architecture.clone(),
    })
}

impl DirectionSet {
    /// Per layer: the vector's norm and where the positive and negative means project on its unit
    /// vector (`-` when unknown).
    pub fn layer_table(&self) -> String {
        let pp = self.pos_mean.as_ref().map(|x| self.projections(x));
        let pn = self.neg_mean.as_ref().map(|x| self.projections(x));
        let f = |x: Option<&Vec<Option<f64>>>, l: usize| {
            x.and_then(|v| v[l])
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "-".into())
        };
        let mut out = format!(
            "{:>5} {:>10} {:>12} {:>12}\n",
            "layer", "|v|", "proj(pos)", "proj(neg)"
        );
        for (l, n) in self.norms().iter().enumerate() {
            out += &format!(
                "{l:>5} {n:>10.3} {:>12} {:>12}\n",
                f(pp.as_ref(), l),
                f(pn.as_ref(), l)
            );
        }
        out
    }

    /// Metadata, one `key  value` line each, then [`DirectionSet::layer_table`]
    /// (`pgate directions info`).
    pub fn describe(&self) -> String {
        let m = &self.meta;
        let mut lines = vec![
            ("name", m.name.clone()),
            ("shape", format!("{} layers x {}", m.n_layers, m.d_model)),
            ("model", format!("{} ({})", m.model, m.architecture)),
        ];
        if let Some(h) = &m.model_sha256 {
            lines.push(("model sha256", h.clone()));
        }
        lines.push(("method", m.method.clone()));
        lines.push(("position", m.position.clone()));
        lines.push(("prompts", format!("{} pos, {} neg", m.n_pos, m.n_neg)));
        if let Some(h) = &m.prompt_set_sha256 {
            lines.push(("prompt sha256", h.clone()));
        }
        if let Some(s) = m.seed {
            lines.push(("seed", s.to_string()));
        }
        lines.push((
            "created",
            format!("{} by pgate {}", m.created, m.tool_version),
        ));
        for (k, v) in &m.extra {
            lines.push(("extra", format!("{k} = {v}")));
        }
        let mut out: String = lines.iter().map(|(k, v)| format!("{k:<15}{v}\n")).collect();
        out += &self.layer_table();
        out
    }
}
