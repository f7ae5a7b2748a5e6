//! `pgate drift OLD NEW --from-report DIR -o OUT`: the direction verdicts of an earlier run
//! recomputed from its saved directions, without loading either model. The answers and labels
//! (the expensive part: every prompt under every mode on both versions) and the activation
//! projections are kept from that run's `drift.json`; the per-layer direction columns, the
//! coupling and persona-geometry verdicts are computed again, with today's measures and
//! thresholds. A report written before a field existed reads it as absent (serde defaults).

use std::path::{Path, PathBuf};

use super::compare::direction_drift;
use super::geometry::{direction_rows, LayerRow};
use super::measure::{read_direction_files, VersionMeasure};
use super::{DriftOptions, DriftReport};
use crate::model::ModelSource;
use crate::{Error, Result};

/// The schema this build reads and writes.
pub const SCHEMA: &str = "pgate-drift/1";

/// Read `dir/drift.json`, written by `pgate drift`.
pub fn read_report(dir: &Path) -> Result<DriftReport> {
    let p = dir.join("drift.json");
    if !p.is_file() {
        return Err(Error::InvalidValue(format!(
            "{} has no drift.json (--from-report takes the output folder of an earlier pgate drift run)",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let rep: DriftReport = serde_json::from_str(&text).map_err(|e| {
        Error::InvalidValue(format!("{}: not a pgate drift report ({e})", p.display()))
    })?;
    if rep.schema != SCHEMA {
        return Err(Error::InvalidValue(format!(
            "{}: schema {} (this build reads {SCHEMA})",
            p.display(),
            rep.schema
        )));
    }
    Ok(rep)
}

/// Whether the model `spec` names is the one a report recorded as `saved` (`gguf:/path` or
/// `hf-dir:/path`): the same text, or paths that resolve to the same file.
fn same_model(spec: &str, saved: &str) -> Result<bool> {
    let given = ModelSource::resolve(spec)?.describe();
    if given == saved {
        return Ok(true);
    }
    let path = |s: &str| s.split_once(':').map(|(_, p)| PathBuf::from(p));
    Ok(match (path(&given), path(saved)) {
        (Some(a), Some(b)) => matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        ),
        _ => false,
    })
}

/// Re-read one side's directions (from `--directions DIR/side/` when given and present, else the
/// files the report names, as `pgate drift` takes a side absent from `--directions` from
/// elsewhere) and put them on its measure.
fn reload_side(
    m: &mut VersionMeasure,
    side: &str,
    directions: Option<&Path>,
    report: &Path,
) -> Result<()> {
    let files = match directions.filter(|d| !d.is_dir() || d.join(side).exists()) {
        Some(d) => [
            d.join(side).join("refusal.safetensors"),
            d.join(side).join("persona.safetensors"),
        ],
        None => m.direction_files.clone(),
    };
    let what = format!("the {side} version of {}", report.display());
    let dirs = read_direction_files(files, (m.n_layers, m.d_model), &what)?;
    m.refusal_layer = dirs.refusal_layer;
    m.refusal_selection = dirs
        .refusal
        .meta
        .extra
        .get("selection")
        .cloned()
        .unwrap_or_default();
    m.direction_files = dirs.files.clone();
    m.directions = Some(dirs);
    Ok(())
}

/// The saved projection columns put on freshly computed direction rows (same layer count).
fn keep_projections(rows: &mut [LayerRow], saved: &[LayerRow], report: &Path) -> Result<()> {
    if rows.len() != saved.len() {
        return Err(Error::InvalidValue(format!(
            "{}: {} layer rows, the directions have {} layers",
            report.display(),
            saved.len(),
            rows.len()
        )));
    }
    for (r, s) in rows.iter_mut().zip(saved) {
        r.refusal_proj_old = s.refusal_proj_old;
        r.refusal_proj_new = s.refusal_proj_new;
        r.persona_proj_old = s.persona_proj_old;
        r.persona_proj_new = s.persona_proj_new;
    }
    Ok(())
}

/// The report in `dir` with its direction verdicts recomputed (see the module doc). `old` and
/// `new` must name the models it compared; the thresholds and `--directions` of `opts` apply.
pub fn regeometry(old: &str, new: &str, dir: &Path, opts: &DriftOptions) -> Result<DriftReport> {
    let mut rep = read_report(dir)?;
    for (side, spec, m) in [("old", old, &rep.old), ("new", new, &rep.new)] {
        if !same_model(spec, &m.source)? {
            return Err(Error::InvalidValue(format!(
                "{}/drift.json compared {} as the {side} version, not {spec}",
                dir.display(),
                m.source
            )));
        }
    }
    let directions = opts.directions.as_deref();
    reload_side(&mut rep.old, "old", directions, dir)?;
    reload_side(&mut rep.new, "new", directions, dir)?;
    let (Some(a), Some(b)) = (&rep.old.directions, &rep.new.directions) else {
        return Err(Error::InvalidValue(
            "internal: directions not reloaded".into(),
        ));
    };
    let mut rows = direction_rows(a, b)?;
    keep_projections(&mut rows, &rep.layers, dir)?;
    rep.options.geometry_threshold = opts.geometry_threshold;
    rep.options.persona_min_cos = opts.persona_min_cos;
    rep.options.from_report = Some(dir.to_path_buf());
    if opts.directions.is_some() {
        rep.options.directions = opts.directions.clone();
    }
    rep.directions = direction_drift(&rep.old, &rep.new, &rows, &rep.options);
    rep.layers = rows;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::super::compare::direction_drift;
    use super::super::geometry::tests::{measure, mix, old_version, version};
    use super::*;

    /// A report as the first `pgate drift` wrote it: none of the fields added since (persona
    /// split, coupling split, persona direction line, selection fallback, refusal_selection).
    fn first_schema_report(dir: &Path, models: [&Path; 2]) -> serde_json::Value {
        let save = |side: &str, v: &super::super::measure::VersionDirections| {
            let d = dir.join("directions").join(side);
            std::fs::create_dir_all(&d).unwrap();
            v.refusal.save(&d.join("refusal.safetensors")).unwrap();
            v.persona.save(&d.join("persona.safetensors")).unwrap();
            [d.join("refusal.safetensors"), d.join("persona.safetensors")]
        };
        // the new version: e0 projected out of every direction (orthogonalized-like)
        let new_v = version(
            (0..4).map(|l| mix(&[(4, 0.3 * l as f32 + 0.05)])).collect(),
            (0..4).map(|_| mix(&[(1, 0.85), (2, 0.04)])).collect(),
        );
        let (mut old_m, mut new_m) = (measure(old_version()), measure(new_v));
        old_m.direction_files = save("old", old_m.directions.as_ref().unwrap());
        new_m.direction_files = save("new", new_m.directions.as_ref().unwrap());
        old_m.source = ModelSource::Gguf(models[0].into()).describe();
        new_m.source = ModelSource::Gguf(models[1].into()).describe();
        let (a, b) = (old_m.directions.as_ref(), new_m.directions.as_ref());
        let mut rows = direction_rows(a.unwrap(), b.unwrap()).unwrap();
        rows.iter_mut().for_each(|r| r.refusal_proj_old = Some(7.0));
        let opts = DriftOptions::default();
        let rep = DriftReport {
            schema: SCHEMA.into(),
            directions: direction_drift(&old_m, &new_m, &rows, &opts),
            old: old_m,
            new: new_m,
            prompt_set: "synthetic".into(),
            labeler: "rules@2".into(),
            layers: rows,
            modes: vec![],
            options: opts,
        };
        let mut v = serde_json::to_value(&rep).unwrap();
        let drop = |v: &mut serde_json::Value, keys: &[&str]| {
            let o = v.as_object_mut().unwrap();
            keys.iter()
                .for_each(|k| assert!(o.remove(*k).is_some(), "{k}"));
        };
        drop(
            &mut v["directions"],
            &[
                "persona_off_refusal_min",
                "persona_off_refusal_below_from",
                "persona_drifted",
                "persona_stable_through",
                "persona_cos_min",
                "new_selection_fell_back",
            ],
        );
        drop(&mut v["options"], &["persona_min_cos", "from_report"]);
        drop(&mut v["old"], &["refusal_selection"]);
        drop(&mut v["new"], &["refusal_selection"]);
        for r in v["layers"].as_array_mut().unwrap() {
            drop(
                r,
                &["persona_off_refusal_cos", "persona_change_along_refusal"],
            );
        }
        v
    }

    #[test]
    fn a_first_schema_report_reads_and_its_geometry_is_recomputed() {
        let dir = std::env::temp_dir().join(format!("pgate-regeometry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let models = [dir.join("old.gguf"), dir.join("new.gguf")];
        models.iter().for_each(|m| std::fs::write(m, b"").unwrap());
        let json = first_schema_report(&dir, [&models[0], &models[1]]);
        std::fs::write(dir.join("drift.json"), json.to_string()).unwrap();

        let old_read = read_report(&dir).unwrap();
        assert!(!old_read.directions.persona_drifted);
        assert!(old_read.directions.persona_off_refusal_min.is_none());
        let lines = old_read.verdict_lines().join("\n");
        assert!(lines.contains("persona geometry: not measured"), "{lines}");

        let (o, n) = (models[0].to_str().unwrap(), models[1].to_str().unwrap());
        let rep = regeometry(o, n, &dir, &DriftOptions::default()).unwrap();
        let d = &rep.directions;
        assert!(d.geometry_drifted && !d.persona_drifted, "{d:?}");
        assert!(rep.layers.iter().all(|r| r.refusal_proj_old == Some(7.0)));
        assert_eq!(rep.options.from_report.as_deref(), Some(dir.as_path()));
        let lines = rep.verdict_lines().join("\n");
        assert!(lines.contains("persona geometry: no drift"), "{lines}");
        assert!(
            lines.contains("persona-refusal coupling: drifted"),
            "{lines}"
        );

        // --directions with only old/: the new side comes from the files the report names
        let only_old = dir.join("only-old");
        std::fs::create_dir_all(only_old.join("old")).unwrap();
        for f in ["refusal.safetensors", "persona.safetensors"] {
            std::fs::copy(
                dir.join("directions/old").join(f),
                only_old.join("old").join(f),
            )
            .unwrap();
        }
        let opts = DriftOptions {
            directions: Some(only_old.clone()),
            ..Default::default()
        };
        let again = regeometry(o, n, &dir, &opts).unwrap();
        assert_eq!(
            again.old.direction_files[0],
            only_old.join("old/refusal.safetensors")
        );
        assert_eq!(again.new.direction_files, rep.new.direction_files);
        assert_eq!(
            again.directions.persona_off_refusal_min,
            d.persona_off_refusal_min
        );

        // the models must be the ones the report compared
        let e = regeometry(n, o, &dir, &DriftOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("as the old version, not"), "{e}");
        let e = regeometry(o, n, &models[0], &DriftOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no drift.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
