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
//! Plan files (`--plan`) are JSON or TOML, in the [`InterventionPlan`] form where `direction` may
//! also name a file: `direction = { file = "refusal.safetensors", layer = 12 }` (layer omitted: the
//! vector of each op layer), or the string `"refusal.safetensors[12]"`. Relative paths are read
//! from the plan file's folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::set::DirectionSet;
use crate::intervene::{Intervention, InterventionPlan, LayerSet, OpKind, Positions};
use crate::model::limits::{one_line, quote};
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
fn parse_file_ref(s: &str) -> std::result::Result<(PathBuf, Option<usize>), String> {
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
fn intervention(
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

/// Builds plans from specs and plan files, loading each direction file once.
#[derive(Debug, Default)]
pub struct PlanBuilder {
    files: HashMap<PathBuf, Arc<DirectionSet>>,
    plan: InterventionPlan,
}

impl PlanBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Load (once) a direction file; anything but a regular file (a FIFO, /dev/zero) is refused
    /// before it is opened.
    pub fn direction(&mut self, path: &Path) -> Result<Arc<DirectionSet>> {
        if let Some(s) = self.files.get(path) {
            return Ok(s.clone());
        }
        crate::model::source::require_regular_file(path)?;
        let s = Arc::new(DirectionSet::load(path)?);
        self.files.insert(path.to_path_buf(), s.clone());
        Ok(s)
    }

    /// Append the ops of a plan file (JSON or TOML by extension; `.toml` is TOML, anything else is
    /// tried as JSON, then TOML).
    pub fn plan_file(&mut self, path: &Path) -> Result<&mut Self> {
        let text = crate::model::source::read_bounded(path, MAX_PLAN_FILE)?;
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        self.plan_text(&text, is_toml, &base, &path.display().to_string())
    }

    /// Append the ops of plan text (TOML when `is_toml`, else JSON then TOML); relative direction
    /// paths are read from `base`, `name` names the plan in errors.
    pub fn plan_text(
        &mut self,
        text: &str,
        is_toml: bool,
        base: &Path,
        name: &str,
    ) -> Result<&mut Self> {
        let file: PlanFile = if is_toml {
            toml::from_str(text).map_err(|e| plan_error(name, &e.to_string()))?
        } else {
            match serde_json::from_str(text) {
                Ok(f) => f,
                Err(je) => toml::from_str(text).map_err(|_| plan_error(name, &je.to_string()))?,
            }
        };
        for (i, op) in file.ops.into_iter().enumerate() {
            let ops = self.expand(op, base).map_err(|e| {
                Error::InvalidValue(format!("{name} op {i}: {}", one_line(&e.to_string())))
            })?;
            self.plan.ops.extend(ops);
        }
        Ok(self)
    }

    /// Append the ops of a command-line spec.
    pub fn spec(&mut self, spec: &DirectionSpec) -> Result<&mut Self> {
        let set = self.direction(&spec.file).map_err(|e| Error::InvalidSpec {
            spec: spec.text.clone(),
            reason: e.to_string(),
        })?;
        let label = set.name().to_string();
        let ops = ops_from_direction(
            &set,
            &label,
            &spec.kind,
            spec.pick,
            &spec.layers,
            spec.positions,
        )
        .map_err(|e| match e {
            Error::InvalidSpec { reason, .. } => Error::InvalidSpec {
                spec: spec.text.clone(),
                reason,
            },
            Error::InvalidValue(reason) => Error::InvalidSpec {
                spec: spec.text.clone(),
                reason,
            },
            other => other,
        })?;
        self.plan.ops.extend(ops);
        Ok(self)
    }

    /// Append ready-made operations.
    pub fn ops(&mut self, ops: impl IntoIterator<Item = Intervention>) -> &mut Self {
        self.plan.ops.extend(ops);
        self
    }

    /// The plan, checked against a model's shape: every layer in range, every vector of width
    /// `d_model` and finite, every coefficient and bound finite. (Compiling checks again; these
    /// messages name the operation.)
    pub fn finish(&self, n_layers: usize, d_model: usize) -> Result<InterventionPlan> {
        for op in &self.plan.ops {
            let name = if op.direction_name.is_empty() {
                "inline direction"
            } else {
                op.direction_name.as_str()
            };
            if let Some(&l) = op.layers.0.iter().find(|&&l| l >= n_layers) {
                return Err(Error::LayerOutOfRange { layer: l, n_layers });
            }
            if op.direction.len() != d_model {
                return Err(Error::InvalidValue(format!(
                    "direction '{name}' has width {}, but the model's residual stream has width {d_model}",
                    op.direction.len()
                )));
            }
            if op.direction.iter().any(|x| !x.is_finite()) {
                return Err(Error::InvalidValue(format!(
                    "direction '{name}' has NaN or infinite values"
                )));
            }
            match op.kind {
                OpKind::Add { coeff, .. } if !coeff.is_finite() => {
                    return Err(Error::InvalidValue(format!(
                        "add coefficient {coeff} for '{name}' is not finite"
                    )))
                }
                OpKind::Cap { lo, hi }
                    if lo.is_some_and(|x| !x.is_finite()) || hi.is_some_and(|x| !x.is_finite()) =>
                {
                    return Err(Error::InvalidValue(format!(
                        "cap bounds for '{name}' must be finite"
                    )))
                }
                _ => {}
            }
        }
        Ok(self.plan.clone())
    }

    fn expand(&mut self, op: PlanFileOp, base: &Path) -> Result<Vec<Intervention>> {
        let kind = match op.op.to_ascii_lowercase().as_str() {
            "add" => OpKind::Add {
                coeff: op
                    .coeff
                    .ok_or_else(|| Error::InvalidValue("add needs 'coeff'".into()))?,
                raw: op.raw,
            },
            "ablate" => OpKind::Ablate,
            "cap" => {
                if op.lo.is_none() && op.hi.is_none() {
                    return Err(Error::InvalidValue("cap needs 'lo', 'hi' or both".into()));
                }
                OpKind::Cap {
                    lo: op.lo,
                    hi: op.hi,
                }
            }
            other => {
                return Err(Error::InvalidValue(format!(
                    "unknown op '{}' (add, ablate or cap)",
                    quote(other, 80)
                )))
            }
        };
        let layers = match op.layers {
            LayersField::Text(s) => LayerSet::parse(&s)?,
            LayersField::One(l) => LayerSet::from_layers([l])?,
            LayersField::List(v) => {
                if v.is_empty() {
                    return Err(Error::InvalidValue("'layers' is empty".into()));
                }
                LayerSet::from_layers(v)?
            }
        };
        let (file, pick) = match op.direction {
            DirectionField::Inline(v) => {
                let mut one = intervention(
                    kind,
                    layers,
                    op.positions,
                    op.direction_name.unwrap_or_default(),
                    v,
                );
                if op.include_embedding {
                    one.sites = crate::intervene::Sites::All;
                }
                return Ok(vec![one]);
            }
            DirectionField::File { file, layer } => (file, layer),
            DirectionField::Path(s) => parse_file_ref(&s).map_err(Error::InvalidValue)?,
        };
        let path = if file.is_relative() && base.join(&file).exists() {
            base.join(&file)
        } else {
            file
        };
        let set = self.direction(&path)?;
        let label = op.direction_name.unwrap_or_else(|| set.name().to_string());
        let mut ops = ops_from_direction(&set, &label, &kind, pick, &layers, op.positions)?;
        if op.include_embedding {
            if ops.len() != 1 {
                return Err(Error::InvalidValue(
                    "include_embedding needs one vector for all layers: pick a layer (layer = L or FILE[L])"
                        .into(),
                ));
            }
            ops[0].sites = crate::intervene::Sites::All;
        }
        Ok(ops)
    }
}

/// Largest plan file read (a plan with inline directions of a 16k-wide model is ~100 kB per op).
const MAX_PLAN_FILE: u64 = 64 << 20;

fn plan_error(name: &str, e: &str) -> Error {
    Error::InvalidValue(format!(
        "plan {name} is not a valid intervention plan: {}",
        one_line(e)
    ))
}

#[derive(Debug, Deserialize)]
struct PlanFile {
    #[serde(default)]
    ops: Vec<PlanFileOp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFileOp {
    op: String,
    #[serde(default)]
    coeff: Option<f32>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    lo: Option<f32>,
    #[serde(default)]
    hi: Option<f32>,
    layers: LayersField,
    #[serde(default)]
    positions: Positions,
    #[serde(default, alias = "name")]
    direction_name: Option<String>,
    direction: DirectionField,
    #[serde(default)]
    include_embedding: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LayersField {
    Text(String),
    One(usize),
    List(Vec<usize>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DirectionField {
    Inline(Vec<f32>),
    File {
        file: PathBuf,
        #[serde(default)]
        layer: Option<usize>,
    },
    Path(String),
}
