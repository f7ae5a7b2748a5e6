//! What one model version gives for a drift comparison: its refusal direction (Arditi et al.
//! selection) and persona direction (a trait vector), the mean last-token activations of harmful
//! and harmless prompts at every layer (for cross-projections), and the label of every answer
//! under every persona mode.
//!
//! Everything reuses the one-model operations: [`crate::refusal::extract_refusal`],
//! [`crate::directions::extract_trait`], [`crate::directions::capture_prompts`] and
//! [`crate::refusal::rates::label_rates`] (rules@2 labels).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DriftOptions;
use crate::directions::{
    capture_prompts, extract_trait, CaptureOptions, DirectionSet, Position, TraitOptions, TraitSpec,
};
use crate::eval::{Label, PromptSet};
use crate::events::{Event, EventSink};
use crate::generate::ChatPrompt;
use crate::model::Model;
use crate::refusal::rates::{label_rates, RateOptions};
use crate::refusal::{extract_refusal, RefusalJob, SelectOptions};
use crate::study::personas::{builtin_names, builtin_persona};
use crate::{Error, Result};

/// The mode with no persona (the template's default system prompt).
pub const BASELINE: &str = "baseline";

/// One version's directions: refusal (with the layer its selection chose) and persona.
#[derive(Debug, Clone)]
pub struct VersionDirections {
    pub refusal: DirectionSet,
    pub refusal_layer: usize,
    pub persona: DirectionSet,
    /// Where they were read from or written to.
    pub files: [PathBuf; 2],
    /// Extracted in this run (else read from files).
    pub extracted: bool,
}

/// What one version measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionMeasure {
    pub model: String,
    pub source: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub vocab_sha256: String,
    pub refusal_layer: usize,
    /// How the refusal direction was chosen (its `selection` metadata): the usual selection, or a
    /// fallback to the old version's layer when no candidate passed the filters, itself a sign
    /// that refusal changed. (Absent in the first reports: read as empty.)
    #[serde(default)]
    pub refusal_selection: String,
    pub direction_files: [PathBuf; 2],
    pub directions_extracted: bool,
    /// Mode -> (prompt id, label) in prompt order.
    pub labels: BTreeMap<String, Vec<(String, Label)>>,
    #[serde(skip)]
    pub directions: Option<VersionDirections>,
    /// Mean last-token activation of the harmful prompts, `[n_layers * d]`.
    #[serde(skip)]
    pub harmful_mean: Vec<f32>,
    #[serde(skip)]
    pub harmless_mean: Vec<f32>,
}

/// The system prompt of a mode: none for [`BASELINE`], else a built-in persona.
pub fn mode_system(mode: &str) -> Result<Option<String>> {
    if mode == BASELINE {
        return Ok(None);
    }
    builtin_persona(mode)
        .map(|s| Some(s.to_string()))
        .ok_or_else(|| {
            Error::InvalidValue(format!(
                "unknown persona mode '{mode}' (expected {BASELINE} or one of {})",
                builtin_names().join(", ")
            ))
        })
}

/// Read a version's directions from `dir` (`refusal.safetensors` with its `selected_layer`,
/// `persona.safetensors`), checked against the model's shape.
pub fn read_directions(dir: &Path, model: &Model) -> Result<VersionDirections> {
    let files = [
        dir.join("refusal.safetensors"),
        dir.join("persona.safetensors"),
    ];
    let cfg = model.config();
    read_direction_files(files, (cfg.n_layers, cfg.d_model), &model.info.name)
}

/// Read a version's `[refusal, persona]` direction files, checked against `shape` (layers,
/// width) of the model called `name`.
pub fn read_direction_files(
    files: [PathBuf; 2],
    shape: (usize, usize),
    name: &str,
) -> Result<VersionDirections> {
    for f in &files {
        if !f.is_file() {
            return Err(Error::InvalidValue(format!(
                "missing direction file {} (a --directions folder holds old/ and new/, each with refusal.safetensors and persona.safetensors)",
                f.display()
            )));
        }
    }
    let refusal = DirectionSet::load(&files[0])?;
    let persona = DirectionSet::load(&files[1])?;
    for (set, f) in [(&refusal, &files[0]), (&persona, &files[1])] {
        if (set.n_layers(), set.d_model()) != shape {
            return Err(Error::InvalidValue(format!(
                "{}: directions of {} layers x {} do not fit {name} ({} layers x {})",
                f.display(),
                set.n_layers(),
                set.d_model(),
                shape.0,
                shape.1
            )));
        }
    }
    let refusal_layer = refusal
        .meta
        .extra
        .get("selected_layer")
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(|| {
            Error::InvalidValue(format!(
                "{}: no selected_layer in the metadata (write it with `pgate extract refusal`)",
                files[0].display()
            ))
        })?;
    if refusal_layer >= shape.0 {
        return Err(Error::LayerOutOfRange {
            layer: refusal_layer,
            n_layers: shape.0,
        });
    }
    Ok(VersionDirections {
        refusal,
        refusal_layer,
        persona,
        files,
        extracted: false,
    })
}

/// Extract a version's refusal and persona directions and write them to `dir`. When no refusal
/// candidate passes the selection's filters and `fallback_layer` is given (the old version's
/// layer, for the new version), the candidate at that layer is taken and the failure noted.
pub fn extract_directions(
    dir: &Path,
    model: &Model,
    opts: &DriftOptions,
    fallback_layer: Option<usize>,
    sink: &mut dyn EventSink,
) -> Result<VersionDirections> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let job = RefusalJob {
        n_train: opts.n_train,
        n_val: opts.n_val,
        select: SelectOptions {
            layer_stride: opts.layer_stride.max(1),
            batch_size: opts.batch_size,
            kl_max: opts.kl_max,
            fallback_layer,
            ..Default::default()
        },
        ..Default::default()
    };
    sink.event(Event::Note(format!(
        "{}: refusal direction ({} train, {} validation prompts)",
        model.info.name, opts.n_train, opts.n_val
    )));
    let sel = extract_refusal(model, &job, sink)?;
    // Later steering of this model file warns against this direction (see [`super::warn`]).
    let cached = if opts.cache_refusal {
        super::warn::remember_refusal(model, &sel.direction)?
    } else {
        None
    };
    if let Some(p) = cached {
        sink.event(Event::Note(format!(
            "{}: refusal direction cached at {}",
            model.info.name,
            p.display()
        )));
    }
    let spec = TraitSpec::load(&opts.persona_trait)?;
    sink.event(Event::Note(format!(
        "{}: persona direction '{}' (last prompt token)",
        model.info.name, spec.name
    )));
    let topts = TraitOptions {
        position: Position::LAST,
        max_questions: Some(opts.trait_questions),
        capture: CaptureOptions {
            batch_size: opts.batch_size,
            ..Default::default()
        },
        ..Default::default()
    };
    let persona = extract_trait(model, &spec, &topts, |_, _, _| {})?.set;
    let files = [
        dir.join("refusal.safetensors"),
        dir.join("persona.safetensors"),
    ];
    sel.direction.save(&files[0])?;
    persona.save(&files[1])?;
    Ok(VersionDirections {
        refusal: sel.direction,
        refusal_layer: sel.layer,
        persona,
        files,
        extracted: true,
    })
}

/// Mean last-token activations of `texts` at every layer (`[n_layers * d]`).
fn mean_activations(model: &Model, texts: &[String], batch: usize) -> Result<Vec<f32>> {
    let prompts: Vec<ChatPrompt> = texts.iter().map(ChatPrompt::new).collect();
    let opts = CaptureOptions {
        batch_size: batch,
        ..Default::default()
    };
    capture_prompts(model, &prompts, &[Position::LAST], &opts, |_, _, _| {})?
        .pop()
        .ok_or_else(|| Error::InvalidValue("internal: no activations".into()))?
        .mean()
}

/// Labels of every prompt of `set` under `mode`, in prompt order (greedy answers, rules@2).
fn mode_labels(
    model: &Model,
    set: &PromptSet,
    mode: &str,
    opts: &DriftOptions,
    sink: &mut dyn EventSink,
) -> Result<Vec<(String, Label)>> {
    let ropts = RateOptions {
        system: mode_system(mode)?,
        max_tokens: opts.max_tokens,
        batch_size: opts.batch_size,
        plan: None,
        out: None,
    };
    let mut by_id: BTreeMap<String, Label> = BTreeMap::new();
    let mut collect = |e: Event| match e {
        Event::Row { key, outcome } => {
            if let Some(l) = Label::parse(&outcome) {
                by_id.insert(key, l);
            }
        }
        other => sink.event(other),
    };
    label_rates(model, set, &ropts, &mut collect)?;
    set.items
        .iter()
        .map(|i| {
            by_id
                .get(&i.id)
                .map(|l| (i.id.clone(), *l))
                .ok_or_else(|| Error::InvalidValue(format!("no label for prompt {}", i.id)))
        })
        .collect()
}

/// Measure one version: directions (read from `dirs_in`, else extracted into `dirs_out`),
/// activations for cross-projection, labels per mode.
#[allow(clippy::too_many_arguments)]
pub fn measure_version(
    model: &Model,
    dirs_in: Option<&Path>,
    dirs_out: &Path,
    fallback_layer: Option<usize>,
    set: &PromptSet,
    opts: &DriftOptions,
    sink: &mut dyn EventSink,
) -> Result<VersionMeasure> {
    let cfg = model.config();
    let dirs = match dirs_in {
        Some(d) => read_directions(d, model)?,
        None => extract_directions(dirs_out, model, opts, fallback_layer, sink)?,
    };
    sink.event(Event::Note(format!(
        "{}: activations of {} harmful and harmless prompts",
        model.info.name, opts.n_val
    )));
    let harmful = PromptSet::load(&opts.cross_harmful)?
        .take(opts.n_val)
        .texts();
    let harmless = PromptSet::load(&opts.cross_harmless)?
        .take(opts.n_val)
        .texts();
    let harmful_mean = mean_activations(model, &harmful, opts.batch_size)?;
    let harmless_mean = mean_activations(model, &harmless, opts.batch_size)?;
    let mut labels = BTreeMap::new();
    for mode in &opts.modes {
        sink.event(Event::Note(format!(
            "{}: answers of {} prompts under mode {mode}",
            model.info.name,
            set.items.len()
        )));
        labels.insert(mode.clone(), mode_labels(model, set, mode, opts, sink)?);
    }
    Ok(VersionMeasure {
        model: model.info.name.clone(),
        source: model.info.source.clone(),
        n_layers: cfg.n_layers,
        d_model: cfg.d_model,
        vocab_sha256: model.tokenizer.vocab_sha256(),
        refusal_layer: dirs.refusal_layer,
        refusal_selection: dirs
            .refusal
            .meta
            .extra
            .get("selection")
            .cloned()
            .unwrap_or_default(),
        direction_files: dirs.files.clone(),
        directions_extracted: dirs.extracted,
        labels,
        directions: Some(dirs),
        harmful_mean,
        harmless_mean,
    })
}
