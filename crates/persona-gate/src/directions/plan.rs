//! Intervention plans from every source: plan files, command-line specs and direction files.
//!
//! Plan files (`--plan`) are JSON or TOML, in the [`InterventionPlan`] form where `direction` may
//! also name a file: `direction = { file = "refusal.safetensors", layer = 12 }` (layer omitted: the
//! vector of each op layer), or the string `"refusal.safetensors[12]"`. Relative paths are read
//! from the plan file's folder. A serialized [`InterventionPlan`] (inline vectors, `sites`) is a
//! plan file too.
//!
//! Why one loader: `pgate generate`, `eval`, `bench` and `logits`, server presets and anything
//! built on the library describe steering the same way, a plan file and/or `--ablate`, `--cap`,
//! `--add`, `--add-raw` specs ([`PlanSource`]). Loading them in one place means a plan that works
//! for one command works for all of them, with the same checks and the same messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::set::DirectionSet;
use super::spec::{intervention, ops_from_direction, parse_file_ref, DirectionSpec};
use crate::intervene::{
    CompiledPlan, Intervention, InterventionPlan, LayerSet, OpKind, Positions, Sites,
};
use crate::model::limits::{one_line, quote};
use crate::model::Model;
use crate::{Error, Result};

/// Where a plan's operations come from: a plan file, then steering specs.
///
/// The operations apply in the order plan file, ablate, cap, add, add-raw: remove first, then
/// bound, then steer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlanSource {
    /// A plan file (JSON or TOML, directions inline or by file).
    pub plan: Option<PathBuf>,
    /// `FILE[L]@LAYERS[/POSITIONS]`: project the direction out.
    pub ablate: Vec<String>,
    /// `FILE[L]:LO:HI@LAYERS[/POSITIONS]`: clamp the projection.
    pub cap: Vec<String>,
    /// `FILE[L]:COEFF@LAYERS[/POSITIONS]`: add COEFF times the unit vector.
    pub add: Vec<String>,
    /// `FILE[L]:COEFF@LAYERS[/POSITIONS]`: add COEFF times the vector as stored.
    pub add_raw: Vec<String>,
}

impl PlanSource {
    /// A plan file alone.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        PlanSource {
            plan: Some(path.into()),
            ..Default::default()
        }
    }

    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.plan.is_none()
            && self.ablate.is_empty()
            && self.cap.is_empty()
            && self.add.is_empty()
            && self.add_raw.is_empty()
    }

    /// Every spec parsed, in application order. No file is read, so a typo fails before a model
    /// is loaded.
    pub fn specs(&self) -> Result<Vec<DirectionSpec>> {
        type Parse = fn(&str) -> Result<DirectionSpec>;
        let groups: [(&Vec<String>, Parse); 4] = [
            (&self.ablate, DirectionSpec::parse_ablate),
            (&self.cap, DirectionSpec::parse_cap),
            (&self.add, DirectionSpec::parse_add),
            (&self.add_raw, DirectionSpec::parse_add_raw),
        ];
        groups
            .iter()
            .flat_map(|(list, parse)| list.iter().map(move |s| parse(s)))
            .collect()
    }
}

/// The plan of `source`, checked against a model of `n_layers` x `d_model` (every layer in range,
/// every vector of the right width and finite); `None` when the source names nothing.
pub fn load_plan(
    source: &PlanSource,
    n_layers: usize,
    d_model: usize,
) -> Result<Option<InterventionPlan>> {
    load_plan_with(source, n_layers, d_model, |_| Ok(()))
}

/// [`load_plan`] with `resolve` rewriting each spec before its direction file is read: a server
/// maps the direction names of its presets to its `--directions` files, relative paths to the
/// presets file's folder.
pub fn load_plan_with(
    source: &PlanSource,
    n_layers: usize,
    d_model: usize,
    mut resolve: impl FnMut(&mut DirectionSpec) -> Result<()>,
) -> Result<Option<InterventionPlan>> {
    if source.is_empty() {
        return Ok(None);
    }
    let specs = source.specs()?;
    let mut b = PlanBuilder::new();
    if let Some(p) = &source.plan {
        b.plan_file(p)?;
    }
    for mut s in specs {
        resolve(&mut s)?;
        b.spec(&s)?;
    }
    b.finish(n_layers, d_model).map(Some)
}

/// [`load_plan`] for `model`, compiled onto its device in its dtype (shared by every sequence
/// that runs under it).
pub fn load_compiled_plan(source: &PlanSource, model: &Model) -> Result<Option<Arc<CompiledPlan>>> {
    let cfg = model.config();
    load_plan(source, cfg.n_layers, cfg.d_model)?
        .map(|p| compile_for(&p, model))
        .transpose()
}

/// `plan` compiled for `model`.
pub fn compile_for(plan: &InterventionPlan, model: &Model) -> Result<Arc<CompiledPlan>> {
    let cfg = model.config();
    let compiled = plan.compile(
        cfg.n_layers,
        cfg.d_model,
        model.decoder.dtype(),
        model.decoder.device(),
    )?;
    Ok(Arc::new(compiled))
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
                if op.include_embedding || op.sites == Sites::All {
                    one.sites = Sites::All;
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
        if op.include_embedding || op.sites == Sites::All {
            if ops.len() != 1 {
                return Err(Error::InvalidValue(
                    "include_embedding needs one vector for all layers: pick a layer (layer = L or FILE[L])"
                        .into(),
                ));
            }
            ops[0].sites = Sites::All;
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
    /// `all` is `include_embedding` in the form a serialized [`InterventionPlan`] writes it.
    #[serde(default)]
    sites: Sites,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directions::DirectionMeta;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pgate-plan-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    /// A serialized `InterventionPlan` (what `bench --plan` and `logits --plan` used to read) loads
    /// unchanged, `sites` included.
    #[test]
    fn serialized_plans_load_as_they_are() {
        let mut plan = InterventionPlan::new()
            .add(LayerSet::parse("1-2").unwrap(), vec![0.5, -1.0, 2.0], 3.0)
            .ablate(LayerSet::single(0), vec![1.0, 0.0, 0.0]);
        plan.ops[1].sites = Sites::All;
        plan.ops[1].direction_name = "x".into();
        let p = tmp("serialized.json");
        std::fs::write(&p, serde_json::to_string(&plan).unwrap()).unwrap();
        let loaded = load_plan(&PlanSource::file(&p), 4, 3).unwrap().unwrap();
        assert_eq!(loaded, plan);
    }

    /// Plan file first, then ablate, cap, add, add-raw, whatever order the fields were set in; a
    /// spec typo fails before any file is read.
    #[test]
    fn sources_apply_in_order() {
        let f = tmp("d.safetensors");
        let rows = vec![vec![1.0, 0.0], vec![0.0, 2.0]];
        DirectionSet::from_rows(DirectionMeta::new("d", "test", 2, 2), rows)
            .unwrap()
            .save(&f)
            .unwrap();
        let plan_file = tmp("p.toml");
        std::fs::write(
            &plan_file,
            "[[ops]]\nop = \"add\"\ncoeff = 1.0\nlayers = \"0\"\ndirection = { file = \"d.safetensors\", layer = 1 }\n",
        )
        .unwrap();
        let fs = f.display().to_string();
        let src = PlanSource {
            add_raw: vec![format!("{fs}[0]:2@1")],
            add: vec![format!("{fs}:1@1")],
            cap: vec![format!("{fs}:-1:1@0")],
            ablate: vec![format!("{fs}[1]@0-1")],
            plan: Some(plan_file),
        };
        let plan = load_plan(&src, 2, 2).unwrap().unwrap();
        let kinds: Vec<&str> = plan
            .ops
            .iter()
            .map(|o| match o.kind {
                OpKind::Add { raw: false, .. } => "add",
                OpKind::Add { raw: true, .. } => "add-raw",
                OpKind::Ablate => "ablate",
                OpKind::Cap { .. } => "cap",
            })
            .collect();
        assert_eq!(kinds, ["add", "ablate", "cap", "add", "add-raw"]);
        assert_eq!(plan.ops[0].direction, vec![0.0, 2.0]);
        assert!(load_plan(&PlanSource::default(), 2, 2).unwrap().is_none());
        let typo = PlanSource {
            add: vec!["missing.safetensors:1".into()],
            ..Default::default()
        };
        assert!(matches!(typo.specs(), Err(Error::InvalidSpec { .. })));
    }
}
