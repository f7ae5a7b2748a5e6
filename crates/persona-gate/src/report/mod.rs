//! Refusal receipts, reports and the deployment gate (issue 5).
//!
//! - [`receipt`]: one JSON receipt per condition of a study (what ran, what happened), bundled
//!   per study with the rows they were computed from ([`rows`]); schema `pgate-receipt/1`,
//!   documented field by field in `docs/receipt.md`.
//! - [`stats`]: every row-derived number of a receipt, in one place for writer and verifier;
//!   [`recompute`]: compare receipts with what their rows give; [`provenance`]: where each label
//!   came from (relabels and hand edits show).
//! - [`verify`] (with [`verify_files`]): check a receipt: signature, seals, every number
//!   recomputed from the rows, labels, the results database, model / study / prompt / direction
//!   files. Paths inside receipts are untrusted ([`untrusted`]).
//! - [`dsse`]: Ed25519 keys and signed bundles (DSSE envelope around an in-toto Statement).
//! - [`html`] with [`svg`]: the self-contained offline HTML report; [`markdown`]: the PR summary.
//! - [`gate`]: `pgate check`, the interval-based refusal-drop gate.
//! - [`ops`]: whole operations (write receipts, verify a path, sign a checked bundle, write the
//!   report) with the text each command prints.

pub mod dsse;
pub mod gate;
pub mod html;
pub mod markdown;
pub mod ops;
pub mod provenance;
pub mod receipt;
pub mod recompute;
pub mod records;
pub mod rows;
pub mod stats;
pub mod svg;
pub mod untrusted;
pub mod verify;
mod verify_ctx;
pub mod verify_files;
mod verify_shards;

use std::path::Path;
use std::sync::Arc;

use crate::directions::{random_directions, DirectionSet, RandomOptions};
use crate::study::file::DirectionEntry;
use crate::study::plan::Study;
use crate::Result;

pub use gate::{check, check_paths, Bound, GateFlags, GateOptions, GateReport, GateSources};
pub use html::{render_html, CosineMap, ReportInput};
pub use markdown::render_markdown;
pub use receipt::{
    build_receipts, load_receipts, write_receipts, Bundle, Receipt, ReceiptOptions, StudyReceipts,
};
pub use verify::{verify, VerifyOptions, VerifyReport};

/// Cosine of every direction of the study with its refusal direction, per layer. Files are read
/// from the study's folder; random directions are drawn again from their recipe at the model's
/// shape. `Err` carries the reason there is no map (shown in the report instead of the plot).
pub fn cosine_map(
    study: &Study,
    n_layers: usize,
    d_model: usize,
    refusal: Option<&str>,
) -> std::result::Result<CosineMap, String> {
    let f = &study.file;
    let ref_name = match refusal {
        Some(r) => r.to_string(),
        None => f
            .directions
            .keys()
            .find(|k| k.to_ascii_lowercase().contains("refusal"))
            .cloned()
            .ok_or("the study names no refusal direction (a direction whose name contains \"refusal\")")?,
    };
    let mut sets: std::collections::BTreeMap<String, Arc<DirectionSet>> = Default::default();
    let load = |p: &str| -> Result<DirectionSet> {
        let path = Path::new(p);
        let full = if path.is_relative() {
            f.base_dir.join(path)
        } else {
            path.to_path_buf()
        };
        DirectionSet::load(&full)
    };
    for (name, d) in &f.directions {
        if let DirectionEntry::Path(p) | DirectionEntry::File { file: p } = d {
            let s = load(p).map_err(|e| format!("direction '{name}': {e}"))?;
            sets.insert(name.clone(), Arc::new(s));
        }
    }
    for (name, d) in &f.directions {
        if let DirectionEntry::Random {
            random,
            orthogonal_to,
            like,
        } = d
        {
            let get = |r: &Option<String>| r.as_ref().and_then(|n| sets.get(n).cloned());
            let (o, l) = (get(orthogonal_to), get(like));
            let s = random_directions(
                n_layers,
                d_model,
                &RandomOptions {
                    seed: *random,
                    orthogonal_to: o.as_deref(),
                    like: l.as_deref(),
                },
            )
            .map_err(|e| format!("direction '{name}': {e}"))?;
            sets.insert(name.clone(), Arc::new(s));
        }
    }
    let r = sets.get(&ref_name).cloned().ok_or_else(|| {
        format!("the refusal direction '{ref_name}' is not a direction of the study")
    })?;
    let mut rows = Vec::new();
    for (name, s) in &sets {
        if name == &ref_name {
            continue;
        }
        let role = receipt::direction_role(name, f.directions.get(name), None, Some(&ref_name));
        let role = if role == "persona" && s.meta.method.starts_with("random") {
            "random".to_string()
        } else {
            role
        };
        let cos = s
            .cosines(&r)
            .map_err(|e| format!("direction '{name}' vs '{ref_name}': {e}"))?;
        rows.push((name.clone(), role, cos));
    }
    if rows.is_empty() {
        return Err(format!(
            "the study has no direction besides '{ref_name}' to compare with it"
        ));
    }
    Ok(CosineMap {
        refusal: ref_name,
        rows,
    })
}
