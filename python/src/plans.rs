//! Intervention plans from Python.
//!
//! The Python `Plan` writes the plan-file JSON that `pgate generate --plan` reads, and this side
//! reads it with the library's one plan loader (`PlanBuilder::plan_text`): a plan that works in a
//! notebook works on the command line, with the same checks and the same error messages.
//! (`plan_check`, which takes a loaded model, is in [`crate::model`].)

use std::path::Path;
use std::sync::Arc;

use persona_gate::directions::{compile_for, PlanBuilder};
use persona_gate::intervene::{CompiledPlan, InterventionPlan};
use persona_gate::model::Model;

/// The plan in `text` (JSON, or TOML when `toml`), checked against `model`'s shape. Relative
/// direction files are read from `base`.
pub fn load(
    text: &str,
    toml: bool,
    base: &Path,
    model: &Model,
) -> persona_gate::Result<InterventionPlan> {
    let cfg = model.config();
    let mut b = PlanBuilder::new();
    b.plan_text(text, toml, base, "plan")?;
    b.finish(cfg.n_layers, cfg.d_model)
}

/// The JSON plan in `json` (direction files relative to the working directory) compiled for
/// `model`.
pub fn compile(json: &str, model: &Model) -> persona_gate::Result<Arc<CompiledPlan>> {
    compile_for(&load(json, false, Path::new("."), model)?, model)
}
