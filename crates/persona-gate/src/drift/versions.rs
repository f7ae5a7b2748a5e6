//! Making the model versions drift is measured on (`pgate export`): there is rarely a second
//! checkpoint of the same model at hand, so these stand in for what a deployment meets: a persona
//! fine-tune (a steering direction baked into the weights), the orthogonalized model (refusal
//! projected out of the weights), and the same model at another precision (the "no real drift"
//! control).

use std::path::Path;

use serde::Serialize;

use crate::directions::spec::layer_vector;
use crate::directions::{load_plan, PlanSource};
use crate::model::bake::{bake_biases, export_gguf, parse_block_type, BakeReport, BakeSpec};
use crate::model::export::{export_hf_dir, ExportOptions, ExportReport};
use crate::model::{open, DTypeMode, LoadOptions, ModelSource};
use crate::{Error, Result};

/// How to derive a version from a model (`pgate export MODEL -o OUT ...`).
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[derive(Debug, Clone, Default, Serialize)]
pub struct VersionOptions {
    /// Add COEFF x unit direction at the output of each listed block, in the weights (a bias
    /// per block, `blk.N.resid_add.bias`): FILE[L]:COEFF@LAYERS, the spelling of `--add`.
    /// The written model behaves like run-time `--add` with no plan. Needs OUT.gguf. Repeatable.
    /// Example: --bake-add compliant.safetensors:8@10-14
    #[cfg_attr(
        feature = "cli",
        arg(long = "bake-add", value_name = "FILE[L]:COEFF@LAYERS")
    )]
    pub bake_add: Vec<String>,
    /// Project this direction out of the embeddings and of every attention-output and MLP-down
    /// matrix: `FILE[L]` (layer L's vector of a direction file). The written model behaves like
    /// run-time ablation of that direction at every site of every layer.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE[L]"))]
    pub orthogonalize: Option<String>,
    /// Re-quantize every matrix to this GGUF block type (q8_0, q4_0, q4_k, q6_k, f16, f32): the
    /// precision-only control version. Needs OUT.gguf.
    #[cfg_attr(feature = "cli", arg(long, value_name = "TYPE"))]
    pub requantize: Option<String>,
    /// HF directory output: store weights as bf16 (default f32).
    #[cfg_attr(feature = "cli", arg(long))]
    pub bf16: bool,
}

/// What an export wrote: a GGUF copy or a HF directory.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum VersionReport {
    Gguf(BakeReport),
    Hf(ExportReport),
}

impl VersionReport {
    /// One line: what was written.
    pub fn summary(&self, out: &Path, seconds: f64) -> String {
        match self {
            VersionReport::Gguf(r) => r.summary(out, seconds),
            VersionReport::Hf(r) => r.summary(out, seconds),
        }
    }
}

/// True when `out` names a GGUF file (the copy keeps every unchanged tensor as stored).
fn is_gguf(out: &Path) -> bool {
    out.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Write the version of `model` that `opts` describes to `out`: a GGUF copy when `out` ends in
/// `.gguf` (bake-add, orthogonalize, re-quantize; GGUF sources), else a HF directory
/// (orthogonalize, bf16).
pub fn export_version(model: &str, out: &Path, opts: &VersionOptions) -> Result<VersionReport> {
    let src = ModelSource::resolve(model)?;
    let orthogonalize = opts
        .orthogonalize
        .as_deref()
        .map(layer_vector)
        .transpose()?;
    if !is_gguf(out) {
        if !opts.bake_add.is_empty() || opts.requantize.is_some() {
            return Err(Error::InvalidValue(format!(
                "--bake-add and --requantize write a GGUF copy: name the output NEW.gguf (got {})",
                out.display()
            )));
        }
        let hf = ExportOptions {
            bf16: opts.bf16,
            orthogonalize,
        };
        return Ok(VersionReport::Hf(export_hf_dir(&src, out, &hf)?));
    }
    if opts.bf16 {
        return Err(Error::InvalidValue(
            "--bf16 is for HF directory outputs; for a GGUF copy use --requantize f16".into(),
        ));
    }
    let cfg = open(
        &src,
        &LoadOptions {
            dtype: DTypeMode::Q,
            device: candle_core::Device::Cpu,
        },
    )?
    .config;
    let plan_src = PlanSource {
        add: opts.bake_add.clone(),
        ..Default::default()
    };
    let biases = match load_plan(&plan_src, cfg.n_layers, cfg.d_model)? {
        Some(plan) => bake_biases(&plan, cfg.d_model)?,
        None => Default::default(),
    };
    let spec = BakeSpec {
        biases,
        orthogonalize,
        requantize: opts
            .requantize
            .as_deref()
            .map(parse_block_type)
            .transpose()?,
        record: serde_json::json!({
            "source": src.describe(),
            "bake_add": opts.bake_add,
            "orthogonalize": opts.orthogonalize,
            "requantize": opts.requantize,
        }),
    };
    if spec.biases.is_empty() && spec.orthogonalize.is_none() && spec.requantize.is_none() {
        return Err(Error::InvalidValue(
            "nothing to change: give --bake-add, --orthogonalize or --requantize (a plain copy is the file itself)".into(),
        ));
    }
    Ok(VersionReport::Gguf(export_gguf(&src, out, &spec)?))
}
