//! The intervention-plan flags every steering command shares (`--plan`, `--add`, `--add-raw`,
//! `--ablate`, `--cap`, plus the refusal check of added directions): [`PlanFlags`].
//!
//! Why here: the flags are one more source of the one plan loader ([`super::load_compiled_plan`]),
//! so they live next to it (clap derive behind the `cli` feature) and every front end gets the same
//! checks, messages and steering warning.

use std::path::PathBuf;
use std::sync::Arc;

use super::plan::{load_compiled_plan, PlanSource};
use crate::drift::warn::{warn_for_model, SteeringWarning};
use crate::intervene::CompiledPlan;
use crate::model::Model;
use crate::Result;

/// An intervention plan: a plan file and/or steering specs.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PlanFlags {
    /// Intervention plan (JSON or TOML; directions inline or as {file, layer}) applied to every
    /// sequence, before the --ablate/--cap/--add ops.
    #[cfg_attr(feature = "cli", arg(long))]
    pub plan: Option<PathBuf>,
    /// Add COEFF x unit direction: FILE[L]:COEFF@LAYERS[/prompt|generated] (repeatable).
    /// [L] uses layer L's vector at every layer; without it each layer uses its own vector.
    /// Example: --add compliant.safetensors:2@12-16
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE[L]:COEFF@LAYERS"))]
    pub add: Vec<String>,
    /// Add COEFF x the vector as stored (not normalized), e.g. the raw difference in means.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE[L]:COEFF@LAYERS"))]
    pub add_raw: Vec<String>,
    /// Project the direction out: FILE[L]@LAYERS. Example: --ablate refusal.safetensors[12]@0-23
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE[L]@LAYERS"))]
    pub ablate: Vec<String>,
    /// Clamp the projection on the unit direction into [LO, HI] (either may be empty):
    /// FILE[L]:LO:HI@LAYERS. Example: --cap axis.safetensors:-4:@10-20
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE[L]:LO:HI@LAYERS"))]
    pub cap: Vec<String>,
    /// The model's refusal direction, checked against every added direction (a warning names the
    /// most anti-aligned layer). Default: the cache entry for the model's sha256, if any.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub refusal: Option<PathBuf>,
    /// Do not warn when an added direction works against refusal.
    #[cfg_attr(feature = "cli", arg(long))]
    pub quiet_warnings: bool,
}

impl PlanFlags {
    /// The flags as the loader's plan source.
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
        self.source().specs().map(|_| ())
    }

    /// The plan compiled for `model` (`None` when no flag is given), and the warning to show when
    /// an added direction works against the model's refusal direction (none with
    /// `quiet_warnings`).
    pub fn load(
        &self,
        model: &Model,
    ) -> Result<(Option<Arc<CompiledPlan>>, Option<SteeringWarning>)> {
        let plan = load_compiled_plan(&self.source(), model)?;
        let warning = match (&plan, self.quiet_warnings) {
            (Some(p), false) => warn_for_model(&p.source, model, self.refusal.as_deref())?,
            _ => None,
        };
        Ok((plan, warning))
    }
}
