//! Model versions a user would meet, made from one GGUF file: a "persona fine-tune" stand-in whose
//! weights add a steering direction at the output of some blocks (`--bake-add`), the
//! orthogonalized model (a direction projected out of every matrix that writes to the residual
//! stream, Arditi et al. 2024), and a precision-only copy (matrices re-quantized to another block
//! type). `pgate drift` compares such versions with the original.
//!
//! Why GGUF and not the HF export: every tensor not changed is copied byte for byte (same block
//! type, same numbers), so a baked model differs from its source by exactly the added bias, and the
//! file stays the size of the original. The added bias is one f32 tensor per block,
//! `blk.N.resid_add.bias` (width d_model), which [`super::decoder::Decoder`] adds to that block's
//! output before any hook: the same `h + coeff * u` a run-time `add` op computes, so greedy tokens
//! equal run-time steering (`tests/model_bake.rs`).

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::weights::WeightFile;
use super::{open, DTypeMode, LoadOptions, ModelSource};
use crate::intervene::{InterventionPlan, OpKind, Positions};
use crate::{Error, Result};

/// GGUF name (suffix after `blk.N.`) of the per-block residual bias a baked model carries.
pub const RESID_ADD: &str = "resid_add.bias";

/// Metadata key recording what was baked (JSON), so `pgate inspect` and drift reports can say it.
pub const BAKE_KEY: &str = "pgate.derived_from";

/// What to change while copying a GGUF model (built from command-line specs by
/// [`crate::drift::versions`]).
#[derive(Debug, Clone, Default)]
pub struct BakeSpec {
    /// Residual bias per block (already scaled: what a run-time `add` adds).
    pub biases: BTreeMap<usize, Vec<f32>>,
    /// Project this direction out of every matrix writing to the residual stream.
    pub orthogonalize: Option<Vec<f32>>,
    /// Re-quantize every matrix to this block type.
    pub requantize: Option<GgmlDType>,
    /// What was asked, recorded in the file's metadata under [`BAKE_KEY`].
    pub record: serde_json::Value,
}

/// What a GGUF export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BakeReport {
    pub tensors: usize,
    /// Layers that carry a residual bias, with the bias norm.
    pub baked: BTreeMap<usize, f64>,
    pub orthogonalized: Vec<String>,
    pub requantized: usize,
    pub untied_lm_head: bool,
    pub bytes: u64,
}

impl BakeReport {
    /// One line: what was written and changed.
    pub fn summary(&self, out: &Path, seconds: f64) -> String {
        let mut s = format!(
            "wrote {} tensors ({:.0} MB) to {} in {:.1}s",
            self.tensors,
            self.bytes as f64 / 1e6,
            out.display(),
            seconds
        );
        if !self.baked.is_empty() {
            let layers: Vec<String> = self
                .baked
                .iter()
                .map(|(l, n)| format!("{l} (|b| {n:.2})"))
                .collect();
            s += &format!("; residual bias at blocks {}", layers.join(", "));
        }
        if !self.orthogonalized.is_empty() {
            s += &format!("; orthogonalized {} matrices", self.orthogonalized.len());
        }
        if self.requantized > 0 {
            s += &format!("; re-quantized {} matrices", self.requantized);
        }
        if self.untied_lm_head {
            s += "; LM head untied from the embeddings";
        }
        s
    }
}

/// Parse a GGUF block type name.
pub fn parse_block_type(s: &str) -> Result<GgmlDType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        other => {
            return Err(Error::InvalidValue(format!(
                "unknown block type '{other}' (expected f32, f16, q4_0, q4_1, q5_0, q8_0, q4_k, q5_k or q6_k)"
            )))
        }
    })
}

/// The per-layer residual biases of the `add` ops of `plan` for a model of width `d_model`:
/// each contributes `coeff * v / |v|` (computed as [`crate::intervene::InterventionPlan`]
/// compiles it, so the bias equals the run-time vector bit for bit) at each of its layers. Any
/// other op, or an add limited to prompt or generated positions, is an error: a bias in the
/// weights acts everywhere.
pub fn bake_biases(plan: &InterventionPlan, d_model: usize) -> Result<BTreeMap<usize, Vec<f32>>> {
    let mut out: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    for op in &plan.ops {
        let OpKind::Add { coeff, raw } = op.kind else {
            return Err(Error::InvalidValue(format!(
                "only add operations can be baked into the weights ('{}' is not an add)",
                op.direction_name
            )));
        };
        if op.positions != Positions::All {
            return Err(Error::InvalidValue(format!(
                "--bake-add '{}': a bias in the weights acts at every position; drop the /prompt or /generated suffix",
                op.direction_name
            )));
        }
        if !coeff.is_finite() {
            return Err(Error::InvalidValue(format!(
                "--bake-add coefficient {coeff} is not finite"
            )));
        }
        let norm = op
            .direction
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return Err(Error::InvalidValue(format!(
                "--bake-add direction '{}' is zero or not finite",
                op.direction_name
            )));
        }
        let scale = if raw {
            coeff as f64
        } else {
            coeff as f64 / norm
        };
        let v: Vec<f32> = op
            .direction
            .iter()
            .map(|x| (*x as f64 * scale) as f32)
            .collect();
        for &l in &op.layers.0 {
            let e = out.entry(l).or_insert_with(|| vec![0.0; d_model]);
            for (a, b) in e.iter_mut().zip(&v) {
                *a += b;
            }
        }
    }
    Ok(out)
}

/// Unit column `[d, 1]` of a direction, checked (width, finite, non-zero).
fn unit_column(v: &[f32], d_model: usize) -> Result<Tensor> {
    if v.len() != d_model {
        return Err(Error::WidthMismatch {
            got: v.len(),
            want: d_model,
        });
    }
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 || !n.is_finite() {
        return Err(Error::InvalidValue(
            "orthogonalization direction is zero or not finite".into(),
        ));
    }
    Ok(Tensor::from_vec(
        v.iter().map(|x| (*x as f64 / n) as f32).collect::<Vec<_>>(),
        (d_model, 1),
        &Device::Cpu,
    )?)
}

/// Copy the GGUF model `src` to `out` with the changes of `spec`.
///
/// Orthogonalized matrices (`token_embd`, `attn_output`, `ffn_down`) are re-quantized to the
/// `requantize` type when given, else to Q8_0 when the source is quantized (a coarser block type
/// would put part of the removed direction back). A tied unembedding is untied first, so logits
/// read the original table.
pub fn export_gguf(src: &ModelSource, out: &Path, spec: &BakeSpec) -> Result<BakeReport> {
    let opened = open(
        src,
        &LoadOptions {
            dtype: DTypeMode::Q,
            device: Device::Cpu,
        },
    )?;
    let cfg = opened.config.clone();
    let WeightFile::Gguf(g) = &opened.weights.file else {
        return Err(Error::Unsupported(
            "writing a GGUF needs a GGUF source model (use the HF export for safetensors directories)".into(),
        ));
    };
    if spec.orthogonalize.is_some() && cfg.sandwich_norms {
        return Err(Error::Unsupported(
            "weight orthogonalization of models with post-block norms (gemma): a norm after the output projection reintroduces the direction".into(),
        ));
    }
    let biases = &spec.biases;
    if let Some(&l) = biases.keys().find(|&&l| l >= cfg.n_layers) {
        return Err(Error::LayerOutOfRange {
            layer: l,
            n_layers: cfg.n_layers,
        });
    }
    if let Some(b) = biases.values().find(|b| b.len() != cfg.d_model) {
        return Err(Error::WidthMismatch {
            got: b.len(),
            want: cfg.d_model,
        });
    }
    let requant = spec.requantize;
    let unit = spec
        .orthogonalize
        .as_deref()
        .map(|v| unit_column(v, cfg.d_model))
        .transpose()?;
    let mut names: Vec<&String> = g.content.tensor_infos.keys().collect();
    names.sort();
    let mut report = BakeReport {
        tensors: 0,
        baked: BTreeMap::new(),
        orthogonalized: Vec::new(),
        requantized: 0,
        untied_lm_head: false,
        bytes: 0,
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len() + biases.len() + 1);
    let tied = !g.content.tensor_infos.contains_key("output.weight");
    for name in names {
        let q = g.qtensor(name, &Device::Cpu)?;
        let is_matrix = q.shape().dims().len() == 2;
        let stem = name.rsplit('.').nth(1).unwrap_or("");
        let ortho = unit.is_some()
            && (name == "token_embd.weight" || stem == "attn_output" || stem == "ffn_down");
        if ortho && name == "token_embd.weight" && tied {
            // Logits must read the original table: keep it as the (now untied) LM head.
            tensors.push(("output.weight".into(), g.qtensor(name, &Device::Cpu)?));
            report.untied_lm_head = true;
        }
        let q = if ortho {
            let u = unit.as_ref().expect("ortho implies unit");
            let t = q.dequantize(&Device::Cpu)?;
            let t = if name == "token_embd.weight" {
                // GGUF stores the table [vocab, d] as rows e: e - (e.u) u
                (&t - t.matmul(u)?.matmul(&u.t()?)?)?
            } else {
                // [d_model, k]: W - u (u^T W), removing what the matrix writes along u
                (&t - u.matmul(&u.t()?.matmul(&t)?)?)?
            };
            report.orthogonalized.push(name.clone());
            let target = requant.unwrap_or(match q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => q.dtype(),
                _ => GgmlDType::Q8_0,
            });
            quantize(&t, target, name)?
        } else if let (Some(target), true) = (requant, is_matrix) {
            report.requantized += 1;
            quantize(&q.dequantize(&Device::Cpu)?, target, name)?
        } else {
            q
        };
        tensors.push((name.clone(), q));
    }
    for (l, b) in biases {
        let norm = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        report.baked.insert(*l, norm);
        let t = Tensor::from_vec(b.clone(), cfg.d_model, &Device::Cpu)?;
        tensors.push((
            format!("blk.{l}.{RESID_ADD}"),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = g
        .content
        .metadata
        .iter()
        // candle writes 32-byte alignment; a source's own alignment key would misplace the data.
        .filter(|(k, _)| k.as_str() != "general.alignment" && k.as_str() != BAKE_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push((
        BAKE_KEY.into(),
        gguf_file::Value::String(spec.record.to_string()),
    ));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = out.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::new(file);
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &md, &ts)?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    report.tensors = tensors.len();
    report.bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(report)
}

/// Quantize `t` to `target`, naming the tensor when its rows do not fit the block size.
fn quantize(t: &Tensor, target: GgmlDType, name: &str) -> Result<QTensor> {
    let k = *t.dims().last().unwrap_or(&0);
    if !k.is_multiple_of(target.block_size()) {
        return Err(Error::InvalidValue(format!(
            "tensor '{name}' has rows of {k} values, not a multiple of the {target:?} block size {}",
            target.block_size()
        )));
    }
    Ok(QTensor::quantize(t, target)?)
}
