//! Argument groups shared by commands: the model ([`ModelArgs`], one group for every command that
//! loads a model, defined in the library) and the intervention plan ([`PlanArgs`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use persona_gate::directions::{load_compiled_plan, PlanSource};
use persona_gate::drift::warn::warn_for_model;
use persona_gate::intervene::CompiledPlan;
pub use persona_gate::model::args::{parse_device, ModelArgs};
use persona_gate::model::Model;

/// An intervention plan: a plan file and/or steering specs, loaded by the library's one plan
/// loader ([`persona_gate::directions::load_plan`]).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PlanArgs {
    /// Intervention plan (JSON or TOML; directions inline or as {file, layer}) applied to every
    /// sequence, before the --ablate/--cap/--add ops.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Add COEFF x unit direction: FILE[L]:COEFF@LAYERS[/prompt|generated] (repeatable).
    /// [L] uses layer L's vector at every layer; without it each layer uses its own vector.
    /// Example: --add compliant.safetensors:2@12-16
    #[arg(long, value_name = "FILE[L]:COEFF@LAYERS")]
    pub add: Vec<String>,
    /// Add COEFF x the vector as stored (not normalized), e.g. the raw difference in means.
    #[arg(long, value_name = "FILE[L]:COEFF@LAYERS")]
    pub add_raw: Vec<String>,
    /// Project the direction out: FILE[L]@LAYERS. Example: --ablate refusal.safetensors[12]@0-23
    #[arg(long, value_name = "FILE[L]@LAYERS")]
    pub ablate: Vec<String>,
    /// Clamp the projection on the unit direction into [LO, HI] (either may be empty):
    /// FILE[L]:LO:HI@LAYERS. Example: --cap axis.safetensors:-4:@10-20
    #[arg(long, value_name = "FILE[L]:LO:HI@LAYERS")]
    pub cap: Vec<String>,
    /// The model's refusal direction, checked against every added direction (a warning names the
    /// most anti-aligned layer). Default: the cache entry for the model's sha256, if any.
    #[arg(long, value_name = "FILE")]
    pub refusal: Option<PathBuf>,
    /// Do not warn when an added direction works against refusal.
    #[arg(long)]
    pub quiet_warnings: bool,
}

impl PlanArgs {
    /// The flags as the library's plan source.
    pub fn source(&self) -> PlanSource {
        PlanSource {
            plan: self.plan.clone(),
            ablate: self.ablate.clone(),
            cap: self.cap.clone(),
            add: self.add.clone(),
            add_raw: self.add_raw.clone(),
        }
    }

    /// Parse every spec without reading a file, so a typo fails before a model is loaded.
    pub fn check(&self) -> Result<()> {
        self.source().specs()?;
        Ok(())
    }

    /// The plan compiled for `model` (`None` when no flag is given).
    pub fn load(&self, model: &Model) -> Result<Option<Arc<CompiledPlan>>> {
        let plan = load_compiled_plan(&self.source(), model)?;
        if let (Some(p), false) = (&plan, self.quiet_warnings) {
            if let Some(w) = warn_for_model(&p.source, model, self.refusal.as_deref())? {
                eprintln!("{}", w.line());
            }
        }
        Ok(plan)
    }
}

/// `--plan FILE` alone (`pgate bench`, `pgate logits`), through the same loader: JSON or TOML,
/// directions inline or by file.
pub fn load_plan(path: Option<&Path>, model: &Model) -> Result<Option<Arc<CompiledPlan>>> {
    let Some(p) = path else { return Ok(None) };
    Ok(load_compiled_plan(&PlanSource::file(p), model)?)
}

/// Write `value` as pretty JSON to `path` (the `--json FILE`, `--scores FILE`, `--report FILE`
/// outputs).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Threads the CPU kernels run on (what the bench header reports): `--threads`, else
/// `PGATE_THREADS` / `RAYON_NUM_THREADS`, else the cores.
pub fn rayon_threads() -> usize {
    persona_gate::kernels::threads()
}
