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

/// The plan in `json`, checked against a model of `n_layers` x `d_model`. Relative direction
/// files are read from the working directory.
pub fn load(json: &str, n_layers: usize, d_model: usize) -> persona_gate::Result<InterventionPlan> {
    let mut b = PlanBuilder::new();
    b.plan_text(json, false, Path::new("."), "plan")?;
    b.finish(n_layers, d_model)
}

/// [`load`] compiled for `model`.
pub fn compile(json: &str, model: &Model) -> persona_gate::Result<Arc<CompiledPlan>> {
    let cfg = model.config();
    let plan = load(json, cfg.n_layers, cfg.d_model)?;
    compile_for(&plan, model)
}
