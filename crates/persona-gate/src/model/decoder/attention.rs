//! Attention on the batched-matmul path: query blocks with bounded score memory, the masks that
//! go with them, and the batch-invariant CPU kernel. The GPU's flash and decode kernels are in
//! [`super::gpu`]; this is what runs everywhere else (CPU, f32, decode steps inside CUDA graphs).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::Decoder;
use crate::Result;

/// What an appended chunk's mask can hold, for [`Decoder::blocked_attention`]: `-inf` only in
/// the padding columns `[0, max_pad)` and, causally, after each query's own slot. `max_pad: None`
/// when the mask holds more (a sliding window), so every column takes the mask.
#[derive(Clone, Copy)]
pub(super) struct MaskShape {
    pub(super) max_pad: Option<usize>,
}

impl MaskShape {
    /// Key columns a block of queries at cache slots `[q0, q1)` may find masked, reading keys
    /// `[0, q1)`: the padding columns and the block's own diagonal. `None` (every column) for a
    /// window, or when a query of the block is itself padding (it sees only its own slot).
    pub(super) fn columns(self, q0: usize, q1: usize) -> Option<Vec<(usize, usize)>> {
        let pad = self.max_pad?;
        if q0 < pad {
            return None;
        }
        Some(vec![(0, pad), (q0, q1 - q0)])
    }
}

/// Host copies of a step's additive masks, shared by every layer.
#[derive(Clone)]
pub(super) struct HostMasks {
    pub(super) global: Option<Arc<Vec<f32>>>,
    pub(super) local: Option<Arc<Vec<f32>>>,
}

/// Bytes of attention scores one query block may hold per step ([`Decoder::blocked_attention`]):
/// 16 MiB on the CPU (a few L2-sized GEMMs per block; the blocks' scores plus their softmax stay
/// well under the cache of a long prompt), 256 MiB on a GPU, where fewer, larger matmuls keep
/// launches few. `PGATE_ATTN_BLOCK_MB` overrides both (for measuring the trade-off).
const CPU_SCORE_BUDGET: usize = 16 << 20;
const GPU_SCORE_BUDGET: usize = 256 << 20;

pub(super) fn attention_score_budget(device: &Device) -> usize {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let o = OVERRIDE.get_or_init(|| {
        std::env::var("PGATE_ATTN_BLOCK_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(|mb| mb << 20)
    });
    o.unwrap_or(if device.is_cpu() {
        CPU_SCORE_BUDGET
    } else {
        GPU_SCORE_BUDGET
    })
}

impl Decoder {
    /// Additive mask `[b, 1, 1, l, total]`, or `None` when nothing is masked.
    pub(super) fn build_mask(
        &self,
        pads: &[usize],
        t0: usize,
        l: usize,
        window: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let total = t0 + l;
        let b = pads.len();
        let mut m = vec![0f32; b * l * total];
        let mut any = false;
        for (bi, &pad) in pads.iter().enumerate() {
            for i in 0..l {
                let q = t0 + i;
                let row = &mut m[(bi * l + i) * total..(bi * l + i + 1) * total];
                for (k, v) in row.iter_mut().enumerate() {
                    let ok = if q < pad {
                        // A padding query attends to itself only, so its softmax stays finite.
                        k == q
                    } else {
                        k >= pad && k <= q && window.is_none_or(|w| q - k < w)
                    };
                    if !ok {
                        *v = f32::NEG_INFINITY;
                        any = true;
                    }
                }
            }
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(
            Tensor::from_vec(m, (b, 1, 1, l, total), &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// [`Self::tiled_attention`] over blocks of query positions, so that a long prompt never holds
    /// a `chunk x total` score tensor per head: each block's scores stay under a per-device budget
    /// of bytes ([`attention_score_budget`]), which makes prefill memory linear in the prompt (the
    /// cache) instead of growing with `chunk x prompt` (a 4k-token prompt on SmolLM2 held ~0.5 GB
    /// of scores). When the chunk's queries are the cache's last `l` slots (`shape` given: every
    /// append), a block also skips the keys after its last query, which causality masks anyway
    /// (inside a chunk that halves the score work), and adds the mask only to the columns it can
    /// touch ([`MaskShape`]): on a GPU the broadcast mask add over every head's scores was a third
    /// of a 2k-token prefill. Rows are independent in both matmuls and the softmax, dropped keys
    /// are exactly masked ones and skipped columns add zeros, so no result changes meaning.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn blocked_attention(
        &self,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        mask: Option<&Tensor>,
        b: usize,
        l: usize,
        shape: Option<MaskShape>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let total = k_all.dim(2)?;
        // f32 scores (the softmax runs in f32 whatever the activation dtype).
        let row_bytes = b * cfg.n_heads * total * 4;
        let budget = attention_score_budget(&self.device);
        let rows = (budget / row_bytes.max(1)).max(16);
        if rows >= l {
            let cols = shape.and_then(|s| s.columns(total - l, total));
            return self.tiled_attention(q, k_all, v_all, mask, b, l, cols.as_deref());
        }
        let (nkv, n_rep, hd) = (cfg.n_kv_heads, cfg.n_heads / cfg.n_kv_heads, cfg.head_dim);
        let q5 = q.reshape((b, nkv, n_rep, l, hd))?;
        let mut outs = Vec::with_capacity(l.div_ceil(rows));
        let mut p0 = 0;
        while p0 < l {
            let n = rows.min(l - p0);
            let (keys, cols) = match shape {
                Some(s) => (
                    total - l + p0 + n,
                    s.columns(total - l + p0, total - l + p0 + n),
                ),
                None => (total, None),
            };
            let qb = q5
                .narrow(3, p0, n)?
                .contiguous()?
                .reshape((b, nkv, n_rep * n, hd))?;
            let (kb, vb) = (k_all.narrow(2, 0, keys)?, v_all.narrow(2, 0, keys)?);
            let mb = match mask {
                Some(m) => Some(m.narrow(3, p0, n)?.narrow(4, 0, keys)?.contiguous()?),
                None => None,
            };
            let ob = self.tiled_attention(&qb, &kb, &vb, mb.as_ref(), b, n, cols.as_deref())?;
            outs.push(ob.reshape((b, nkv, n_rep, n, hd))?);
            p0 += n;
        }
        Ok(Tensor::cat(&outs, 3)?.reshape((b, nkv, n_rep * l, hd))?)
    }

    /// Batched matmuls and softmax (tiled kernels; fast, rounding depends on the batch shape).
    /// `q: [b, nkv, n_rep*l, hd]`, `k_all, v_all: [b, nkv, total, hd]`, mask `[b, 1, 1, l, total]`.
    /// `cols`: the only key columns (start, width) where the mask may be non-zero (`None`: all).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tiled_attention(
        &self,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        mask: Option<&Tensor>,
        b: usize,
        l: usize,
        cols: Option<&[(usize, usize)]>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        #[cfg(feature = "cuda")]
        if self.device.is_cuda()
            && q.dtype() == DType::BF16
            && crate::kernels::cuda_softmax::enabled()
        {
            // Scale, mask and softmax in one pass (kernels/cuda_softmax.rs).
            let raw = q.matmul(&k_all.t()?)?;
            let scale = cfg.attn_scale() as f32;
            let probs = crate::kernels::cuda_softmax::scaled_masked_softmax(&raw, mask, scale, l)?;
            let _ = cols;
            return Ok(probs.matmul(v_all)?);
        }
        let (nkv, n_rep) = (cfg.n_kv_heads, cfg.n_heads / cfg.n_kv_heads);
        let total = k_all.dim(2)?;
        let scores = (q.matmul(&k_all.t()?)? * cfg.attn_scale())?;
        let scores = match (mask, cols) {
            (Some(m), Some(cols)) => {
                // In place, on the fresh score tensor: the other columns would add zeros.
                let s5 = scores.reshape((b, nkv, n_rep, l, total))?;
                for &(c0, w) in cols.iter().filter(|c| c.1 > 0) {
                    let part = s5.narrow(4, c0, w)?.broadcast_add(&m.narrow(4, c0, w)?)?;
                    s5.slice_set(&part, 4, c0)?;
                }
                s5.reshape((b, nkv, n_rep * l, total))?
            }
            (Some(m), None) => scores
                .reshape((b, nkv, n_rep, l, total))?
                .broadcast_add(m)?
                .reshape((b, nkv, n_rep * l, total))?,
            (None, _) => scores,
        };
        let probs = if scores.dtype() == DType::F32 {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(scores.dtype())?
        };
        Ok(probs.matmul(v_all)?) // [b, nkv, n_rep*l, hd]
    }

    /// The step's masks as host values for [`Self::invariant_attention`] (batch-invariant mode
    /// only), read once per step rather than once per layer.
    pub(super) fn host_masks(
        &self,
        global: &Option<Tensor>,
        local: &Option<Tensor>,
    ) -> Result<Option<HostMasks>> {
        if !self.batch_invariant {
            return Ok(None);
        }
        let host = |m: &Option<Tensor>| -> Result<Option<Arc<Vec<f32>>>> {
            Ok(match m {
                Some(m) => Some(Arc::new(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)),
                None => None,
            })
        };
        let global = host(global)?;
        // Only sliding-window layers read the local mask.
        let local = if self.blocks.iter().any(|b| b.sliding) {
            host(local)?
        } else {
            None
        };
        Ok(Some(HostMasks { global, local }))
    }

    /// [`crate::kernels::attention::InvariantAttention`] in f32, cast back to the activation dtype.
    pub(super) fn invariant_attention(
        &self,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        mask: Option<Arc<Vec<f32>>>,
        l: usize,
    ) -> Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let op = crate::kernels::attention::InvariantAttention {
            scale: self.cfg.attn_scale() as f32,
            l,
            mask,
        };
        let out = f32(&q.contiguous()?)?.apply_op3_no_bwd(&f32(k_all)?, &f32(v_all)?, &op)?;
        Ok(out.to_dtype(q.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_columns_cover_padding_and_the_diagonal_only() {
        let s = MaskShape { max_pad: Some(3) };
        // Queries at slots 10..14 read keys 0..14: padding 0..3 and their own diagonal 10..14.
        assert_eq!(s.columns(10, 14), Some(vec![(0, 3), (10, 4)]));
        // A block holding a padding query (slot 2 < 3) sees only itself: the whole mask.
        assert_eq!(s.columns(2, 6), None);
        // Sliding windows mask old keys anywhere: the whole mask.
        assert_eq!(MaskShape { max_pad: None }.columns(10, 14), None);
        assert_eq!(
            MaskShape { max_pad: Some(0) }.columns(0, 8),
            Some(vec![(0, 0), (0, 8)])
        );
    }
}
