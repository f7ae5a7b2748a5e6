//! The model-loading argument group every command shares ([`ModelArgs`]).
//!
//! Why one group, in the library: each command used to carry its own model/device flags (three
//! variants, one without `--device`), so the same model spec loaded differently depending on the
//! command. Every command flattens this group (clap derive behind the `cli` feature) and calls
//! [`ModelArgs::load`]; code that builds the group itself (a reader model named by another flag)
//! starts from [`ModelArgs::named`] so a flag added here reaches it with its default.

use crate::device::{self, Device};
use crate::model::{DTypeMode, LoadOptions, Model};
use crate::Result;

/// The model to load and how: weights, numeric mode, device, batch-invariant kernels.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ModelArgs {
    /// Model: a .gguf file, a Hugging Face model directory, a short name fetched by
    /// scripts/setup-models.sh (smollm2, q05, q15, gemma3), or a hub repo id (org/name).
    pub model: String,
    /// Numeric mode: f32 (reference), bf16, f16, or q (quantized matmuls, fast on CPU).
    #[cfg_attr(feature = "cli", arg(long, default_value = "q"))]
    pub dtype: String,
    /// Run on CUDA device N (needs a build with --features cuda).
    #[cfg_attr(feature = "cli", arg(long))]
    pub cuda: Option<usize>,
    /// Device: cpu, cuda or cuda:N (same as --cuda N). A comma-separated list (cuda:0,cuda:1)
    /// splits the layers over those devices in order, for a model larger than one GPU.
    #[cfg_attr(feature = "cli", arg(long, conflicts_with = "cuda"))]
    pub device: Option<String>,
    /// Compute each sequence the same way whatever else is in its batch (CPU): the same prompt
    /// gives bit-identical logits alone, in a study batch or in a server's continuous batch, so
    /// local and served audits agree exactly (and extracted directions do not depend on the batch
    /// size). Costs prefill speed (BENCHMARKS.md).
    #[cfg_attr(feature = "cli", arg(long))]
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

    /// The device named by `--device` or `--cuda` (CPU when neither is given); the first of a
    /// `--device` list.
    pub fn device(&self) -> Result<Device> {
        Ok(self.devices()?.remove(0))
    }

    /// Every device `--device` names (a list splits the layers), or the one of `--cuda` / CPU.
    pub fn devices(&self) -> Result<Vec<Device>> {
        match self.device.as_deref() {
            Some(list) if list.contains(',') => {
                list.split(',').map(|d| device::parse(d.trim())).collect()
            }
            d => Ok(vec![parse_device(d, self.cuda)?]),
        }
    }

    /// The numeric mode named by `--dtype`.
    pub fn dtype_mode(&self) -> Result<DTypeMode> {
        DTypeMode::parse(&self.dtype)
    }

    /// Load the model on its device in its numeric mode, batch-invariant kernels set as asked.
    pub fn load(&self) -> Result<Model> {
        let mut devices = self.devices()?;
        let opts = LoadOptions {
            dtype: self.dtype_mode()?,
            device: devices.remove(0),
        };
        let src = crate::model::ModelSource::resolve(&self.model)?;
        let mut model = Model::load_split(&src, &opts, &devices)?;
        model.decoder.set_batch_invariant(self.batch_invariant)?;
        Ok(model)
    }
}

/// A device from `--device` (cpu, cuda, gpu, cuda:N) or, when that is absent, `--cuda N`.
pub fn parse_device(device: Option<&str>, cuda: Option<usize>) -> Result<Device> {
    match (device, cuda) {
        (Some(d), _) => device::parse(d),
        (None, Some(i)) => device::cuda(i),
        (None, None) => Ok(Device::Cpu),
    }
}
