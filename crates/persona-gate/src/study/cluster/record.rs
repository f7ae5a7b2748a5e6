//! What a merge leaves in the merged database: how the study was split and what each shard
//! database brought.
//!
//! A merged database holds exactly the rows a single run stores (results are keyed), so nothing in
//! the rows says the study ran in pieces. An auditor reading a receipt still wants to know: how
//! many shards, split by which rule, which database held which shard and how many results, and
//! which results were found twice (a task that ran again) and kept once. [`ShardRecord`] is that
//! record, versioned serde data stored under [`record_key`] in the merged database's `meta` and
//! copied into every receipt written from it (the receipt's `shards` field); everything else in
//! the receipt is what a single run's receipt says.
//!
//! Sources are described by content, not by file bytes: `results_sha256` hashes each result's key,
//! output, token count, finish reason and label, sorted by key, leaving out timestamps and row ids,
//! so the same results hash alike on any machine and in any order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::layout::{assign, ShardLayout};
use crate::study::plan::Study;
use crate::study::store::RowView;

/// A result key, named for a person.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItemName {
    pub condition: String,
    pub prompt_set: String,
    pub prompt_id: String,
    pub sample: i64,
}

impl fmt::Display for ItemName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} / {} / {} #{}",
            self.condition, self.prompt_set, self.prompt_id, self.sample
        )
    }
}

/// Version of [`ShardRecord`]'s form. Bump on any change a reader must know about.
pub const SHARD_RECORD_VERSION: u32 = 1;

/// The `meta` key under which a merged database records how a study's shards were merged.
pub fn record_key(study_hash: &str) -> String {
    format!("shard_merge/{study_hash}")
}

/// One shard database merged into the study's database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSource {
    /// The database as given to the merge (`shards/shard-1.sqlite`).
    pub file: String,
    /// The layout's shards whose items it holds (normally one; empty without a layout). More than
    /// one means the database was not run as one shard of that layout.
    pub shards: Vec<u64>,
    /// Results of the study it held.
    pub results: usize,
    /// sha256 over its results (see the module doc): equal for equal results wherever they ran.
    pub results_sha256: String,
}

/// How a merged study was put together (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub version: u32,
    pub study_hash: String,
    /// The split the shards ran with: rule, shard count, per-shard items and expected tokens, and
    /// the hash of the item-to-shard assignment. Absent when the shard databases recorded none
    /// (run before layouts were recorded) or recorded different ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<ShardLayout>,
    /// Every shard database merged, in merge order (the merged database's own earlier rows are
    /// not a source).
    pub sources: Vec<ShardSource>,
    /// Results held identically by more than one source, kept once.
    pub collapsed: Vec<ItemName>,
    /// Results held by more than one source with different outputs or labels; the first source's
    /// row was kept.
    pub differing: Vec<ItemName>,
}

impl ShardRecord {
    /// The record of one condition: the same layout and sources, the duplicates of that condition
    /// only (what the condition's receipt carries).
    pub fn for_condition(&self, condition: &str) -> ShardRecord {
        let keep = |v: &[ItemName]| -> Vec<ItemName> {
            v.iter()
                .filter(|i| i.condition == condition)
                .cloned()
                .collect()
        };
        ShardRecord {
            collapsed: keep(&self.collapsed),
            differing: keep(&self.differing),
            ..self.clone()
        }
    }

    /// One line for a person: `2 shards by tokens (layout 1b063870e203), 2 databases merged`.
    /// Condition-independent, so a bundle's receipts print it once.
    pub fn summary(&self) -> String {
        let layout = match &self.layout {
            Some(l) => format!(
                "{} shards by {} (layout {})",
                l.count,
                l.by.name(),
                short(&l.hash)
            ),
            None => "shards of no recorded layout".into(),
        };
        let n = self.sources.len();
        format!(
            "{layout}, {n} database{} merged",
            if n == 1 { "" } else { "s" }
        )
    }

    /// This record with the sources and duplicates of a later merge into the same database added
    /// (a source merged again replaces its earlier entry; duplicates are kept once, sorted; the
    /// layout is the later merge's).
    pub fn extended(mut self, later: ShardRecord) -> ShardRecord {
        for s in later.sources {
            match self.sources.iter_mut().find(|x| x.file == s.file) {
                Some(x) => *x = s,
                None => self.sources.push(s),
            }
        }
        let union = |a: Vec<ItemName>, b: Vec<ItemName>| -> Vec<ItemName> {
            a.into_iter()
                .chain(b)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        self.collapsed = union(self.collapsed, later.collapsed);
        self.differing = union(self.differing, later.differing);
        // The merge computed the layout from every database, the merged one included.
        self.layout = later.layout;
        self
    }
}

fn short(s: &str) -> &str {
    &s[..12.min(s.len())]
}

/// What a result contributes to a source's hash and to the duplicate comparison.
type Body = (String, i64, String, String);

/// Builds a [`ShardRecord`] while a merge reads its sources.
#[derive(Default)]
pub(crate) struct RecordBuilder {
    sources: Vec<(ShardSource, Vec<String>)>,
    seen: BTreeMap<ItemName, Body>,
    collapsed: BTreeSet<ItemName>,
    differing: BTreeSet<ItemName>,
}

impl RecordBuilder {
    /// Note one shard database and its rows of the study.
    pub(crate) fn add_source(&mut self, path: &Path, rows: &[RowView]) {
        let mut lines = BTreeSet::new();
        for r in rows {
            let name = ItemName {
                condition: r.condition.clone(),
                prompt_set: r.prompt_set.clone(),
                prompt_id: r.prompt_id.clone(),
                sample: r.sample,
            };
            let body = (
                r.output.clone(),
                r.n_tokens,
                r.finish.clone(),
                r.label.clone(),
            );
            let line = format!(
                "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
                r.condition_hash,
                r.prompt_set_hash,
                r.prompt_id,
                r.sample,
                crate::hash::sha256_bytes(r.output.as_bytes()),
                r.n_tokens,
                r.finish,
                r.label
            );
            lines.insert(line);
            match self.seen.get(&name) {
                None => {
                    self.seen.insert(name, body);
                }
                Some(b) if *b == body => {
                    self.collapsed.insert(name);
                }
                Some(_) => {
                    self.differing.insert(name);
                }
            }
        }
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let source = ShardSource {
            file: path.display().to_string(),
            shards: Vec::new(),
            results: rows.len(),
            results_sha256: crate::hash::sha256_bytes(text.as_bytes()),
        };
        self.sources
            .push((source, rows.iter().map(|r| r.item_hash.clone()).collect()));
    }

    /// The record, each source's shards found from `layout`'s assignment of its items.
    pub(crate) fn finish(self, study: &Study, layout: Option<&ShardLayout>) -> ShardRecord {
        let of: Option<HashMap<String, u64>> = layout.map(|l| assign(study, l.by, l.count));
        let sources = self
            .sources
            .into_iter()
            .map(|(mut s, items)| {
                if let Some(of) = &of {
                    let set: BTreeSet<u64> =
                        items.iter().filter_map(|h| of.get(h).copied()).collect();
                    s.shards = set.into_iter().collect();
                }
                s
            })
            .collect();
        ShardRecord {
            version: SHARD_RECORD_VERSION,
            study_hash: study.hash.clone(),
            layout: layout.cloned(),
            sources,
            collapsed: self.collapsed.into_iter().collect(),
            differing: self.differing.into_iter().collect(),
        }
    }
}
