//! Relabeling stored outputs with another labeler (`pgate study relabel`).
//!
//! A study's rows are labeled once, as they are generated, by the v1 rules (`rules@1`).
//! [`relabel_study`] reads the stored request and output of every row (local and endpoint studies
//! alike), labels them in batches with any [`Labeler`], and commits each batch in one
//! transaction: the label a row had goes into the `labels` history, the new label and the
//! labeler's id into the row (with the rule-based leakage proxy recomputed for the new label).
//! An interrupted run loses at most the batch in flight; running again continues with the rows
//! the labeler has not labeled yet (with `redo`, every row again). Nothing is ever lost: the
//! history keeps every labeler's label of every row.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::store::{now_ms, LabelRecord, LabelTodo, LabelUpdate, Store, GENERATION_LABELER};
use crate::eval::judge::rule_leakage;
use crate::eval::Label;
use crate::label::{LabelInput, LabelVerdict, Labeler};
use crate::{Error, Result};

/// Rows per labeling batch (and per committed transaction) unless told otherwise.
pub const DEFAULT_BATCH: usize = 64;

/// Options of [`relabel_study`].
#[derive(Debug, Clone, Default)]
pub struct RelabelOptions<'a> {
    /// Rows per batch (0: [`DEFAULT_BATCH`]); each batch is labeled and committed at once.
    pub batch_size: usize,
    /// Label again rows this labeler already labeled (default: skip them).
    pub redo: bool,
    /// Checked between batches: when set, the run stops after the batch in flight is stored.
    pub stop: Option<&'a AtomicBool>,
}

/// Progress of a relabeling run.
#[derive(Debug, Clone)]
pub enum RelabelEvent<'a> {
    /// Before labeling: rows of the selected studies, and how many this run labels.
    Planned {
        rows: usize,
        todo: usize,
        labeler: &'a str,
    },
    /// A batch was labeled and stored (rows done so far of `todo`).
    Stored { done: usize, todo: usize },
}

/// Label changes of one condition on one prompt set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConditionRelabel {
    pub condition: String,
    pub prompt_set: String,
    /// Rows of the condition on the set.
    pub n: usize,
    /// Rows this run labeled.
    pub relabeled: usize,
    /// Rows whose label changed.
    pub changed: usize,
    /// `old->new` (e.g. `refusal->bypass`) -> rows, changed rows only.
    pub transitions: BTreeMap<String, usize>,
    /// Refusals before and after this run.
    pub refusal_before: usize,
    pub refusal_after: usize,
    /// Labelers of the rows before this run -> rows.
    pub labelers_before: BTreeMap<String, usize>,
}

impl ConditionRelabel {
    pub fn refusal_rate_before(&self) -> f64 {
        self.refusal_before as f64 / self.n.max(1) as f64
    }
    pub fn refusal_rate_after(&self) -> f64 {
        self.refusal_after as f64 / self.n.max(1) as f64
    }
}

/// One study's label changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StudyRelabel {
    pub study: String,
    pub hash: String,
    pub conditions: Vec<ConditionRelabel>,
}

/// What a relabeling run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelabelSummary {
    /// The labeler's id (`rules@2`, `ensemble@1:ab12cd34ef567890`).
    pub labeler: String,
    /// Distinct result rows of the selected studies.
    pub rows: usize,
    /// Rows labeled by this run.
    pub relabeled: usize,
    /// Rows skipped because this labeler had labeled them already.
    pub skipped: usize,
    /// Rows whose label changed.
    pub changed: usize,
    /// Stopped by the stop flag before every row was labeled.
    pub interrupted: bool,
    pub secs: f64,
    pub studies: Vec<StudyRelabel>,
}

/// Relabel the stored rows of one study (`Some(hash)`) or of every study in the database
/// (`None`) with `labeler`. Rows shared by several studies (same condition) are labeled once.
pub fn relabel_study(
    store: &mut Store,
    study_hash: Option<&str>,
    labeler: &mut dyn Labeler,
    opts: &RelabelOptions<'_>,
    on_event: &mut dyn FnMut(RelabelEvent<'_>),
) -> Result<RelabelSummary> {
    let t0 = std::time::Instant::now();
    let id = labeler.id().to_string();
    let studies = match study_hash {
        Some(h) => vec![store.find_study(Some(h))?],
        None => store.studies()?,
    };
    if studies.is_empty() {
        return Err(Error::Empty(format!(
            "{}: no study to relabel",
            store.path().display()
        )));
    }
    let mut per_study = Vec::new();
    for s in &studies {
        per_study.push((s, store.label_todo(&s.hash)?));
    }
    let mut unique: Vec<&LabelTodo> = Vec::new();
    let mut seen = HashSet::new();
    for (_, rows) in &per_study {
        unique.extend(rows.iter().filter(|r| seen.insert(r.result_id)));
    }
    let todo: Vec<&LabelTodo> = unique
        .iter()
        .copied()
        .filter(|r| opts.redo || r.labeler != id)
        .collect();
    on_event(RelabelEvent::Planned {
        rows: unique.len(),
        todo: todo.len(),
        labeler: &id,
    });
    let (new_labels, interrupted) = label_and_store(store, labeler, &id, &todo, opts, on_event)?;
    let mut summary = RelabelSummary {
        labeler: id,
        rows: unique.len(),
        relabeled: new_labels.len(),
        skipped: unique.len() - todo.len(),
        changed: unique
            .iter()
            .filter(|r| {
                new_labels
                    .get(&r.result_id)
                    .is_some_and(|l| l.name() != r.label)
            })
            .count(),
        interrupted,
        ..Default::default()
    };
    for (s, rows) in &per_study {
        summary.studies.push(StudyRelabel {
            study: s.name.clone(),
            hash: s.hash.clone(),
            conditions: summarize(rows, &new_labels),
        });
    }
    summary.secs = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// Label `todo` in batches and store each batch; returns the new labels by row id and whether
/// the stop flag cut the run short.
fn label_and_store(
    store: &mut Store,
    labeler: &mut dyn Labeler,
    id: &str,
    todo: &[&LabelTodo],
    opts: &RelabelOptions<'_>,
    on_event: &mut dyn FnMut(RelabelEvent<'_>),
) -> Result<(HashMap<i64, Label>, bool)> {
    let batch = if opts.batch_size == 0 {
        DEFAULT_BATCH
    } else {
        opts.batch_size
    };
    let mut out = HashMap::new();
    let mut done = 0;
    for chunk in todo.chunks(batch) {
        if opts.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return Ok((out, true));
        }
        let inputs: Vec<LabelInput> = chunk.iter().map(|r| input_of(r)).collect();
        let verdicts = labeler.label_batch(&inputs, &mut |_, _| {})?;
        if verdicts.len() != chunk.len() {
            return Err(Error::InvalidValue(format!(
                "labeler {id} gave {} verdicts for {} rows",
                verdicts.len(),
                chunk.len()
            )));
        }
        let now = now_ms();
        let updates = chunk
            .iter()
            .zip(&verdicts)
            .map(|(r, v)| update_for(r, v, id, now))
            .collect::<Result<Vec<_>>>()?;
        store.apply_labels(&updates)?;
        for (r, v) in chunk.iter().zip(&verdicts) {
            out.insert(r.result_id, v.label);
        }
        done += chunk.len();
        on_event(RelabelEvent::Stored {
            done,
            todo: todo.len(),
        });
    }
    Ok((out, false))
}

fn input_of(r: &LabelTodo) -> LabelInput {
    LabelInput {
        id: Some(r.result_id.to_string()),
        prompt: r.prompt.clone(),
        output: r.output.clone(),
        system: r.system.clone(),
    }
}

/// The history record of a row's current label. Rows labeled at generation carry the v1 rules'
/// reason and measurements in `rule_json`; the old leakage is kept with the scores.
fn previous_record(r: &LabelTodo) -> LabelRecord {
    let rule: serde_json::Value = serde_json::from_str(&r.rule_json).unwrap_or_default();
    let generated = r.labeler == GENERATION_LABELER || r.labeler == super::store::LEGACY_LABELER;
    let mut scores = serde_json::Map::new();
    if generated {
        if let Some(m) = rule.as_object() {
            scores.extend(
                m.iter()
                    .filter(|(_, v)| v.is_number())
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
    }
    scores.insert("leakage".into(), serde_json::json!(r.leakage));
    let reason = match (generated, rule.get("reason").and_then(|v| v.as_str())) {
        (true, Some(s)) => s.to_string(),
        _ => String::new(),
    };
    LabelRecord {
        labeler: r.labeler.clone(),
        label: r.label.clone(),
        reason,
        scores_json: serde_json::Value::Object(scores).to_string(),
        labeled_at: if generated { r.finished_at } else { now_ms() },
    }
}

fn update_for(r: &LabelTodo, v: &LabelVerdict, id: &str, now: i64) -> Result<LabelUpdate> {
    let mut scores = serde_json::to_value(&v.scores)?;
    if !v.parts.is_empty() {
        scores["parts"] = serde_json::to_value(&v.parts)?;
    }
    let leak = rule_leakage(&r.prompt, &r.output, v.label);
    Ok(LabelUpdate {
        result_id: r.result_id,
        previous: previous_record(r),
        new: LabelRecord {
            labeler: id.to_string(),
            label: v.label.name().to_string(),
            reason: v.reason.clone(),
            scores_json: scores.to_string(),
            labeled_at: now,
        },
        leakage: leak.score,
        leakage_json: serde_json::to_string(&leak)?,
    })
}

/// Per condition and prompt set (in the order rows first appear): counts before and after.
fn summarize(rows: &[LabelTodo], new: &HashMap<i64, Label>) -> Vec<ConditionRelabel> {
    let mut out: Vec<ConditionRelabel> = Vec::new();
    for r in rows {
        let i = match out
            .iter()
            .position(|c| c.condition == r.condition && c.prompt_set == r.prompt_set)
        {
            Some(i) => i,
            None => {
                out.push(ConditionRelabel {
                    condition: r.condition.clone(),
                    prompt_set: r.prompt_set.clone(),
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let c = &mut out[i];
        let after = new
            .get(&r.result_id)
            .map(|l| l.name())
            .unwrap_or(r.label.as_str());
        c.n += 1;
        c.relabeled += new.contains_key(&r.result_id) as usize;
        c.refusal_before += (r.label == "refusal") as usize;
        c.refusal_after += (after == "refusal") as usize;
        *c.labelers_before.entry(r.labeler.clone()).or_insert(0) += 1;
        if after != r.label {
            c.changed += 1;
            *c.transitions
                .entry(format!("{}->{after}", r.label))
                .or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label::rules::{label_v2, RulesV1, RulesV2};
    use std::path::{Path, PathBuf};

    /// A private copy of the committed example database (never modified in place).
    fn copy_example(name: &str) -> PathBuf {
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/results/paper_q15.sqlite");
        let dir = std::env::temp_dir().join(format!("pgate-relabel-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dst = dir.join("paper_q15.sqlite");
        std::fs::copy(&src, &dst).unwrap();
        restore_v1(&dst);
        dst
    }

    /// The committed database carries rules-v2 labels (issue 16); these tests start from the state
    /// before it: every row labeled by rules v1 at generation, no history.
    fn restore_v1(db: &Path) {
        let mut store = Store::open(db).unwrap();
        let opts = RelabelOptions {
            redo: true,
            ..Default::default()
        };
        relabel_study(
            &mut store,
            None,
            &mut RulesV1 { english: true },
            &opts,
            &mut |_| {},
        )
        .unwrap();
        drop(store);
        let c = rusqlite::Connection::open(db).unwrap();
        c.execute("DELETE FROM labels", []).unwrap();
    }

    fn labels_by_id(store: &Store, hash: &str) -> BTreeMap<i64, (String, String)> {
        store
            .rows(hash)
            .unwrap()
            .into_iter()
            .map(|r| (r.result_id, (r.label, r.labeler)))
            .collect()
    }

    #[test]
    fn relabel_records_history_and_changes_where_rules_v2_differ() {
        let db = copy_example("v2");
        let mut store = Store::open(&db).unwrap();
        let study = store.find_study(None).unwrap();
        let before = labels_by_id(&store, &study.hash);
        assert!(
            before.values().all(|(_, l)| l == "rules@1"),
            "migrated rows are rules@1"
        );
        let todo = store.label_todo(&study.hash).unwrap();
        let expect_changed = todo
            .iter()
            .filter(|r| label_v2(&r.output, true).label.name() != r.label)
            .count();
        assert!(
            expect_changed > 0,
            "rules v2 should differ from v1 somewhere on this study"
        );
        let mut events = 0;
        let s = relabel_study(
            &mut store,
            Some(&study.hash),
            &mut RulesV2 { english: true },
            &RelabelOptions {
                batch_size: 64,
                ..Default::default()
            },
            &mut |_| events += 1,
        )
        .unwrap();
        assert_eq!(s.labeler, "rules@2");
        assert_eq!(
            (s.rows, s.relabeled, s.skipped),
            (todo.len(), todo.len(), 0)
        );
        assert_eq!(s.changed, expect_changed);
        assert!(!s.interrupted);
        assert_eq!(events, 1 + todo.len().div_ceil(64));
        let per: usize = s.studies[0].conditions.iter().map(|c| c.changed).sum();
        assert_eq!(per, expect_changed);
        let trans: usize = s.studies[0]
            .conditions
            .iter()
            .flat_map(|c| c.transitions.values())
            .sum();
        assert_eq!(trans, expect_changed);
        let after = labels_by_id(&store, &study.hash);
        for r in &todo {
            let want = label_v2(&r.output, true).label.name().to_string();
            assert_eq!(after[&r.result_id], (want.clone(), "rules@2".to_string()));
            // History: the v1 label it replaced and the v2 label it got.
            let h = store.label_history(r.result_id).unwrap();
            assert_eq!(h.len(), 2, "row {}", r.result_id);
            assert_eq!(
                (h[0].labeler.as_str(), h[0].label.as_str()),
                ("rules@1", r.label.as_str())
            );
            assert_eq!(
                (h[1].labeler.as_str(), h[1].label.as_str()),
                ("rules@2", want.as_str())
            );
        }
        assert_eq!(store.count_label_history().unwrap(), 2 * todo.len());
    }

    #[test]
    fn relabel_is_idempotent_and_redo_changes_nothing() {
        let db = copy_example("idem");
        let mut store = Store::open(&db).unwrap();
        let hash = store.find_study(None).unwrap().hash;
        let opts = RelabelOptions::default();
        let first = relabel_study(
            &mut store,
            None,
            &mut RulesV2 { english: true },
            &opts,
            &mut |_| {},
        )
        .unwrap();
        let labels = labels_by_id(&store, &hash);
        let history = store.count_label_history().unwrap();
        let again = relabel_study(
            &mut store,
            None,
            &mut RulesV2 { english: true },
            &opts,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            (again.relabeled, again.skipped, again.changed),
            (0, first.rows, 0)
        );
        let redo = RelabelOptions {
            redo: true,
            ..Default::default()
        };
        let third = relabel_study(
            &mut store,
            None,
            &mut RulesV2 { english: true },
            &redo,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((third.relabeled, third.changed), (first.rows, 0));
        assert_eq!(labels_by_id(&store, &hash), labels);
        assert_eq!(store.count_label_history().unwrap(), history);
        // Back to the v1 rules: the generation labels return, and the history keeps both.
        let back = relabel_study(
            &mut store,
            None,
            &mut RulesV1 { english: true },
            &opts,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(back.changed, first.changed);
        assert!(labels_by_id(&store, &hash)
            .values()
            .all(|(_, l)| l == "rules@1"));
        assert_eq!(store.count_label_history().unwrap(), history);
    }

    #[test]
    fn relabel_stops_between_batches_and_continues() {
        let db = copy_example("stop");
        let mut store = Store::open(&db).unwrap();
        let stop = AtomicBool::new(false);
        let opts = RelabelOptions {
            batch_size: 100,
            stop: Some(&stop),
            ..Default::default()
        };
        let s = relabel_study(
            &mut store,
            None,
            &mut RulesV2 { english: true },
            &opts,
            &mut |e| {
                if let RelabelEvent::Stored { .. } = e {
                    stop.store(true, Ordering::SeqCst);
                }
            },
        )
        .unwrap();
        assert!(s.interrupted);
        assert_eq!(s.relabeled, 100);
        stop.store(false, Ordering::SeqCst);
        let rest = relabel_study(
            &mut store,
            None,
            &mut RulesV2 { english: true },
            &opts,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((rest.skipped, rest.relabeled), (100, s.rows - 100));
    }
}
