//! Persona geometry across versions, split into what a drift user asks apart: did the persona
//! itself change, or only its coupling to refusal?
//!
//! A version whose refusal direction is removed from the weights (orthogonalization) loses the
//! refusal component of every direction it carries, persona included, so cos(persona, refusal)
//! moves even if nothing else about the persona does. Per layer, each version's persona direction
//! is therefore split into its part inside a refusal reference and the rest:
//!
//! - the reference is the span of **both** versions' refusal directions at that layer (Gram-Schmidt;
//!   one vector when they are parallel). Both, so that `drift OLD NEW` and `drift NEW OLD` agree,
//!   and because when one version's refusal direction is the other's with a component removed,
//!   that removed component lies in their span;
//! - **persona off refusal**: cos of the two versions' persona directions with the reference
//!   removed, the persona geometry verdict (the persona itself);
//! - **coupling**: cos(persona, refusal) within each version, reported on its own line (the
//!   change of it is what the persona geometry verdict measured before the split);
//! - **change along refusal**: the share of the unit persona change `|p̂_new - p̂_old|²` that lies
//!   in the reference (0 for a change that avoids refusal, 1 for one made only of refusal).

use serde::{Deserialize, Serialize};

use super::measure::VersionDirections;
use crate::directions::cosine;
use crate::Result;

/// Orthonormal basis (f64) of the span of `vs`; a vector whose part outside the basis so far is
/// under `1e-6` of its norm adds nothing (parallel or zero).
fn span_basis(vs: &[&[f32]]) -> Vec<Vec<f64>> {
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for v in vs {
        let v: Vec<f64> = v.iter().map(|x| *x as f64).collect();
        let n0 = norm(&v);
        let w = remove(&v, &basis);
        let n = norm(&w);
        if n0 > 0.0 && n > 1e-6 * n0 {
            basis.push(w.iter().map(|x| x / n).collect());
        }
    }
    basis
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `v` with its components along the orthonormal `basis` removed.
fn remove(v: &[f64], basis: &[Vec<f64>]) -> Vec<f64> {
    let mut w = v.to_vec();
    for e in basis {
        let c = dot(&w, e);
        w.iter_mut().zip(e).for_each(|(x, y)| *x -= c * y);
    }
    w
}

fn unit(v: &[f32]) -> Option<Vec<f64>> {
    let v: Vec<f64> = v.iter().map(|x| *x as f64).collect();
    let n = norm(&v);
    (n > 0.0).then(|| v.iter().map(|x| x / n).collect())
}

fn cos64(a: &[f64], b: &[f64]) -> Option<f64> {
    let d = norm(a) * norm(b);
    (d > 1e-12).then(|| (dot(a, b) / d).clamp(-1.0, 1.0))
}

/// One layer's persona split against the refusal reference (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PersonaSplit {
    /// cos(persona_old, persona_new) with the refusal reference removed from both; None when a
    /// persona direction lies (numerically) inside the reference.
    pub off_refusal_cos: Option<f64>,
    /// Share of `|p̂_new - p̂_old|²` inside the reference; None when the unit directions are equal.
    pub change_along_refusal: Option<f64>,
}

/// Split one layer's persona directions against the span of both refusal directions.
pub fn split_persona(p_old: &[f32], p_new: &[f32], r_old: &[f32], r_new: &[f32]) -> PersonaSplit {
    let basis = span_basis(&[r_old, r_new]);
    let (Some(a), Some(b)) = (unit(p_old), unit(p_new)) else {
        return PersonaSplit {
            off_refusal_cos: None,
            change_along_refusal: None,
        };
    };
    let off_refusal_cos = cos64(&remove(&a, &basis), &remove(&b, &basis));
    let delta: Vec<f64> = b.iter().zip(&a).map(|(x, y)| x - y).collect();
    let total = dot(&delta, &delta);
    let along: f64 = basis.iter().map(|e| dot(&delta, e).powi(2)).sum();
    PersonaSplit {
        off_refusal_cos,
        change_along_refusal: (total > 1e-12).then(|| (along / total).clamp(0.0, 1.0)),
    }
}

/// One layer of the direction comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRow {
    pub layer: usize,
    /// cos(refusal_old[l], refusal_new[l]).
    pub refusal_cos: Option<f64>,
    /// cos(persona_old[l], persona_new[l]).
    pub persona_cos: Option<f64>,
    /// cos(persona, refusal) within each version: the persona-refusal coupling.
    pub geometry_old: Option<f64>,
    pub geometry_new: Option<f64>,
    /// cos(persona_old, persona_new) with the span of both refusal directions removed from both
    /// (see this module): the persona itself. Absent in reports written before it existed.
    #[serde(default)]
    pub persona_off_refusal_cos: Option<f64>,
    /// Share of the unit persona change that lies in the span of both refusal directions.
    #[serde(default)]
    pub persona_change_along_refusal: Option<f64>,
    /// Mean harmful last-token activation projected on the old version's unit refusal direction
    /// at this layer: old activations, new activations.
    pub refusal_proj_old: Option<f64>,
    pub refusal_proj_new: Option<f64>,
    /// The same on the old version's unit persona direction.
    pub persona_proj_old: Option<f64>,
    pub persona_proj_new: Option<f64>,
}

/// The direction columns of the per-layer comparison (cosines across versions, coupling within
/// each, the persona split); the projection columns are left empty for the caller.
pub fn direction_rows(a: &VersionDirections, b: &VersionDirections) -> Result<Vec<LayerRow>> {
    let n = a.refusal.n_layers();
    let mut out = Vec::with_capacity(n);
    for l in 0..n {
        let (ra, rb) = (a.refusal.layer(l)?, b.refusal.layer(l)?);
        let (pa, pb) = (a.persona.layer(l)?, b.persona.layer(l)?);
        let split = split_persona(pa, pb, ra, rb);
        out.push(LayerRow {
            layer: l,
            refusal_cos: cosine(ra, rb),
            persona_cos: cosine(pa, pb),
            geometry_old: cosine(pa, ra),
            geometry_new: cosine(pb, rb),
            persona_off_refusal_cos: split.off_refusal_cos,
            persona_change_along_refusal: split.change_along_refusal,
            refusal_proj_old: None,
            refusal_proj_new: None,
            persona_proj_old: None,
            persona_proj_new: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn e(i: usize, d: usize) -> Vec<f32> {
        let mut v = vec![0.0; d];
        v[i] = 1.0;
        v
    }

    #[test]
    fn refusal_removed_from_persona_keeps_the_rest() {
        // persona = 0.6 r + 0.8 q; the new version lost r entirely (its refusal direction is
        // what was left of an old one that mixed r and s).
        let (r, q, s) = (e(0, 4), e(1, 4), e(2, 4));
        let p_old: Vec<f32> = r.iter().zip(&q).map(|(a, b)| 0.6 * a + 0.8 * b).collect();
        let r_old: Vec<f32> = r.iter().zip(&s).map(|(a, b)| 0.8 * a + 0.6 * b).collect();
        let split = split_persona(&p_old, &q, &r_old, &s);
        assert!((split.off_refusal_cos.unwrap() - 1.0).abs() < 1e-9);
        // unit change -0.6 r + 0.2 q: 0.36 of its 0.40 lies along r
        assert!((split.change_along_refusal.unwrap() - 0.9).abs() < 1e-6);
    }

    #[test]
    fn a_rotation_away_from_refusal_is_persona_change() {
        let (r, q, t) = (e(0, 4), e(1, 4), e(3, 4));
        let split = split_persona(&q, &t, &r, &r);
        assert!(split.off_refusal_cos.unwrap().abs() < 1e-9);
        assert!(split.change_along_refusal.unwrap() < 1e-9);
    }

    #[test]
    fn equal_or_degenerate_inputs() {
        let (r, q) = (e(0, 3), e(1, 3));
        let same = split_persona(&q, &q, &r, &r);
        assert_eq!(same.off_refusal_cos, Some(1.0));
        assert_eq!(same.change_along_refusal, None);
        // a persona direction that is all refusal has no rest to compare
        assert_eq!(split_persona(&r, &q, &r, &r).off_refusal_cos, None);
        assert_eq!(split_persona(&[0.0; 3], &q, &r, &r).off_refusal_cos, None);
    }

    /// A version's directions from per-layer rows (refusal selected at layer 2).
    pub(in crate::drift) fn version(
        refusal: Vec<Vec<f32>>,
        persona: Vec<Vec<f32>>,
    ) -> VersionDirections {
        use crate::directions::{DirectionMeta, DirectionSet};
        let set = |name: &str, rows| {
            let mut meta = DirectionMeta::new(name, "test", 0, 0);
            meta.extra.insert("selected_layer".into(), "2".into());
            DirectionSet::from_rows(meta, rows).unwrap()
        };
        VersionDirections {
            refusal: set("refusal", refusal),
            refusal_layer: 2,
            persona: set("persona", persona),
            files: Default::default(),
            extracted: false,
        }
    }

    pub(in crate::drift) fn measure(v: VersionDirections) -> super::super::measure::VersionMeasure {
        super::super::measure::VersionMeasure {
            model: "synthetic".into(),
            source: "synthetic".into(),
            n_layers: v.refusal.n_layers(),
            d_model: v.refusal.d_model(),
            vocab_sha256: String::new(),
            refusal_layer: v.refusal_layer,
            refusal_selection: String::new(),
            direction_files: Default::default(),
            directions_extracted: false,
            labels: Default::default(),
            directions: Some(v),
            harmful_mean: vec![],
            harmless_mean: vec![],
        }
    }

    /// `sum c_i e_i` in 8 dimensions.
    pub(in crate::drift) fn mix(terms: &[(usize, f32)]) -> Vec<f32> {
        let mut v = vec![0.0; 8];
        for (i, c) in terms {
            v[*i] += c;
        }
        v
    }

    fn verdicts(
        old: VersionDirections,
        new: VersionDirections,
    ) -> (super::super::compare::DirectionDrift, Vec<LayerRow>) {
        let rows = direction_rows(&old, &new).unwrap();
        let opts = super::super::DriftOptions::default();
        let d = super::super::compare::direction_drift(&measure(old), &measure(new), &rows, &opts);
        (d, rows)
    }

    /// Old version: refusal `e0 + 0.3 l e4` (it turns a little across layers), persona
    /// `-0.5 e0 + 0.85 e1` (coupled to refusal, cos about -0.5).
    pub(in crate::drift) fn old_version() -> VersionDirections {
        let refusal = (0..4)
            .map(|l| mix(&[(0, 1.0), (4, 0.3 * l as f32)]))
            .collect();
        let persona = (0..4).map(|_| mix(&[(0, -0.5), (1, 0.85)])).collect();
        version(refusal, persona)
    }

    #[test]
    fn orthogonalized_like_version_changes_coupling_not_persona() {
        // e0 (the old refusal direction at its layer) projected out of everything, plus the
        // small noise a re-extraction brings.
        let refusal = (0..4).map(|l| mix(&[(4, 0.3 * l as f32 + 0.05)])).collect();
        let persona = (0..4).map(|_| mix(&[(1, 0.85), (2, 0.04)])).collect();
        let (d, rows) = verdicts(old_version(), version(refusal, persona));
        assert!(d.geometry_drifted, "coupling changed: {d:?}");
        assert!(d.geometry_max_change > 0.4, "{d:?}");
        assert!(!d.persona_drifted, "persona itself kept: {d:?}");
        assert!(d.persona_off_refusal_min.unwrap().1 > 0.99, "{d:?}");
        // the raw persona cosine alone would have called it a change
        assert!(rows.iter().all(|r| r.persona_cos.unwrap() < 0.9));
        assert!(rows
            .iter()
            .all(|r| r.persona_change_along_refusal.unwrap() > 0.9));
    }

    #[test]
    fn rotated_persona_is_flagged_with_coupling_unchanged() {
        // the persona's part off refusal turns 40 degrees from layer 2 on; refusal and the
        // coupling stay as they were
        let (c, s) = (40f32.to_radians().cos(), 40f32.to_radians().sin());
        let old = old_version();
        let persona = (0..4)
            .map(|l| match l {
                0 | 1 => mix(&[(0, -0.5), (1, 0.85)]),
                _ => mix(&[(0, -0.5), (1, 0.85 * c), (3, 0.85 * s)]),
            })
            .collect();
        let refusal = (0..4)
            .map(|l| old.refusal.layer(l).unwrap().to_vec())
            .collect();
        let (d, _) = verdicts(old, version(refusal, persona));
        assert!(d.persona_drifted, "{d:?}");
        assert_eq!(d.persona_off_refusal_below_from, Some(2));
        // the off-refusal parts keep the share of e0 that the turning refusal leaves, so the
        // cosine is a little above cos 40 degrees (0.766)
        let (layer, cos) = d.persona_off_refusal_min.unwrap();
        assert!(layer >= 2 && (0.76..0.85).contains(&cos), "{d:?}");
        assert!(!d.geometry_drifted, "coupling unchanged: {d:?}");
    }

    #[test]
    fn same_directions_no_drift_of_either_kind() {
        let (d, _) = verdicts(old_version(), old_version());
        assert!(!d.persona_drifted && !d.geometry_drifted, "{d:?}");
        assert_eq!(d.persona_off_refusal_min.map(|m| m.1), Some(1.0));
    }
}
