//! Labeling a database's stored outputs again with another labeler (rules v2, the probe, the
//! ensemble), picking the reader model the probe labelers need.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::{refused, OpResult};
use crate::device::Device;
use crate::events::{Event, EventSink};
use crate::label::ops::{make_labeler, LabelerChoice};
use crate::model::{DTypeMode, LoadOptions, Model};
use crate::study::relabel::{relabel_study, RelabelEvent, RelabelOptions, RelabelSummary};
use crate::study::store::StudyRecord;
use crate::study::{Store, StudyFile};

/// Which rows to label with what.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RelabelSpec {
    /// Study name or hash prefix (default: every study in the database).
    #[cfg_attr(feature = "cli", arg(long))]
    pub study: Option<String>,
    /// rules (v2), rules-v1, probe or ensemble.
    #[cfg_attr(feature = "cli", arg(long))]
    pub labeler: String,
    /// Reader model of the probe and ensemble labelers (default: the study's own model).
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: Option<String>,
    /// Probe file (default: the built-in probe for the reader model).
    #[cfg_attr(feature = "cli", arg(long))]
    pub probe: Option<PathBuf>,
    /// Rows labeled and committed together.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub batch_size: usize,
    /// Also label again the rows this labeler labeled already.
    #[cfg_attr(feature = "cli", arg(long))]
    pub redo: bool,
    /// Reader model numeric mode (f32, bf16, f16, q).
    #[cfg_attr(feature = "cli", arg(long, default_value = "q"))]
    pub dtype: String,
    // Where the reader model runs (the caller sets it from its device flags).
    #[cfg_attr(feature = "cli", arg(skip = Device::Cpu))]
    pub device: Device,
}

/// Label the stored outputs of the studies in `db` again. Events: a note naming the reader model
/// (when one loads), then the phase `relabel` in `rows`, one progress step per stored batch.
pub fn relabel(
    db: &Path,
    spec: &RelabelSpec,
    stop: &AtomicBool,
    sink: &mut dyn EventSink,
) -> OpResult<RelabelSummary> {
    if spec.labeler == "judge" {
        return refused("--labeler judge: study relabel takes rules, rules-v1, probe or ensemble (LLM judges grade stored rows with `pgate study judge`)".into());
    }
    if !db.exists() {
        return refused(format!(
            "{}: no results database here (run `pgate study run STUDY.toml --db {}` first)",
            db.display(),
            db.display()
        ));
    }
    let mut store = Store::open(db)?;
    let (recs, files) = targets(&store, spec.study.as_deref())?;
    let choice = LabelerChoice::parse(&spec.labeler, spec.probe.clone())?;
    let model = if choice.needs_model() {
        let reader = reader_spec(spec, &files)?;
        sink.event(Event::Note(format!("reader model {reader}")));
        let opts = LoadOptions {
            dtype: DTypeMode::parse(&spec.dtype)?,
            device: spec.device.clone(),
        };
        let mut m = Model::load(&reader, &opts)?;
        m.decoder.set_batch_invariant(false)?;
        Some(m)
    } else {
        None
    };
    // The wrong-language rule only when every study's prompts are English.
    let english = files.iter().all(|f| f.english);
    let mut labeler = make_labeler(&choice, model.as_ref(), 8, english)?;
    let opts = RelabelOptions {
        batch_size: spec.batch_size,
        redo: spec.redo,
        stop: Some(stop),
    };
    // --study: that study only; else every study of the database.
    let which = spec.study.as_ref().map(|_| recs[0].hash.clone());
    let summary = relabel_study(
        &mut store,
        which.as_deref(),
        labeler.as_mut(),
        &opts,
        &mut |ev| match ev {
            RelabelEvent::Planned {
                rows,
                todo,
                labeler,
            } => {
                sink.event(Event::Phase {
                    name: "relabel".into(),
                    unit: "rows".into(),
                    total: todo,
                });
                sink.event(Event::Note(format!(
                    "{rows} rows: {todo} to label with {labeler}, {} labeled by it already",
                    rows - todo
                )));
            }
            RelabelEvent::Stored { done, todo } => {
                sink.event(Event::Progress { done, total: todo })
            }
        },
    )?;
    sink.event(Event::PhaseEnd {
        name: "relabel".into(),
    });
    Ok(summary)
}

/// The stored studies to relabel (one by name or hash, or all) with their study files.
fn targets(store: &Store, which: Option<&str>) -> OpResult<(Vec<StudyRecord>, Vec<StudyFile>)> {
    let recs = match which {
        Some(w) => vec![store.find_study(Some(w))?],
        None => store.studies()?,
    };
    if recs.is_empty() {
        return refused(format!(
            "{}: no study has been run against this database",
            store.path().display()
        ));
    }
    let files = recs
        .iter()
        .map(StudyRecord::study_file)
        .collect::<crate::Result<Vec<_>>>()?;
    Ok((recs, files))
}

/// The reader model: the one given, else the one local model the studies ran (resolved like
/// [`crate::study::Study::model_spec`]). Endpoint studies have no local model to read with.
fn reader_spec(spec: &RelabelSpec, files: &[StudyFile]) -> OpResult<String> {
    if let Some(m) = &spec.model {
        return Ok(m.clone());
    }
    let mut specs: Vec<String> = Vec::new();
    for f in files {
        if f.model.endpoint().is_some() {
            return refused(format!("--labeler {} reads with a local model, and this is an endpoint study: give --model (e.g. --model q15)", spec.labeler));
        }
        let local = f.base_dir.join(&f.model.spec);
        let s = if Path::new(&f.model.spec).is_relative() && local.exists() {
            local.to_string_lossy().to_string()
        } else {
            f.model.spec.clone()
        };
        if !specs.contains(&s) {
            specs.push(s);
        }
    }
    match specs.as_slice() {
        [one] => Ok(one.clone()),
        _ => refused(format!(
            "the studies ran different models ({}): pick one with --study or give --model",
            specs.join(", ")
        )),
    }
}
