//! Interventions on the residual stream: the hook point ([`hook`]) and intervention plans
//! ([`plan`]): add a direction, project it out (ablate), or cap its projection, per layer, per
//! position kind and per sequence.

pub mod capture;
pub mod hook;
pub mod plan;

pub use capture::{LastTokenCapture, MeanCapture};
pub use hook::{HookChain, HookCtx, PositionKind, ResidualHook, RowCtx};
pub use plan::{
    CompiledPlan, Intervention, InterventionPlan, LayerSet, OpKind, PlanHook, Positions, Sites,
};
