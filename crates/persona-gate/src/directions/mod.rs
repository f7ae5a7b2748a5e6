//! Directions in the residual stream: how they are found, stored, compared and applied.
//!
//! A *direction* here is one vector per layer, `[layers, d_model]`, read at the output of each
//! decoder block (`resid[l]`, the hook point of [`crate::intervene`]). The module covers the whole
//! life of one:
//!
//! - [`capture`]: residual activations over a prompt set at every layer, at the last prompt token, as
//!   the mean over the post-instruction template tokens, or as the mean over generated response tokens
//!   (batched, left-padded).
//! - [`extract`]: difference in means between a positive and a negative prompt set (the refusal
//!   direction of Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction";
//!   the persona vectors of Chen et al. 2025, "Persona Vectors"), optionally the first principal
//!   component of paired differences; [`extract::refusal_candidates`] for harmful-vs-harmless.
//! - [`traits`]: persona trait files (`instruction` pos/neg system prompts, `questions`,
//!   `eval_prompt`, the persona-vectors / assistant-axis format) and the built-in ones.
//! - [`random`]: seeded random controls, optionally orthogonal to and norm-matched with a direction.
//! - [`set`]: [`DirectionSet`], the value type: vectors, metadata, arithmetic, safetensors files.
//! - [`gguf`]: llama.cpp control-vector GGUF export and import.
//! - [`geometry`]: norms and cosines between directions and across layers.
//! - [`ops`]: whole operations, files in and out (trait extraction with its side files, random
//!   controls, control-vector export) with results that print themselves.
//! - [`spec`]: command-line steering specs (`--add FILE:COEFF@LAYERS`) and the operations they make.
//! - [`plan`]: whole plans from plan files (JSON, TOML) and specs: [`PlanSource`], [`load_plan`].

pub mod capture;
pub mod extract;
pub mod geometry;
pub mod gguf;
pub mod ops;
pub mod plan;
pub mod plan_flags;
pub mod random;
pub mod set;
pub mod spec;
pub mod traits;
mod util;

pub use capture::{capture_prompts, capture_spans, Activations, CaptureOptions, Position};
pub use extract::{
    diff_in_means, diff_in_means_prompts, extract_trait, paired_pc1, prompt_set_sha256,
    refusal_candidates, Method, TraitExtraction, TraitFlags, TraitOptions,
};
pub use geometry::{GeometryFlags, GeometryReport};
pub use gguf::{
    export_control_vector, import_control_vector, import_summary, ExportFlags, ExportOptions,
    ExportSummary, ImportFlags,
};
pub use ops::{
    export_gguf_file, extract_trait_files, random_file, random_references, RandomJob, TraitFiles,
    TraitOutputs,
};
pub use plan::{
    compile_for, load_compiled_plan, load_plan, load_plan_with, PlanBuilder, PlanSource,
};
pub use plan_flags::PlanFlags;
pub use random::{random_directions, RandomOptions};
pub use set::{Direction, DirectionMeta, DirectionSet};
pub use spec::DirectionSpec;
pub use traits::{InstructionPair, TraitSpec, BUILTIN_TRAITS};
pub use util::{cosine, model_sha256};
