//! One weight-loading abstraction over GGUF and safetensors, so the decoder never knows where its
//! tensors come from. Names are GGUF-style (`blk.3.attn_q.weight`); safetensors names are mapped.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::limits::check_safetensors_at;
pub use super::limits::{check_safetensors_bytes, SafetensorsSummary};
use crate::kernels::CompactQMatrix;
use crate::{Error, Result};

/// Numeric mode of the weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeMode {
    /// Weights dequantized to f32, activations f32: the reference mode the fixtures are checked in.
    F32,
    Bf16,
    F16,
    /// Quantized matmuls (GGUF block types as stored; safetensors quantized to Q8_0), f32 activations:
    /// the fast CPU mode.
    #[default]
    Q,
}

impl DTypeMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "q" | "quant" | "quantized" => Ok(Self::Q),
            other => Err(Error::InvalidValue(format!(
                "unknown dtype '{other}' (expected f32, bf16, f16 or q)"
            ))),
        }
    }

    /// dtype of activations (and of dense weights).
    pub fn activation_dtype(&self) -> DType {
        match self {
            Self::F32 | Self::Q => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Q => "q",
        }
    }
}

/// A linear layer `y = x W^T (+ b)` whose weight is dense or block-quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// On CPU, the quantized weight's blocks read in place by [`crate::kernels`]: faster than
    /// candle's kernels for a few activation rows (decode), so `forward` uses it up to
    /// [`CompactQMatrix::max_rows`] rows. Shares the `QTensor`'s memory.
    compact: Option<CompactQMatrix>,
    bias: Option<Tensor>,
    pub out_features: usize,
    pub in_features: usize,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(Tensor),
    Quant(QMatMul),
}

impl Linear {
    /// Apply to `x` of shape `[..., in_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// [`Self::forward`] with every row computed the same way whatever the number of rows, so a
    /// row's result does not depend on the batch it is in (see [`crate::kernels::attention`] for
    /// why audits need that). Quantized weights with compact kernels use them for any row count
    /// (their per-row sums are independent of the other rows); anything else goes one row at a
    /// time through the one-row path. Prefill pays for it (BENCHMARKS.md), decode barely.
    pub fn forward_batch_invariant(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    /// Flatten to `[m, k]`, multiply (kernel chosen by row count, or batch-invariantly), add the
    /// bias, restore the leading dims.
    fn apply(&self, x: &Tensor, batch_invariant: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let m: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((m, k))?;
        let y = match (&self.weight, &self.compact) {
            (_, Some(c))
                if x2.dtype() == DType::F32 && (batch_invariant || m <= compact_rows(c)) =>
            {
                x2.contiguous()?.apply_op1_no_bwd(c)?
            }
            _ if batch_invariant && m > 1 => {
                let rows = (0..m)
                    .map(|i| self.matmul(&x2.narrow(0, i, 1)?))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
            _ => self.matmul(&x2)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.out_features;
        Ok(y.reshape(out)?)
    }

    /// `x2 W^T` with candle's kernels (dense GEMM or quantized matmul).
    fn matmul(&self, x2: &Tensor) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Dense(w) => x2.matmul(&w.t()?)?,
            LinearWeight::Quant(q) => q.forward(x2)?,
        })
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quant(QMatMul::QTensor(_)))
    }

    /// One layer computing `parts` side by side (outputs concatenated in order), when every part is
    /// dense with the same input width: one GEMM instead of several reads the same bytes but keeps the
    /// GPU's memory system busier (a step's small K/V projections are far from peak bandwidth on their
    /// own) and issues fewer kernels. `None` for quantized parts, which keep their own kernels.
    pub fn fuse(parts: &[&Linear]) -> Result<Option<Linear>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let mut ws = Vec::with_capacity(parts.len());
        for p in parts {
            match (&p.weight, &p.compact) {
                (LinearWeight::Dense(w), None) if p.in_features == first.in_features => {
                    ws.push(w.clone())
                }
                _ => return Ok(None),
            }
        }
        let weight = Tensor::cat(&ws, 0)?;
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            let mut bs = Vec::with_capacity(parts.len());
            for p in parts {
                bs.push(match &p.bias {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(p.out_features, weight.dtype(), weight.device())?,
                });
            }
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Some(Linear {
            weight: LinearWeight::Dense(weight),
            compact: None,
            bias,
            out_features: parts.iter().map(|p| p.out_features).sum(),
            in_features: first.in_features,
        }))
    }
}

/// The compact-kernel view of a CPU quantized weight, when its block type has one.
fn compact_of(w: &LinearWeight) -> Option<CompactQMatrix> {
    match w {
        LinearWeight::Quant(QMatMul::QTensor(q)) => CompactQMatrix::from_qtensor(q.clone()),
        _ => None,
    }
}

/// Where tensors come from.
pub enum WeightFile {
    Gguf(GgufWeights),
    Safetensors(SafetensorsWeights),
}

pub struct GgufWeights {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: Mutex<File>,
}

pub struct SafetensorsWeights {
    pub files: Vec<PathBuf>,
    mmaps: Vec<memmap2::Mmap>,
    /// HF tensor name -> (file index)
    index: HashMap<String, usize>,
    /// Add this to every RMSNorm weight: HF gemma stores `w` and computes `x * (1 + w)`; GGUF already
    /// stores `1 + w`.
    pub norm_offset: f32,
    /// Prefix of decoder tensors (`model.` or `language_model.model.`).
    prefix: String,
}

impl GgufWeights {
    /// Read a GGUF header through [`super::gguf_check::read_content`] (bounded pass, candle's
    /// parser, every tensor's bytes inside the file), so a truncated download or a crafted header
    /// fails here with a clear message instead of midway through loading, or in a panic.
    pub fn open(path: &Path) -> Result<Self> {
        super::source::require_regular_file(path)?;
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = super::gguf_check::read_content(&mut BufReader::new(&mut file), path)?;
        Ok(Self {
            path: path.into(),
            content,
            file: Mutex::new(file),
        })
    }

    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::MissingTensor(name.into()));
        }
        let mut f = self
            .file
            .lock()
            .map_err(|_| Error::InvalidValue("poisoned file lock".into()))?;
        self.content
            .tensor(&mut *f, name, device)
            .map_err(|e| Error::CorruptModel {
                path: self.path.clone(),
                reason: format!("reading tensor '{name}': {e}"),
            })
    }
}

/// Block types whose CPU dot product in candle is scalar-only.
fn lacks_fast_cpu_kernel(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

impl SafetensorsWeights {
    pub fn open(files: &[PathBuf], norm_offset: f32) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::MissingTensor("no .safetensors files".into()));
        }
        let mut mmaps = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in files.iter().enumerate() {
            super::source::require_regular_file(p)?;
            let f = File::open(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: the file is opened read-only and the mapping lives as long as `self`; a
            // concurrent truncation by another process is outside what any loader can defend against.
            let mm = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(p, e))?;
            let summary = check_safetensors_at(p, &mm)?;
            for name in summary.names {
                index.insert(name, i);
            }
            mmaps.push(mm);
        }
        let prefix = if index.keys().any(|k| k.starts_with("language_model.model.")) {
            "language_model.model.".to_string()
        } else {
            "model.".to_string()
        };
        Ok(Self {
            files: files.to_vec(),
            mmaps,
            index,
            norm_offset,
            prefix,
        })
    }

    fn hf_name(&self, gguf: &str, sandwich: bool) -> String {
        hf_name(&self.prefix, gguf, sandwich)
    }

    fn load(&self, hf: &str, device: &Device) -> Result<Tensor> {
        let i = *self
            .index
            .get(hf)
            .ok_or_else(|| Error::MissingTensor(hf.into()))?;
        let st = safetensors::SafeTensors::deserialize(&self.mmaps[i]).map_err(|e| {
            Error::CorruptModel {
                path: self.files[i].clone(),
                reason: e.to_string(),
            }
        })?;
        let view = st.tensor(hf).map_err(|e| Error::CorruptModel {
            path: self.files[i].clone(),
            reason: format!("tensor '{hf}': {e}"),
        })?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::Unsupported(format!(
                    "safetensors dtype {other:?} in tensor '{hf}'"
                )))
            }
        };
        Ok(Tensor::from_raw_buffer(
            view.data(),
            dtype,
            view.shape(),
            device,
        )?)
    }
}

/// Map a GGUF-style tensor name to its Hugging Face name (`prefix` is `model.` for text models).
/// `sandwich` (gemma) changes what `ffn_norm` is called.
pub fn hf_name(p: &str, gguf: &str, sandwich: bool) -> String {
    match gguf {
        "token_embd.weight" => return format!("{p}embed_tokens.weight"),
        "output_norm.weight" => return format!("{p}norm.weight"),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    if let Some(rest) = gguf.strip_prefix("blk.") {
        if let Some((layer, tail)) = rest.split_once('.') {
            let (stem, kind) = tail.rsplit_once('.').unwrap_or((tail, "weight"));
            let hf = match stem {
                "attn_norm" => "input_layernorm",
                "ffn_norm" if sandwich => "pre_feedforward_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "post_attention_norm" => "post_attention_layernorm",
                "post_ffw_norm" => "post_feedforward_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                other => other,
            };
            return format!("{p}layers.{layer}.{hf}.{kind}");
        }
    }
    gguf.to_string()
}

/// Loads tensors in the representation a [`DTypeMode`] asks for.
pub struct WeightLoader {
    pub file: WeightFile,
    pub mode: DTypeMode,
    pub device: Device,
    /// gemma-style sandwich norms change which HF name `ffn_norm` maps to.
    pub sandwich: bool,
}

impl WeightLoader {
    pub fn has(&self, name: &str) -> bool {
        match &self.file {
            WeightFile::Gguf(g) => g.content.tensor_infos.contains_key(name),
            WeightFile::Safetensors(s) => s.index.contains_key(&s.hf_name(name, self.sandwich)),
        }
    }

    /// A dense tensor in the activation dtype (norm weights, biases, dense embeddings).
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        let dt = self.mode.activation_dtype();
        let t = match &self.file {
            WeightFile::Gguf(g) => g.qtensor(name, &self.device)?.dequantize(&self.device)?,
            WeightFile::Safetensors(s) => s.load(&s.hf_name(name, self.sandwich), &self.device)?,
        };
        Ok(t.to_dtype(dt)?)
    }

    /// An RMSNorm weight, with the family's offset applied (see [`SafetensorsWeights::norm_offset`]).
    pub fn norm(&self, name: &str) -> Result<Tensor> {
        let t = self.dense(name)?;
        match &self.file {
            WeightFile::Safetensors(s) if s.norm_offset != 0.0 => Ok((t + s.norm_offset as f64)?),
            _ => Ok(t),
        }
    }

    /// A linear layer; `bias` is loaded when present.
    pub fn linear(&self, weight: &str, bias: Option<&str>) -> Result<Linear> {
        let w = self.matrix(weight)?;
        let bias = match bias {
            Some(b) if self.has(b) => Some(self.dense(b)?),
            _ => None,
        };
        let (out_features, in_features) = match &w {
            LinearWeight::Dense(t) => t.dims2()?,
            LinearWeight::Quant(QMatMul::QTensor(q)) => q.shape().dims2()?,
            LinearWeight::Quant(QMatMul::Tensor(t))
            | LinearWeight::Quant(QMatMul::TensorF16(t)) => t.dims2()?,
        };
        Ok(Linear {
            compact: compact_of(&w),
            weight: w,
            bias,
            out_features,
            in_features,
        })
    }

    fn matrix(&self, name: &str) -> Result<LinearWeight> {
        match (&self.file, self.mode) {
            (WeightFile::Gguf(g), DTypeMode::Q) => {
                let q = g.qtensor(name, &self.device)?;
                let q = if self.device.is_cpu() && lacks_fast_cpu_kernel(q.dtype()) {
                    // candle has only scalar dot products for these legacy block types; Q8_0 holds
                    // their values almost exactly and runs on SIMD kernels (4-10x faster).
                    QTensor::quantize(&q.dequantize(&self.device)?, GgmlDType::Q8_0)?
                } else {
                    q
                };
                Ok(LinearWeight::Quant(QMatMul::from_arc(Arc::new(q))?))
            }
            (WeightFile::Safetensors(_), DTypeMode::Q) => {
                let t = self.dense_f32(name)?;
                let (_, k) = t.dims2()?;
                if k % 32 != 0 {
                    return Ok(LinearWeight::Dense(t));
                }
                let q = QTensor::quantize(&t, GgmlDType::Q8_0)?;
                Ok(LinearWeight::Quant(QMatMul::from_arc(Arc::new(q))?))
            }
            _ => Ok(LinearWeight::Dense(self.dense(name)?)),
        }
    }

    /// A tensor dequantized to f32 as stored (no norm offset).
    pub fn dense_f32(&self, name: &str) -> Result<Tensor> {
        Ok(match &self.file {
            WeightFile::Gguf(g) => g.qtensor(name, &self.device)?.dequantize(&self.device)?,
            WeightFile::Safetensors(s) => s
                .load(&s.hf_name(name, self.sandwich), &self.device)?
                .to_dtype(DType::F32)?,
        })
    }

    /// The token embedding table and, when tied, a linear layer sharing it. In `q` mode a GGUF
    /// quantized table stays quantized (rows are dequantized on lookup).
    pub fn embedding(&self, name: &str) -> Result<Embedding> {
        match (&self.file, self.mode) {
            (WeightFile::Gguf(g), DTypeMode::Q) => {
                let q = Arc::new(g.qtensor(name, &self.device)?);
                let (vocab, d) = q.shape().dims2()?;
                if q.dtype() == GgmlDType::F32 || q.dtype() == GgmlDType::F16 {
                    let t = q.dequantize(&self.device)?;
                    return Ok(Embedding {
                        table: EmbTable::Dense(t),
                        vocab,
                        d,
                    });
                }
                Ok(Embedding {
                    table: EmbTable::Quant(q),
                    vocab,
                    d,
                })
            }
            _ => {
                let t = self.dense(name)?;
                let (vocab, d) = t.dims2()?;
                Ok(Embedding {
                    table: EmbTable::Dense(t),
                    vocab,
                    d,
                })
            }
        }
    }
}

/// Token embedding table.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: EmbTable,
    pub vocab: usize,
    pub d: usize,
}

#[derive(Debug, Clone)]
enum EmbTable {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Embedding {
    /// Rows for `ids` (`[b, t]` u32) as `[b, t, d]` in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = match &self.table {
            EmbTable::Dense(w) => w.index_select(&flat, 0)?,
            EmbTable::Quant(q) => q.embedding(&flat)?,
        };
        Ok(rows.reshape((b, t, self.d))?.to_dtype(dtype)?)
    }

    /// The tied output projection (`logits = h E^T`).
    pub fn as_linear(&self) -> Result<Linear> {
        let weight = match &self.table {
            EmbTable::Dense(w) => LinearWeight::Dense(w.clone()),
            EmbTable::Quant(q) => LinearWeight::Quant(QMatMul::from_arc(q.clone())?),
        };
        Ok(Linear {
            compact: compact_of(&weight),
            weight,
            bias: None,
            out_features: self.vocab,
            in_features: self.d,
        })
    }
}

/// Up to this many activation rows every quantized matmul takes the compact kernels, also where
/// candle's tiles are faster on an idle machine (Q4_K past 8 rows, Q6_K past 4, Q8_0 with
/// AVX512-VNNI). Why: candle's thread pool waits for its workers in spin loops, so while another
/// process holds a core, a batch-16 decode of q15 with 2 threads ran at 0.42x of one thread, while
/// the compact kernels' pool sleeps and its governor goes inline (0.96x; BENCHMARKS.md, issue 18).
/// The price on an idle machine: 9% at batch 16 (104.0 -> 94.5 tok/s on 2 cores). Candle's lead
/// grows with the rows (17% at 32), so larger batches keep candle and its behaviour under load.
const LOAD_SAFE_ROWS: usize = 16;

/// The most rows `c` takes the compact kernels for: [`LOAD_SAFE_ROWS`] or more where they are
/// faster anyway; `PGATE_COMPACT_ROWS=N` overrides (for measuring either side).
fn compact_rows(c: &crate::kernels::CompactQMatrix) -> usize {
    static V: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let o = *V.get_or_init(|| {
        std::env::var("PGATE_COMPACT_ROWS")
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    o.unwrap_or(c.max_rows().max(LOAD_SAFE_ROWS))
}
