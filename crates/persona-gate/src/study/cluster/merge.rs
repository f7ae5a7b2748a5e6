//! Merging the shard databases of one study, checked.
//!
//! Results are keyed, so copying rows is exact; what can go wrong is merging the wrong things. So
//! before anything is written every source is read and the merge is refused when one holds
//! another study (a different study hash: another model, other conditions, other prompts) or rows
//! labeled by another labeler than the rest (rates would mix labelers). Keys found in more than
//! one source are compared: identical rows (a task that ran twice) collapse to one, differing
//! rows (nondeterminism across machines, or a tampered file) are kept once (first source wins)
//! and listed. After the merge, the study's items without a result are listed, so a partial merge
//! says what it lacks instead of passing for a finished study.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::layout::ShardLayout;
use super::record::{record_key, ItemName, RecordBuilder, ShardRecord};
use crate::study::plan::Study;
use crate::study::store::Store;
use crate::{Error, Result};

/// The `meta` key under which a database records the shard layout of a study.
pub fn layout_key(study_hash: &str) -> String {
    format!("shard_layout/{study_hash}")
}

/// A key stored with different outputs or labels in two sources.
#[derive(Debug, Clone, Serialize)]
pub struct Differing {
    pub item: ItemName,
    /// The source whose row was kept, then the one that differs.
    pub kept: PathBuf,
    pub other: PathBuf,
}

/// What [`merge_shards`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ShardMerge {
    pub study: String,
    pub study_hash: String,
    /// Each source with the results it added.
    pub sources: Vec<(PathBuf, usize)>,
    /// The study's results in the merged database.
    pub results: usize,
    /// Work items of the study.
    pub items: usize,
    /// Keys stored identically in more than one source, kept once.
    pub collapsed: usize,
    pub differing: Vec<Differing>,
    /// Items of the study with no result in any source.
    pub missing: Vec<ItemName>,
    /// The layout the shards were run with, when they recorded one and agree on it.
    pub layout: Option<ShardLayout>,
    /// What the merged database now records about its shards (see [`super::record`]); boxed to
    /// keep [`MergeOutcome`]'s variants of similar size.
    pub record: Box<ShardRecord>,
}

impl ShardMerge {
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Output fields compared between duplicates.
type RowBody = (String, i64, String, String);

/// Merge the shard databases `from` of `study` (read from `source_path`, recorded with it) into
/// `db`, refusing sources of another study or labeler (nothing is written then).
pub fn merge_shards(
    db: &Path,
    study: &Study,
    source_path: Option<&Path>,
    from: &[PathBuf],
) -> Result<ShardMerge> {
    let mut labeler: Option<(String, PathBuf)> = None;
    let mut seen: BTreeMap<ItemName, (RowBody, PathBuf)> = BTreeMap::new();
    let mut collapsed = 0;
    let mut differing = Vec::new();
    let mut layouts: BTreeMap<String, ShardLayout> = BTreeMap::new();
    let mut builder = RecordBuilder::default();
    let mut earlier: Option<ShardRecord> = None;
    let mut sources: Vec<&Path> = Vec::new();
    let into_existing = db.exists();
    if into_existing {
        sources.push(db);
    }
    sources.extend(from.iter().map(PathBuf::as_path));
    for (i, src) in sources.into_iter().enumerate() {
        let store = Store::open_read(src)?;
        check_studies(&store, src, study)?;
        if let Some(text) = store.meta(&layout_key(&study.hash))? {
            let l: ShardLayout = serde_json::from_str(&text)?;
            layouts.insert(l.hash.clone(), l);
        }
        let rows = store.rows(&study.hash)?;
        if into_existing && i == 0 {
            earlier = read_record(&store, &study.hash)?;
        } else {
            builder.add_source(src, &rows);
        }
        for r in rows {
            match &labeler {
                None => labeler = Some((r.labeler.clone(), src.to_path_buf())),
                Some((l, first)) if *l != r.labeler => {
                    return Err(Error::InvalidValue(format!(
                        "{}: rows labeled by {}, but {} holds rows labeled by {l}: relabel one side first (`pgate study relabel --labeler ...`) so the rates do not mix labelers; nothing was merged",
                        src.display(),
                        r.labeler,
                        first.display()
                    )))
                }
                Some(_) => {}
            }
            let name = ItemName {
                condition: r.condition,
                prompt_set: r.prompt_set,
                prompt_id: r.prompt_id,
                sample: r.sample,
            };
            let body = (r.output, r.n_tokens, r.finish, r.label);
            match seen.get(&name) {
                None => {
                    seen.insert(name, (body, src.to_path_buf()));
                }
                Some((b, _)) if *b == body => collapsed += 1,
                Some((_, kept)) => differing.push(Differing {
                    item: name,
                    kept: kept.clone(),
                    other: src.to_path_buf(),
                }),
            }
        }
    }
    let mut store = Store::open(db)?;
    store.register(study, source_path)?;
    let mut added = Vec::new();
    for f in from {
        added.push((f.clone(), store.merge_from(f)?));
    }
    let layout = if layouts.len() == 1 {
        layouts.into_values().next()
    } else {
        None
    };
    if let Some(l) = &layout {
        store.put_meta(&layout_key(&study.hash), &serde_json::to_string(l)?)?;
    }
    let now = builder.finish(study, layout.as_ref());
    let record = match earlier {
        Some(e) => e.extended(now),
        None => now,
    };
    store.put_meta(&record_key(&study.hash), &serde_json::to_string(&record)?)?;
    let done = store.done_keys(&study.hash)?;
    let items = study.items();
    let mut missing = Vec::new();
    for it in &items {
        let c = &study.conditions[it.condition];
        let set = &study.prompt_sets[it.set];
        let id = &set.items[it.prompt].id;
        let key = (
            c.hash.clone(),
            set.hash.clone(),
            id.clone(),
            it.sample as i64,
        );
        if !done.contains(&key) {
            missing.push(ItemName {
                condition: c.name.clone(),
                prompt_set: set.name.clone(),
                prompt_id: id.clone(),
                sample: it.sample as i64,
            });
        }
    }
    Ok(ShardMerge {
        study: study.name.clone(),
        study_hash: study.hash.clone(),
        sources: added,
        results: items.len() - missing.len(),
        items: items.len(),
        collapsed,
        differing,
        missing,
        layout,
        record: Box::new(record),
    })
}

/// The shard record a database holds for `study_hash` (None: not a merged database, or one
/// merged before records were kept). A record of a newer form is refused rather than misread.
pub fn read_record(store: &Store, study_hash: &str) -> Result<Option<ShardRecord>> {
    let Some(text) = store.meta(&record_key(study_hash))? else {
        return Ok(None);
    };
    let r: ShardRecord = serde_json::from_str(&text).map_err(|e| {
        Error::InvalidValue(format!(
            "shard record of study {}: {e}",
            &study_hash[..12.min(study_hash.len())]
        ))
    })?;
    if r.version != super::record::SHARD_RECORD_VERSION {
        return Err(Error::InvalidValue(format!(
            "shard record version {} is not one this pgate reads ({})",
            r.version,
            super::record::SHARD_RECORD_VERSION
        )));
    }
    Ok(Some(r))
}

/// Refuse a source that holds a study other than `study`, naming what differs.
fn check_studies(store: &Store, src: &Path, study: &Study) -> Result<()> {
    let mut others = BTreeSet::new();
    for rec in store.studies()? {
        if rec.hash == study.hash {
            continue;
        }
        let model = rec
            .study_file()
            .map(|f| f.model.spec.clone())
            .unwrap_or_else(|_| "?".into());
        let why = if model != study.file.model.spec {
            format!("model {model}, not {}", study.file.model.spec)
        } else {
            "same model, other conditions, prompts or settings".into()
        };
        others.insert(format!(
            "'{}' ({}: {why})",
            rec.name,
            &rec.hash[..12.min(rec.hash.len())]
        ));
    }
    if others.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidValue(format!(
        "{} holds another study than '{}' ({}): {}; it is not a shard of this study, nothing was merged",
        src.display(),
        study.name,
        &study.hash[..12],
        others.into_iter().collect::<Vec<_>>().join(", ")
    )))
}

impl fmt::Display for ShardMerge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (p, n) in &self.sources {
            writeln!(f, "{}: {n} new results", p.display())?;
        }
        writeln!(
            f,
            "study {} ({}): {} of {} items{}",
            self.study,
            &self.study_hash[..12],
            self.results,
            self.items,
            if self.complete() { ", complete" } else { "" }
        )?;
        if let Some(l) = &self.layout {
            writeln!(
                f,
                "layout: {} shards by {} (layout {}), largest shard {:.3}x the mean",
                l.count,
                l.by.name(),
                &l.hash[..12],
                l.imbalance()
            )?;
        }
        if self.collapsed > 0 {
            writeln!(
                f,
                "{} duplicate results were identical and kept once",
                self.collapsed
            )?;
        }
        if !self.differing.is_empty() {
            writeln!(
                f,
                "{} results differ between sources (first kept):",
                self.differing.len()
            )?;
            for d in self.differing.iter().take(20) {
                writeln!(
                    f,
                    "  {}: {} vs {}",
                    d.item,
                    d.kept.display(),
                    d.other.display()
                )?;
            }
        }
        if !self.missing.is_empty() {
            writeln!(f, "{} items have no result yet:", self.missing.len())?;
            for m in self.missing.iter().take(20) {
                writeln!(f, "  {m}")?;
            }
            if self.missing.len() > 20 {
                writeln!(f, "  ... and {} more", self.missing.len() - 20)?;
            }
        }
        Ok(())
    }
}

/// What `pgate study merge` did: a checked merge of one study's shards, or (sources holding
/// several studies, e.g. a local and an endpoint study gathered for `study compare`) a plain
/// keyed merge.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MergeOutcome {
    Shards(Box<ShardMerge>),
    Plain(crate::study::ops::Merged),
}

/// The flags of `pgate study merge`.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct MergeFlags {
    #[cfg_attr(feature = "cli", arg(long, default_value = "results.sqlite"))]
    pub db: PathBuf,
    /// The study file the shards ran.
    #[cfg_attr(feature = "cli", arg(long))]
    pub study: Option<PathBuf>,
    #[cfg_attr(feature = "cli", arg(required = true))]
    pub from: Vec<PathBuf>,
}

impl MergeFlags {
    /// [`merge_op`] of the flags.
    pub fn run(&self) -> Result<MergeOutcome> {
        merge_op(&self.db, self.study.as_deref(), &self.from)
    }
}

impl MergeOutcome {
    /// What `pgate study merge` prints: the shard merge's report, or the results each source
    /// added and the total in `db`.
    pub fn to_text(&self, db: &Path) -> String {
        match self {
            MergeOutcome::Shards(m) => m.to_string(),
            MergeOutcome::Plain(m) => {
                let mut o = String::new();
                for (f, added) in &m.sources {
                    o += &format!("{}: {added} new results\n", f.display());
                }
                o + &format!("{}: {} results\n", db.display(), m.total)
            }
        }
    }

    /// Items of the study no shard holds (0 for a plain merge).
    pub fn missing(&self) -> usize {
        match self {
            MergeOutcome::Shards(m) => m.missing.len(),
            MergeOutcome::Plain(_) => 0,
        }
    }
}

/// Merge `from` into `db`. With `study` (the study file), or when the first source holds exactly
/// one study, every source must be a shard of that study ([`merge_shards`]); otherwise the
/// databases are merged as they are.
pub fn merge_op(db: &Path, study: Option<&Path>, from: &[PathBuf]) -> Result<MergeOutcome> {
    let Some(first) = from.first() else {
        return Err(Error::Empty("no shard databases to merge".into()));
    };
    let (study, source) = match study {
        Some(p) => (Study::load(p)?, Some(p.to_path_buf())),
        None => {
            let store = Store::open_read(first)?;
            let recs = store.studies()?;
            if recs.len() != 1 {
                return crate::study::ops::merge(db, from)
                    .map(MergeOutcome::Plain)
                    .map_err(|e| match e {
                        crate::study::ops::OpError::Lib(e) => e,
                        other => Error::InvalidValue(other.to_string()),
                    });
            }
            let rec = &recs[0];
            let source = rec.source_path.as_ref().map(PathBuf::from);
            (Study::resolve(rec.study_file()?)?, source)
        }
    };
    merge_shards(db, &study, source.as_deref(), from).map(|m| MergeOutcome::Shards(Box::new(m)))
}
