//! Intervention plans from direction files.
//!
//! An [`Intervention`] carries one vector for all its layers. A direction file has one vector per
//! layer, so applying it "at layers 10-14" means one operation per layer, each with that layer's
//! vector; `FILE[L]` instead picks layer L's vector for every layer (Arditi et al. ablate one
//! chosen refusal direction at all layers; activation capping along the assistant axis uses each
//! layer's own axis).
//!
//! Command-line specs:
//!
//! | flag | spec | meaning |
//! |---|---|---|
//! | `--add` | `FILE[L]:COEFF@LAYERS` | `h + COEFF * unit(v)` |
//! | `--add-raw` | `FILE[L]:COEFF@LAYERS` | `h + COEFF * v` (v as stored, e.g. the raw difference in means) |
//! | `--ablate` | `FILE[L]@LAYERS` | `h - (h . u) u` |
//! | `--cap` | `FILE[L]:LO:HI@LAYERS` | clamp `h . u` into `[LO, HI]` (either may be empty) |
//!
//! `[L]` is optional; `LAYERS` is `12`, `10-14` or `3,10-12`; a trailing `/prompt` or `/generated`
//! limits the positions (default all). Example: `--ablate refusal.safetensors[12]@0-23`.
//!
//! Plan files and whole plans from specs and files: [`super::plan`].

use std::path::PathBuf;

use super::set::DirectionSet;
use crate::intervene::{Intervention, InterventionPlan, LayerSet, OpKind, Positions};
use crate::model::limits::quote;
use crate::{Error, Result};

/// One operation given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectionSpec {
    /// The spec as written (for messages).
    pub text: String,
    pub kind: OpKind,
    pub file: PathBuf,
    /// `[L]`: use layer L's vector at every op layer.
    pub pick: Option<usize>,
    pub layers: LayerSet,
    pub positions: Positions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecKind {
    Add,
    AddRaw,
    Ablate,
    Cap,
}

impl SpecKind {
    fn form(self) -> &'static str {
        match self {
            SpecKind::Add | SpecKind::AddRaw => "FILE[L]:COEFF@LAYERS",
            SpecKind::Ablate => "FILE[L]@LAYERS",
            SpecKind::Cap => "FILE[L]:LO:HI@LAYERS",
        }
    }
}

impl DirectionSpec {
    /// `FILE[L]:COEFF@LAYERS[/POSITIONS]`, adding `COEFF` times the unit vector.
    pub fn parse_add(s: &str) -> Result<Self> {
        Self::parse(SpecKind::Add, s)
    }

    /// Like [`DirectionSpec::parse_add`], adding `COEFF` times the vector as stored.
    pub fn parse_add_raw(s: &str) -> Result<Self> {
        Self::parse(SpecKind::AddRaw, s)
    }

    /// `FILE[L]@LAYERS[/POSITIONS]`.
    pub fn parse_ablate(s: &str) -> Result<Self> {
        Self::parse(SpecKind::Ablate, s)
    }

    /// `FILE[L]:LO:HI@LAYERS[/POSITIONS]`, LO or HI may be empty.
    pub fn parse_cap(s: &str) -> Result<Self> {
        Self::parse(SpecKind::Cap, s)
    }

    fn parse(kind: SpecKind, s: &str) -> Result<Self> {
        // Specs come from files too: quoted so that the error stays one line.
        let bad = |reason: String| Error::InvalidSpec {
            spec: quote(s, 200),
            reason: format!("{} (expected {})", quote(&reason, 300), kind.form()),
        };
        let (head, tail) = s
            .rsplit_once('@')
            .ok_or_else(|| bad("missing '@LAYERS'".into()))?;
        let (layer_text, positions) = match tail.split_once('/') {
            None => (tail, Positions::All),
            Some((l, p)) => (l, parse_positions(p).map_err(bad)?),
        };
        let layers = LayerSet::parse(layer_text).map_err(|e| match e {
            Error::InvalidSpec { reason, .. } => bad(format!("layers '{layer_text}': {reason}")),
            other => other,
        })?;
        let num = |what: &str, x: &str| -> Result<f32> {
            let v: f32 = x
                .trim()
                .parse()
                .map_err(|_| bad(format!("{what} '{x}' is not a number")))?;
            if !v.is_finite() {
                return Err(bad(format!("{what} '{x}' is not finite")));
            }
            Ok(v)
        };
        let (file_part, kind_op) = match kind {
            SpecKind::Add | SpecKind::AddRaw => {
                let (f, c) = head
                    .rsplit_once(':')
                    .ok_or_else(|| bad("missing ':COEFF'".into()))?;
                (
                    f,
                    OpKind::Add {
                        coeff: num("coefficient", c)?,
                        raw: kind == SpecKind::AddRaw,
                    },
                )
            }
            SpecKind::Ablate => (head, OpKind::Ablate),
            SpecKind::Cap => {
                let mut it = head.rsplitn(3, ':');
                let (hi, lo, f) = match (it.next(), it.next(), it.next()) {
                    (Some(h), Some(l), Some(f)) => (h, l, f),
                    _ => return Err(bad("missing ':LO:HI'".into())),
                };
                let opt = |what: &str, x: &str| -> Result<Option<f32>> {
                    if x.trim().is_empty() {
                        Ok(None)
                    } else {
                        num(what, x).map(Some)
                    }
                };
                let (lo, hi) = (opt("lower bound", lo)?, opt("upper bound", hi)?);
                if lo.is_none() && hi.is_none() {
                    return Err(bad("cap needs LO, HI or both".into()));
                }
                if let (Some(l), Some(h)) = (lo, hi) {
                    if l > h {
                        return Err(bad(format!("cap bounds are reversed: {l} > {h}")));
                    }
                }
                (f, OpKind::Cap { lo, hi })
            }
        };
        let (file, pick) = parse_file_ref(file_part).map_err(bad)?;
        Ok(Self {
            text: s.to_string(),
            kind: kind_op,
            file,
            pick,
            layers,
            positions,
        })
    }
}

fn parse_positions(p: &str) -> std::result::Result<Positions, String> {
    match p.trim().to_ascii_lowercase().as_str() {
        "all" => Ok(Positions::All),
        "prompt" => Ok(Positions::Prompt),
        "generated" => Ok(Positions::Generated),
        other => Err(format!(
            "positions '{other}' must be all, prompt or generated"
        )),
    }
}

/// `path` or `path[L]`.
pub(super) fn parse_file_ref(s: &str) -> std::result::Result<(PathBuf, Option<usize>), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("no direction file given".into());
    }
    if let Some(inner) = s.strip_suffix(']') {
        let open = inner
            .rfind('[')
            .ok_or_else(|| format!("'{s}' has ']' without '['"))?;
        let l = inner[open + 1..]
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("'[{}]' must be a layer number", &inner[open + 1..]))?;
        let f = &inner[..open];
        if f.is_empty() {
            return Err("no direction file before '[L]'".into());
        }
        return Ok((PathBuf::from(f), Some(l)));
    }
    Ok((PathBuf::from(s), None))
}

/// The vector of one layer of a direction file, named `FILE[L]` (what `pgate export
/// --orthogonalize` projects out of the weights): finite, of the file's width.
pub fn layer_vector(spec: &str) -> Result<Vec<f32>> {
    let bad = |reason: String| Error::InvalidSpec {
        spec: quote(spec, 200),
        reason,
    };
    let (file, pick) = parse_file_ref(spec).map_err(bad)?;
    let layer = pick.ok_or_else(|| bad("expected FILE[L] (which layer's vector)".into()))?;
    crate::model::source::require_regular_file(&file)?;
    let set = DirectionSet::load(&file)?;
    let v = set.layer(layer)?.to_vec();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::InvalidValue(format!(
            "{}: layer {layer}'s vector has NaN or infinite entries",
            file.display()
        )));
    }
    Ok(v)
}

/// Operations applying `set` with `kind` at `layers`: one per layer with that layer's vector, or
/// one for all layers with layer `pick`'s vector. A single-vector set (one row) applies its vector
/// everywhere. Errors name the direction and layer at fault.
pub fn ops_from_direction(
    set: &DirectionSet,
    label: &str,
    kind: &OpKind,
    pick: Option<usize>,
    layers: &LayerSet,
    positions: Positions,
) -> Result<Vec<Intervention>> {
    let needs_unit = !matches!(kind, OpKind::Add { raw: true, .. });
    let check = |l: usize, v: &[f32]| -> Result<()> {
        if needs_unit && v.iter().all(|x| *x == 0.0) {
            return Err(Error::InvalidValue(format!(
                "direction '{label}' is zero at layer {l} (nothing to {} there)",
                op_name(kind)
            )));
        }
        Ok(())
    };
    let layer_of_set = |l: usize| -> Result<&[f32]> {
        if l >= set.n_layers() {
            return Err(Error::InvalidSpec {
                spec: label.into(),
                reason: format!(
                    "layer {l} is out of range: the direction file has {} layers (0..={})",
                    set.n_layers(),
                    set.n_layers() - 1
                ),
            });
        }
        set.layer(l)
    };
    let op = |layers: LayerSet, name: String, v: &[f32]| {
        intervention(kind.clone(), layers, positions, name, v.to_vec())
    };
    match pick {
        Some(p) => {
            let v = layer_of_set(p)?;
            check(p, v)?;
            Ok(vec![op(layers.clone(), format!("{label}[{p}]"), v)])
        }
        None if set.n_layers() == 1 => {
            let v = set.layer(0)?;
            check(0, v)?;
            Ok(vec![op(layers.clone(), label.to_string(), v)])
        }
        None => layers
            .0
            .iter()
            .map(|&l| {
                let v = layer_of_set(l)?;
                check(l, v)?;
                Ok(op(LayerSet::single(l), format!("{label}@{l}"), v))
            })
            .collect(),
    }
}

/// One operation, built through [`InterventionPlan`]'s own constructor so fields the engine adds
/// later keep their defaults.
pub(super) fn intervention(
    kind: OpKind,
    layers: LayerSet,
    positions: Positions,
    name: String,
    direction: Vec<f32>,
) -> Intervention {
    let mut plan = InterventionPlan::new().ablate(layers, direction);
    let mut op = plan.ops.remove(0);
    op.kind = kind;
    op.positions = positions;
    op.direction_name = name;
    op
}

fn op_name(k: &OpKind) -> &'static str {
    match k {
        OpKind::Add { .. } => "add",
        OpKind::Ablate => "ablate",
        OpKind::Cap { .. } => "cap",
    }
}
