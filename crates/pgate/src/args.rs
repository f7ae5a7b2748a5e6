//! Argument groups shared by commands: the model ([`ModelArgs`]) and the intervention plan
//! ([`PlanFlags`]), both defined in the library, and [`WithModel`] for a job that needs a model.

use std::sync::Arc;

use anyhow::Result;
use persona_gate::directions::PlanFlags;
use persona_gate::intervene::CompiledPlan;
pub use persona_gate::model::args::{parse_device, ModelArgs};
use persona_gate::model::Model;

/// A model and a job's flags.
#[derive(clap::Args)]
pub struct WithModel<J: clap::Args> {
    #[command(flatten)]
    pub m: ModelArgs,
    #[command(flatten)]
    pub job: J,
}

/// The plan of `flags` compiled for `model`, its steering warning (if any) on stderr.
pub fn load_plan(flags: &PlanFlags, model: &Model) -> Result<Option<Arc<CompiledPlan>>> {
    let (plan, warning) = flags.load(model)?;
    if let Some(w) = warning {
        eprintln!("{}", w.line());
    }
    Ok(plan)
}
