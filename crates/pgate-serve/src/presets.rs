//! Presets: named persona modes a request picks with `model` (or the `preset` extension field).
//!
//! A preset is a system prompt, an intervention plan (steering: add / ablate / cap on direction
//! files) and a guard policy. Presets come from a TOML file:
//!
//! ```toml
//! [presets.default]
//! description = "the model's own default persona"
//!
//! [presets.friendly]
//! system = "You are a friendly assistant."
//!
//! [presets.compliant]
//! description = "compliant persona steering (collapses refusal)"
//! add = ["compliant:8@10-14"]           # FILE_OR_NAME[L]:COEFF@LAYERS[/prompt|/generated]
//! # add_raw = [...], ablate = ["refusal[21]@0-27"], cap = ["compliant:-5:5@10-14"]
//! # plan = "plan.toml"                  # a plan file (JSON or TOML), relative to this file
//! guard = "block"                       # off | monitor | block (default: the server's --guard)
//! output_guard = "block"                # off | monitor | block (default: --output-guard)
//! ```
//!
//! `guard` is the input guard (the prompt, before generation, [`crate::guard`]); `output_guard` the
//! check of the finished answer ([`crate::output_guard`]).
//!
//! A direction is named by a file path (relative to the presets file) or by the name of one of the
//! server's `--directions` files (its file stem, e.g. `compliant` for `compliant.safetensors`).
//! Without a presets file the server has one preset, `default`; a file without `default` gets an
//! empty one added.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use persona_gate::directions::{
    compile_for, load_plan_with, DirectionSet, DirectionSpec, PlanSource,
};
use persona_gate::intervene::CompiledPlan;
use persona_gate::model::limits::{one_line, one_line_error, quote};
use persona_gate::model::Model;
use persona_gate::{Error, Result};
use serde::{Deserialize, Serialize};

/// What the guard does with a flagged request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GuardMode {
    /// No guard scores.
    #[default]
    Off,
    /// Attach scores and the flag (response field `persona_gate.guard`, header `x-pgate-guard`).
    Monitor,
    /// Replace a flagged completion by the guard's refusal message (`finish_reason` `content_filter`).
    Block,
}

impl GuardMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Ok(Self::Off),
            "monitor" => Ok(Self::Monitor),
            "block" => Ok(Self::Block),
            other => Err(Error::InvalidValue(format!(
                "guard mode '{other}' must be off, monitor or block"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Monitor => "monitor",
            Self::Block => "block",
        }
    }
}

/// One preset as written in the TOML file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PresetSpec {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub add_raw: Vec<String>,
    #[serde(default)]
    pub ablate: Vec<String>,
    #[serde(default)]
    pub cap: Vec<String>,
    #[serde(default)]
    pub plan: Option<PathBuf>,
    #[serde(default)]
    pub guard: Option<GuardMode>,
    /// Output guard mode (the answer read by the refusal probe after generation).
    #[serde(default)]
    pub output_guard: Option<GuardMode>,
}

impl PresetSpec {
    pub fn has_steering(&self) -> bool {
        !(self.add.is_empty()
            && self.add_raw.is_empty()
            && self.ablate.is_empty()
            && self.cap.is_empty()
            && self.plan.is_none())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PresetFile {
    #[serde(default)]
    pub presets: BTreeMap<String, PresetSpec>,
}

impl PresetFile {
    pub fn load(path: &Path) -> Result<Self> {
        // Preset files are a few kB; a huge one is refused before it is read.
        let text = persona_gate::model::source::read_bounded(path, 16 << 20)?;
        Self::parse(&text).map_err(|e| Error::InvalidValue(format!("{}: {e}", path.display())))
    }

    /// Parse and check a presets file: names, and the syntax of every steering spec (directions
    /// are resolved when the presets are built for a model). Errors are one line.
    pub fn parse(text: &str) -> Result<Self> {
        let f: PresetFile =
            toml::from_str(text).map_err(|e| Error::InvalidValue(one_line(&e.to_string())))?;
        for (name, spec) in &f.presets {
            check_name(name)?;
            spec.parse_specs().map_err(|e| {
                Error::InvalidValue(format!("preset '{name}': {}", one_line_error(e)))
            })?;
        }
        Ok(f)
    }
}

type ParseSpec = fn(&str) -> Result<DirectionSpec>;

impl PresetSpec {
    /// The steering specs as written, with the parser of each, in application order.
    fn spec_groups(&self) -> [(&Vec<String>, ParseSpec); 4] {
        [
            (&self.ablate, DirectionSpec::parse_ablate),
            (&self.cap, DirectionSpec::parse_cap),
            (&self.add, DirectionSpec::parse_add),
            (&self.add_raw, DirectionSpec::parse_add_raw),
        ]
    }

    /// The preset's steering as a source for the one plan loader
    /// ([`persona_gate::directions::load_plan_with`]), a relative plan file taken from `base`.
    pub fn plan_source(&self, base: &Path) -> PlanSource {
        PlanSource {
            plan: self.plan.as_ref().map(|p| {
                if p.is_absolute() {
                    p.clone()
                } else {
                    base.join(p)
                }
            }),
            ablate: self.ablate.clone(),
            cap: self.cap.clone(),
            add: self.add.clone(),
            add_raw: self.add_raw.clone(),
        }
    }

    /// Every steering spec parsed (no file is read).
    pub fn parse_specs(&self) -> Result<Vec<DirectionSpec>> {
        let mut out = Vec::new();
        for (list, parse) in self.spec_groups() {
            for s in list {
                out.push(parse(s)?);
            }
        }
        Ok(out)
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(Error::InvalidValue(format!(
            "preset name '{}' must be non-empty ASCII letters, digits, '-', '_', '.' or ':'",
            quote(name, 80)
        )));
    }
    Ok(())
}

/// A preset ready to serve: plan compiled for the loaded model.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: String,
    pub spec: PresetSpec,
    pub plan: Option<Arc<CompiledPlan>>,
    /// Guard mode after applying the server default.
    pub guard: GuardMode,
    /// Output guard mode after applying the server default.
    pub output_guard: GuardMode,
}

/// The server's named direction files (`--directions`): name -> file.
#[derive(Debug, Clone, Default)]
pub struct DirectionRegistry {
    pub files: BTreeMap<String, PathBuf>,
}

impl DirectionRegistry {
    /// Files or folders; a folder contributes every `*.safetensors` in it. Names are file stems.
    pub fn from_paths(paths: &[PathBuf]) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut add = |p: &Path| -> Result<()> {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(prev) = files.insert(stem.clone(), p.to_path_buf()) {
                if prev != p {
                    return Err(Error::InvalidValue(format!(
                        "two direction files are named '{stem}': {} and {}",
                        prev.display(),
                        p.display()
                    )));
                }
            }
            Ok(())
        };
        for p in paths {
            if p.is_dir() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                    .map_err(|e| Error::io(p, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                entries.sort();
                if entries.is_empty() {
                    return Err(Error::InvalidValue(format!(
                        "{}: no .safetensors direction files in this folder",
                        p.display()
                    )));
                }
                for f in entries {
                    add(&f)?;
                }
            } else if p.is_file() {
                add(p)?;
            } else {
                return Err(Error::io(
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such direction file"),
                ));
            }
        }
        Ok(Self { files })
    }

    pub fn get(&self, name: &str) -> Option<&PathBuf> {
        self.files.get(name)
    }

    pub fn load(&self, name: &str) -> Result<DirectionSet> {
        let p = self.get(name).ok_or_else(|| {
            Error::InvalidValue(format!(
                "no direction named '{name}' among --directions ({})",
                self.names()
            ))
        })?;
        DirectionSet::load(p)
    }

    pub fn names(&self) -> String {
        if self.files.is_empty() {
            "none given".into()
        } else {
            self.files.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    /// A spec's direction: an existing path (relative to `base`), else a registered name.
    fn resolve(&self, spec: &mut DirectionSpec, base: &Path) -> Result<()> {
        let raw = spec.file.clone();
        let rel = base.join(&raw);
        if raw.is_absolute() && raw.is_file() {
            return Ok(());
        }
        if rel.is_file() {
            spec.file = rel;
            return Ok(());
        }
        if raw.is_file() {
            return Ok(());
        }
        let name = raw.to_string_lossy();
        match self.get(&name) {
            Some(p) => {
                spec.file = p.clone();
                Ok(())
            }
            None => Err(Error::InvalidSpec {
                spec: spec.text.clone(),
                reason: format!(
                    "'{name}' is neither a direction file nor one of the --directions ({})",
                    self.names()
                ),
            }),
        }
    }
}

/// Compile every preset of `file` for `model`; presets that set no `guard` / `output_guard` get
/// `default_guard` / `default_output_guard`.
pub fn build_presets(
    file: Option<(&PresetFile, &Path)>,
    dirs: &DirectionRegistry,
    model: &Model,
    default_guard: GuardMode,
    default_output_guard: GuardMode,
) -> Result<BTreeMap<String, Preset>> {
    let mut specs = file.map(|(f, _)| f.presets.clone()).unwrap_or_default();
    specs.entry("default".into()).or_default();
    let base = file
        .and_then(|(_, p)| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let cfg = model.config();
    let mut out = BTreeMap::new();
    for (name, spec) in specs {
        let plan = load_plan_with(&spec.plan_source(&base), cfg.n_layers, cfg.d_model, |d| {
            dirs.resolve(d, &base)
        })
        .map_err(|e| match e {
            e @ Error::InvalidSpec { .. } => e,
            e => Error::InvalidValue(format!("preset '{name}': {e}")),
        })?
        .map(|p| compile_for(&p, model))
        .transpose()?;
        let guard = spec.guard.unwrap_or(default_guard);
        let output_guard = spec.output_guard.unwrap_or(default_output_guard);
        out.insert(
            name.clone(),
            Preset {
                name,
                spec,
                plan,
                guard,
                output_guard,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_presets() {
        let f = PresetFile::parse(
            r#"
[presets.friendly]
system = "You are friendly."
[presets.compliant]
add = ["compliant:8@10-14"]
guard = "block"
output_guard = "monitor"
"#,
        )
        .unwrap();
        assert_eq!(f.presets.len(), 2);
        assert!(f.presets["compliant"].has_steering());
        assert_eq!(f.presets["compliant"].guard, Some(GuardMode::Block));
        assert_eq!(
            f.presets["compliant"].output_guard,
            Some(GuardMode::Monitor)
        );
        assert_eq!(f.presets["friendly"].output_guard, None);
        assert!(!f.presets["friendly"].has_steering());
        let e = PresetFile::parse("[presets.x]\nsytem = 'typo'\n").unwrap_err();
        assert!(e.to_string().contains("sytem"), "{e}");
        let e = PresetFile::parse("[presets.\"a b\"]\n").unwrap_err();
        assert!(e.to_string().contains("preset name"), "{e}");
    }
}
