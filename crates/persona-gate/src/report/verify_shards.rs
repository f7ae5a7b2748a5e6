//! The shard check of `verify`: a receipt's `shards` (how a merged study was put together)
//! against the record its results database holds. Sealing already stops an edited receipt; this
//! catches a receipt that claims a merge the database does not record, or hides one it does.

use std::path::{Path, PathBuf};

use super::receipt::Receipt;
use super::verify_ctx::{short, Ctx, DbState};
use crate::study::canon::hash_json;
use crate::study::cluster::merge::read_record;
use crate::study::cluster::record::ShardRecord;
use crate::study::Store;

/// `2 shards by tokens (layout 1b063870e203), 2 databases merged (record 5e2c...)`, or `none`.
fn describe(s: Option<&ShardRecord>) -> String {
    match s.map(|s| (s, serde_json::to_value(s))) {
        None => "none".into(),
        Some((s, Ok(v))) => format!("{} (record {})", s.summary(), short(&hash_json(&v))),
        Some((s, Err(e))) => format!("{} (not serializable: {e})", s.summary()),
    }
}

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

/// Each receipt's shard record against the database's, narrowed to the receipt's condition.
/// Nothing is checked when neither records a merge (a single run).
pub(crate) fn shard_checks(cx: &mut Ctx, group: &[&(PathBuf, Receipt)], db: &DbState) {
    let Ok(rec) = &db.record else { return };
    let found = Store::open_read(&db.path)
        .and_then(|s| read_record(&s, &rec.hash))
        .map_err(|e| e.to_string());
    for (p, r) in group {
        if r.shards.is_none() && matches!(found, Ok(None)) {
            continue;
        }
        let got = found.as_ref().map_err(Clone::clone).map(|f| {
            let narrowed = f.as_ref().map(|f| f.for_condition(&r.condition.name));
            describe(narrowed.as_ref())
        });
        cx.push(
            &file_label(p),
            format!(
                "condition '{}': shard layout and merge recorded in the database",
                r.condition.name
            ),
            &describe(r.shards.as_ref()),
            got,
        );
    }
}
