//! Grading a study's stored rows with its model judges (HTTP or local; the rules judge has nothing
//! to grade): after a run, and on its own (`pgate study judge`) to retry failures, add a judge or
//! grade again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use super::{refused, OpResult};
use crate::device::Device;
use crate::eval::judge::{JudgeConfig, JudgeKind};
use crate::events::{Event, EventSink};
use crate::study::judging::{judge_study, make_judge, JudgeEvent, JudgeOptions, JudgeSummary};
use crate::study::{Store, StudyFile};
use crate::Result;

/// What to grade with which judges.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct JudgeSpec {
    /// Study name or hash prefix (default: the most recently run).
    #[cfg_attr(feature = "cli", arg(long))]
    pub study: Option<String>,
    /// Take the judges from this study file instead of the stored one (e.g. to add a judge).
    #[cfg_attr(feature = "cli", arg(long))]
    pub file: Option<PathBuf>,
    /// Only this judge (by name).
    #[cfg_attr(feature = "cli", arg(long))]
    pub judge: Option<String>,
    // Limit and redo, as for every judge.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub options: JudgeOptions,
    // Where local judges run (the caller sets it from its device flags).
    #[cfg_attr(feature = "cli", arg(skip = Device::Cpu))]
    pub device: Device,
}

/// What [`judge`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JudgeRun {
    /// One summary per judge that ran, in the study file's order.
    pub judges: Vec<JudgeSummary>,
    /// Stopped by the stop flag; the verdicts stored so far are kept.
    pub interrupted: bool,
}

/// Grade the rows of a study in `db` that lack a successful verdict from each of its model judges
/// (every row with `options.redo_all`).
pub fn judge(
    db: &Path,
    spec: &JudgeSpec,
    stop: &AtomicBool,
    sink: &mut dyn EventSink,
) -> OpResult<JudgeRun> {
    let store = Store::open(db)?;
    let rec = store.find_study(spec.study.as_deref())?;
    let file = match &spec.file {
        Some(p) => StudyFile::load(p)?,
        None => rec.study_file()?,
    };
    let judges: Vec<&JudgeConfig> = file
        .judges
        .iter()
        .filter(|j| spec.judge.as_ref().is_none_or(|n| &j.display_name() == n))
        .filter(|j| j.kind != JudgeKind::Rules)
        .collect();
    if judges.is_empty() {
        return refused(format!(
            "no model judge to run{} (study {} has: {}); add a [[judge]] with kind = \"http\" or \"local\" and pass --file",
            spec.judge.as_deref().map(|n| format!(" named '{n}'")).unwrap_or_default(),
            rec.name,
            if file.judges.is_empty() {
                "none".to_string()
            } else {
                file.judges.iter().map(|j| j.display_name()).collect::<Vec<_>>().join(", ")
            }
        ));
    }
    let mut out = JudgeRun::default();
    for cfg in judges {
        let s = judge_phase(
            &store,
            &rec.hash,
            cfg,
            &spec.device,
            &spec.options,
            stop,
            sink,
        )?;
        out.judges.extend(s);
        if stop.load(Ordering::SeqCst) {
            out.interrupted = true;
            break;
        }
    }
    Ok(out)
}

/// Grade a study's rows with the judge of `cfg` as one phase of events (`judge`, in units of
/// `judged` rows). None for the rules judge, which has nothing to grade.
pub(crate) fn judge_phase(
    store: &Store,
    study_hash: &str,
    cfg: &JudgeConfig,
    device: &Device,
    opts: &JudgeOptions,
    stop: &AtomicBool,
    sink: &mut dyn EventSink,
) -> Result<Option<JudgeSummary>> {
    let Some(j) = make_judge(cfg, device.clone())? else {
        return Ok(None);
    };
    let (name, mode) = (j.name().to_string(), j.mode().name());
    let (mut done, mut total) = (0, 0);
    let s = judge_study(
        store,
        study_hash,
        j.as_ref(),
        cfg,
        opts,
        stop,
        &mut |ev| match ev {
            JudgeEvent::Planned { todo } => {
                total = todo;
                sink.event(Event::Phase {
                    name: "judge".into(),
                    unit: "judged".into(),
                    total: todo,
                });
                sink.event(Event::Note(format!(
                    "judge '{name}' ({mode}): {todo} rows to grade"
                )));
            }
            JudgeEvent::Done { ok } => {
                done += 1;
                sink.event(Event::Row {
                    key: name.clone(),
                    outcome: if ok { "ok" } else { "failed" }.into(),
                });
                sink.event(Event::Progress { done, total });
            }
        },
    )?;
    sink.event(Event::PhaseEnd {
        name: "judge".into(),
    });
    sink.event(Event::Note(format!(
        "judge '{}': {} graded, {} failed (failures are stored per row; `pgate study judge` retries them)",
        s.judge, s.ok, s.failed
    )));
    Ok(Some(s))
}
