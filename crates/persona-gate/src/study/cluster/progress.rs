//! How far each shard of a submitted study is, read from the shard databases while tasks write
//! them (WAL mode: readers never block the writer).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::layout::{assign, ShardBy};
use crate::study::plan::Study;
use crate::study::store::Store;
use crate::Result;

/// One shard's progress.
#[derive(Debug, Clone, Serialize)]
pub struct ShardProgress {
    pub index: u64,
    pub db: PathBuf,
    /// Items the layout gives this shard.
    pub assigned: usize,
    /// Of those, stored in the shard's database.
    pub done: usize,
    /// Whether the shard's database exists (the task started).
    pub started: bool,
}

impl ShardProgress {
    pub fn finished(&self) -> bool {
        self.done >= self.assigned
    }
}

/// Every shard of a study split `count` ways by `by`, from the databases `db_of(i)`.
#[derive(Debug, Clone, Serialize)]
pub struct ShardsProgress {
    pub study: String,
    pub study_hash: String,
    pub by: ShardBy,
    pub shards: Vec<ShardProgress>,
}

impl ShardsProgress {
    pub fn done(&self) -> usize {
        self.shards.iter().map(|s| s.done).sum()
    }
    pub fn total(&self) -> usize {
        self.shards.iter().map(|s| s.assigned).sum()
    }
    /// Indices of shards with items left.
    pub fn unfinished(&self) -> Vec<u64> {
        self.shards
            .iter()
            .filter(|s| !s.finished())
            .map(|s| s.index)
            .collect()
    }
}

/// Read each shard database (missing ones count as not started).
pub fn shards_progress(
    study: &Study,
    by: ShardBy,
    count: u64,
    db_of: &dyn Fn(u64) -> PathBuf,
) -> Result<ShardsProgress> {
    let of = assign(study, by, count);
    let mut assigned = vec![0usize; count as usize];
    let mut shard_of_key: HashMap<(String, String, String, i64), u64> = HashMap::new();
    for it in study.items() {
        let s = of[&it.item_hash];
        assigned[s as usize] += 1;
        let set = &study.prompt_sets[it.set];
        shard_of_key.insert(
            (
                study.conditions[it.condition].hash.clone(),
                set.hash.clone(),
                set.items[it.prompt].id.clone(),
                it.sample as i64,
            ),
            s,
        );
    }
    let mut shards = Vec::new();
    for index in 0..count {
        let db = db_of(index);
        let (started, done) = if db.exists() {
            (true, done_in(&db, study, index, &shard_of_key)?)
        } else {
            (false, 0)
        };
        shards.push(ShardProgress {
            index,
            db,
            assigned: assigned[index as usize],
            done,
            started,
        });
    }
    Ok(ShardsProgress {
        study: study.name.clone(),
        study_hash: study.hash.clone(),
        by,
        shards,
    })
}

/// Stored items of shard `index` in `db` (a database that does not hold the study yet: none).
fn done_in(
    db: &Path,
    study: &Study,
    index: u64,
    shard_of_key: &HashMap<(String, String, String, i64), u64>,
) -> Result<usize> {
    let store = Store::open_read(db)?;
    if !store.studies()?.iter().any(|r| r.hash == study.hash) {
        return Ok(0);
    }
    Ok(store
        .done_keys(&study.hash)?
        .iter()
        .filter(|k| shard_of_key.get(*k) == Some(&index))
        .count())
}

impl fmt::Display for ShardsProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "study {} ({}): {} / {} items in {} shards (by {})",
            self.study,
            &self.study_hash[..12],
            self.done(),
            self.total(),
            self.shards.len(),
            self.by.name()
        )?;
        for s in &self.shards {
            let state = if s.finished() {
                "finished"
            } else if s.started {
                "running or stopped"
            } else {
                "not started"
            };
            writeln!(
                f,
                "  shard {:>3}  {:>6} / {:<6} {state}  {}",
                s.index,
                s.done,
                s.assigned,
                s.db.display()
            )?;
        }
        Ok(())
    }
}
