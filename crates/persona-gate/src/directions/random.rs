//! Random control directions.
//!
//! An effect of steering along a direction means little until a random direction of the same norm,
//! at the same layers, does not produce it (the control of Arditi et al.'s ablations and of most
//! steering work). Controls here are Gaussian vectors from a seeded generator, optionally made
//! orthogonal to a given direction at each layer (so the control shares no component with it) and
//! optionally scaled to its norm at each layer.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::set::{DirectionMeta, DirectionSet};
use super::util::{dot, norm};
use crate::{Error, Result};

/// What the controls must match.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomOptions<'a> {
    pub seed: u64,
    /// Make each layer's vector orthogonal to this set's vector at that layer.
    pub orthogonal_to: Option<&'a DirectionSet>,
    /// Scale each layer's vector to this set's norm at that layer (unit norm otherwise).
    pub like: Option<&'a DirectionSet>,
}

/// Standard normal samples by Box-Muller (rand's core has no normal distribution; two uniforms
/// give two normals).
fn gaussians(rng: &mut StdRng, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

/// `n_layers` seeded random directions of width `d`. Layers are drawn in order from one
/// `StdRng::seed_from_u64(seed)` stream, so a seed names the whole set; the seed and the
/// generator are recorded in the metadata.
pub fn random_directions(
    n_layers: usize,
    d: usize,
    opts: &RandomOptions<'_>,
) -> Result<DirectionSet> {
    if n_layers == 0 || d == 0 {
        return Err(Error::Empty(
            "random directions need at least one layer of width > 0".into(),
        ));
    }
    if d < 2 && opts.orthogonal_to.is_some() {
        return Err(Error::InvalidValue(
            "cannot be orthogonal in one dimension".into(),
        ));
    }
    for (what, s) in [("orthogonal_to", opts.orthogonal_to), ("like", opts.like)] {
        if let Some(s) = s {
            if s.n_layers() != n_layers || s.d_model() != d {
                return Err(Error::InvalidValue(format!(
                    "{what} direction '{}' is {} layers x {}, but the controls are {n_layers} layers x {d}",
                    s.name(),
                    s.n_layers(),
                    s.d_model()
                )));
            }
        }
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut data = Vec::with_capacity(n_layers * d);
    for l in 0..n_layers {
        let mut v = gaussians(&mut rng, d);
        if let Some(o) = opts.orthogonal_to {
            let u = o.layer(l)?;
            let nu = norm(u);
            if nu > 0.0 {
                // Gram-Schmidt twice: one pass leaves ~1e-16 relative residue, the second cleans it.
                for _ in 0..2 {
                    let p: f64 =
                        v.iter().zip(u).map(|(a, b)| a * *b as f64).sum::<f64>() / (nu * nu);
                    v.iter_mut().zip(u).for_each(|(a, b)| *a -= p * *b as f64);
                }
            }
        }
        let nv = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let target = match opts.like {
            Some(s) => norm(s.layer(l)?),
            None => 1.0,
        };
        let k = if nv > 0.0 { target / nv } else { 0.0 };
        data.extend(v.iter().map(|x| (x * k) as f32));
    }
    let mut meta = DirectionMeta::new(
        format!("random-{}", opts.seed),
        "random-gaussian",
        n_layers,
        d,
    );
    meta.seed = Some(opts.seed);
    meta.position = "n/a".into();
    meta.extra.insert(
        "rng".into(),
        "rand 0.9 StdRng::seed_from_u64, Box-Muller normals, layers in order".into(),
    );
    if let Some(o) = opts.orthogonal_to {
        meta.extra.insert("orthogonal_to".into(), o.name().into());
        copy_model(&mut meta, o);
    }
    if let Some(s) = opts.like {
        meta.extra.insert("norm_matched_to".into(), s.name().into());
        copy_model(&mut meta, s);
    }
    let set = DirectionSet::from_flat(meta, data, n_layers, d)?;
    // Sanity: orthogonality holds to float precision.
    if let Some(o) = opts.orthogonal_to {
        for l in 0..n_layers {
            let (a, b) = (set.layer(l)?, o.layer(l)?);
            let c = dot(a, b) / (norm(a) * norm(b)).max(f64::MIN_POSITIVE);
            if c.abs() > 1e-4 {
                return Err(Error::InvalidValue(format!(
                    "internal: control at layer {l} not orthogonal (cos {c:.2e})"
                )));
            }
        }
    }
    Ok(set)
}

fn copy_model(meta: &mut DirectionMeta, from: &DirectionSet) {
    if meta.model.is_empty() {
        meta.model = from.meta.model.clone();
        meta.model_sha256 = from.meta.model_sha256.clone();
        meta.architecture = from.meta.architecture.clone();
    }
}
