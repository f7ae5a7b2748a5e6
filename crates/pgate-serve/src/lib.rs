//! `pgate serve`: an OpenAI-compatible chat server over the persona-gate engine.
//!
//! - [`presets`]: persona modes (system prompt + intervention plan + guard policy) from TOML.
//! - [`engine`]: the model thread, one decode loop serving every request (continuous batching).
//! - [`guard`]: refusal intent and persona shift from the prompt's residual stream; calibration.
//! - [`guard_eval`]: the guard's flag rates under a preset, offline (`pgate guard eval`).
//! - [`output_guard`]: the refusal probe on the finished answer (a second check, after generation).
//! - [`output_eval`]: the output guard's true and false positive rates, offline.
//! - [`server`]: routes, request checks, SSE streaming, auth, limits, graceful shutdown.
//! - [`conn`]: the accept loop: connection cap, header read timeout, idle eviction.
//! - [`layers`]: request ids, catch-panic, OpenAI error objects for every error status.
//! - [`openai`]: request and response shapes, error objects.
//! - [`metrics`]: Prometheus text.
//! - [`bench`]: the load client behind `pgate serve-bench`.
//! - [`ops`]: whole operations (server configuration, guard calibration and evaluation) with typed
//!   results and events, what the binary and other front ends call.

pub mod bench;
pub mod conn;
pub mod drift;
pub mod engine;
pub mod guard;
pub mod guard_eval;
pub mod layers;
pub mod metrics;
pub mod openai;
pub mod ops;
pub mod output_eval;
pub mod output_guard;
pub mod presets;
pub mod projection;
pub mod server;

pub use conn::ConnLimits;
pub use guard::{GuardCalibration, GuardReport};
pub use output_guard::{OutputCheck, OutputGuard, OutputVerdict};
pub use presets::{build_presets, DirectionRegistry, GuardMode, Preset, PresetFile};
pub use projection::Projector;
pub use server::{serve, serve_backend, shutdown_signal, Backend, Limits, ServerConfig};
