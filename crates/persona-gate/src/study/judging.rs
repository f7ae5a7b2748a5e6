//! Grading stored results with a judge: rows without a successful verdict from that judge are
//! graded and each outcome (verdict or failure) is committed as it arrives. Re-running grades
//! what is still missing, failures included; result rows are never modified.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::store::Store;
use crate::eval::judge::{Judge, JudgeConfig, JudgeInput, JudgeKind};
use crate::eval::judge_http::HttpJudge;
use crate::eval::judge_local::LocalJudge;
use crate::Result;

/// The judge for a config; `None` for the rules judge (nothing to grade: rows carry their rule
/// label and rule-based leakage already).
pub fn make_judge(
    cfg: &JudgeConfig,
    device: crate::device::Device,
) -> Result<Option<Box<dyn Judge>>> {
    Ok(match cfg.kind {
        JudgeKind::Rules => None,
        JudgeKind::Http => Some(Box::new(HttpJudge::new(cfg)?)),
        JudgeKind::Local => Some(Box::new(LocalJudge::load(cfg, device)?)),
    })
}

#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct JudgeOptions {
    /// Grade every row again, also those with a verdict.
    #[cfg_attr(feature = "cli", arg(long = "redo"))]
    pub redo_all: bool,
    // Grade at most this many rows.
    #[cfg_attr(feature = "cli", arg(long))]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JudgeSummary {
    pub judge: String,
    /// Rows that needed grading.
    pub todo: usize,
    pub ok: usize,
    pub failed: usize,
    pub interrupted: bool,
}

#[derive(Debug, Clone)]
pub enum JudgeEvent {
    Planned { todo: usize },
    Done { ok: bool },
}

/// Grade the rows of a study that lack a successful verdict from `judge`.
pub fn judge_study(
    store: &Store,
    study_hash: &str,
    judge: &dyn Judge,
    cfg: &JudgeConfig,
    opts: &JudgeOptions,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(JudgeEvent),
) -> Result<JudgeSummary> {
    let mut todo = store.judge_todo(study_hash, judge.name(), &cfg.prompts, opts.redo_all)?;
    if let Some(n) = opts.limit {
        todo.truncate(n);
    }
    let mut s = JudgeSummary {
        judge: judge.name().to_string(),
        todo: todo.len(),
        ..Default::default()
    };
    on_event(JudgeEvent::Planned { todo: todo.len() });
    if todo.is_empty() {
        return Ok(s);
    }
    let inputs: Vec<JudgeInput> = todo
        .iter()
        .map(|t| JudgeInput {
            prompt: t.prompt.clone(),
            response: t.output.clone(),
        })
        .collect();
    let mode = judge.mode().name();
    judge.judge_all(&inputs, stop, &mut |i, outcome| {
        store.put_verdict(todo[i].result_id, judge.name(), mode, &outcome)?;
        let ok = outcome.verdict.is_some();
        if ok {
            s.ok += 1;
        } else {
            s.failed += 1;
        }
        on_event(JudgeEvent::Done { ok });
        Ok(())
    })?;
    s.interrupted = stop.load(Ordering::SeqCst) && s.ok + s.failed < s.todo;
    Ok(s)
}
