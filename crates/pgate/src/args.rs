//! Argument groups shared by every command that loads a model.
//!
//! Why one group: each command used to carry its own model/device flags (three variants, one
//! without `--device`), so the same model spec loaded differently depending on the command. Every
//! command now flattens [`ModelArgs`] and calls [`ModelArgs::load`]; code that builds the group
//! itself (a reader model named by another flag) starts from [`ModelArgs::named`] so a flag added
//! here reaches it with its default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use persona_gate::device::Device;
use persona_gate::directions::{load_compiled_plan, PlanSource};
use persona_gate::intervene::CompiledPlan;
use persona_gate::model::{DTypeMode, LoadOptions, Model};

/// The model to load and how: weights, numeric mode, device, batch-invariant kernels.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a .gguf file, a Hugging Face model directory, a short name fetched by
    /// scripts/setup-models.sh (smollm2, q05, q15, gemma3), or a hub repo id (org/name).
    pub model: String,
    /// Numeric mode: f32 (reference), bf16, f16, or q (quantized matmuls, fast on CPU).
    #[arg(long, default_value = "q")]
    pub dtype: String,
    /// Run on CUDA device N (needs a build with --features cuda).
    #[arg(long)]
    pub cuda: Option<usize>,
    /// Device: cpu, cuda or cuda:N (same as --cuda N).
    #[arg(long, conflicts_with = "cuda")]
    pub device: Option<String>,
    /// Compute each sequence the same way whatever else is in its batch (CPU): the same prompt
    /// gives bit-identical logits alone, in a study batch or in a server's continuous batch, so
    /// local and served audits agree exactly (and extracted directions do not depend on the batch
    /// size). Costs prefill speed (BENCHMARKS.md).
    #[arg(long)]
    pub batch_invariant: bool,
}

impl Default for ModelArgs {
    /// The flags' defaults with no model named (`dtype` q, CPU).
    fn default() -> Self {
        ModelArgs {
            model: String::new(),
            dtype: "q".into(),
            cuda: None,
            device: None,
            batch_invariant: false,
        }
    }
}

impl ModelArgs {
    /// The group for `model` with every other flag at its default.
    pub fn named(model: impl Into<String>) -> Self {
        ModelArgs {
            model: model.into(),
            ..Default::default()
        }
    }

    /// The device named by `--device` or `--cuda` (CPU when neither is given).
    pub fn device(&self) -> Result<Device> {
        parse_device(self.device.as_deref(), self.cuda)
    }

    /// The numeric mode named by `--dtype`.
    pub fn dtype_mode(&self) -> Result<DTypeMode> {
        Ok(DTypeMode::parse(&self.dtype)?)
    }

    /// Load the model on its device in its numeric mode, batch-invariant kernels set as asked.
    pub fn load(&self) -> Result<Model> {
        let opts = LoadOptions {
            dtype: self.dtype_mode()?,
            device: self.device()?,
        };
        let mut model = Model::load(&self.model, &opts)?;
        model.decoder.set_batch_invariant(self.batch_invariant)?;
        Ok(model)
    }
}

/// A device from `--device` (cpu, cuda, gpu, cuda:N) or, when that is absent, `--cuda N`.
pub fn parse_device(device: Option<&str>, cuda: Option<usize>) -> Result<Device> {
    Ok(match (device, cuda) {
        (Some(d), _) => persona_gate::device::parse(d)?,
        (None, Some(i)) => persona_gate::device::cuda(i)?,
        (None, None) => Device::Cpu,
    })
}

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
        Ok(load_compiled_plan(&self.source(), model)?)
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
