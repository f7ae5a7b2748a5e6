//! persona-gate: measure and control how a chat model's persona gates its refusal.
//!
//! The crate is the engine and the science; the `pgate` binary only parses arguments.
//! - [`model`]: GGUF / safetensors / hf-hub loading and one shared decoder with per-family data.
//! - [`tokenize`]: tokenizers from GGUF metadata or tokenizer.json, and the model's own chat template.
//! - [`intervene`]: residual-stream hooks and intervention plans (add, ablate, cap).
//! - [`generate`]: batched decoding with KV cache, sampling and per-sequence plans.
//! - [`directions`]: refusal and persona directions: capture, extraction, files, controls, geometry.

pub mod bench;
pub mod capture_bench;
pub mod chat_job;
pub mod device;
pub mod directions;
pub mod drift;
pub mod endpoint;
pub mod error;
pub mod eval;
pub mod events;
pub mod fsutil;
pub mod generate;
pub mod hash;
pub mod intervene;
pub mod kernels;
pub mod label;
pub mod model;
pub mod refusal;
pub mod report;
pub mod study;
pub mod tokenize;

pub use error::{Error, Result};
