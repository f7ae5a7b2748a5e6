//! The GPU kernel paths of a block (CUDA, bf16): prefill attention straight from the fused Q/K/V
//! projection through the flash kernel, and the opt-in decode kernel. Each returns `None` when its
//! kernel does not apply, and the block takes the batched path ([`super::attention`]).

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::Tensor;

use super::Decoder;
#[cfg(feature = "cuda")]
use super::{Block, KvCache, KvWrite, Linear, QkvProj, Rope, StepInputs};
use crate::Result;

impl Decoder {
    /// Attention of a prefill chunk straight from the fused Q/K/V projection, when the chunk runs
    /// the flash kernel and the block has no Q/K norms and "halves" rotary: Q rotated into its own
    /// tensor, K rotated and V copied straight into the cache (`kernels/cuda_rope.rs`), then the
    /// flash kernel. Returns `[b, l, nh * hd]`, or `None` for the general path.
    #[cfg(feature = "cuda")]
    pub(super) fn flash_from_fused(
        &self,
        li: usize,
        bl: &Block,
        xn: &Tensor,
        s: &StepInputs,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::cuda_rope;
        let (Some(pads), QkvProj::Fused(f), None) = (&s.pads_dev, &bl.qkv, &bl.q_norm) else {
            return Ok(None);
        };
        if !cuda_rope::enabled() {
            return Ok(None);
        }
        let (b, l, nh, hd) = (s.b, s.l, self.cfg.n_heads, self.cfg.head_dim);
        let (q, k_all, v_all) = self.fused_qkv_into_cache(li, f, bl, xn, s, cache)?;
        let attn = self.flash_over_cache(bl, &q, &k_all, &v_all, pads)?;
        Ok(Some(attn.reshape((b, l, nh * hd))?))
    }

    /// Q, K and V of a decode step (one token per row) straight from the fused Q/K/V projection:
    /// Q rotated into its own tensor, K rotated and V copied into each row's cache slot
    /// (`kernels/cuda_rope.rs`; appended, or at the fixed-slot step's device-side slots), in
    /// three launches instead of the general path's eight (three strided splits, two rotations,
    /// a transpose and two cache writes). Same conditions as [`Self::flash_from_fused`] plus bf16
    /// on CUDA and "halves" rotary. Returns `q` `[b, nh, 1, hd]` and the cache views, or `None`.
    #[cfg(feature = "cuda")]
    pub(super) fn decode_from_fused(
        &self,
        li: usize,
        bl: &Block,
        xn: &Tensor,
        s: &StepInputs,
        cache: &mut KvCache,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        use crate::kernels::cuda_rope;
        let (QkvProj::Fused(f), None) = (&bl.qkv, &bl.q_norm) else {
            return Ok(None);
        };
        let (rope, _) = self.rope_for(bl, s);
        if s.l != 1
            || rope.interleaved
            || !self.device.is_cuda()
            || self.dtype != DType::BF16
            || !cuda_rope::enabled()
        {
            return Ok(None);
        }
        let (q, k_all, v_all) = self.fused_qkv_into_cache(li, f, bl, xn, s, cache)?;
        Ok(Some((q.transpose(1, 2)?, k_all, v_all)))
    }

    /// From the fused Q/K/V projection `f` of `xn`: Q rotated into its own `[b, l, nh, hd]`
    /// tensor, K rotated and V copied into the cache (`kernels/cuda_rope.rs`), appended or at a
    /// fixed-slot step's device-side slots. Returns Q and the cache views `[b, nkv, slots, hd]`.
    #[cfg(feature = "cuda")]
    fn fused_qkv_into_cache(
        &self,
        li: usize,
        f: &Linear,
        bl: &Block,
        xn: &Tensor,
        s: &StepInputs,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        use crate::kernels::cuda_rope;
        let (_, (cos, sin)) = self.rope_for(bl, s);
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let y = self.linear(f, xn)?.contiguous()?;
        let part = |head0: usize, heads: usize, rot: bool| cuda_rope::Part {
            head0,
            heads,
            hd,
            rope: rot.then_some((cos, sin)),
        };
        let q = cuda_rope::rotate_new(&y, &part(0, nh, true))?;
        let (kp, vp) = (part(nh, nkv, true), part(nh + nkv, nkv, false));
        let (k_all, v_all) = match s.kv {
            KvWrite::Append => {
                let like = crate::model::kv_cache::Like {
                    b: s.b,
                    h: nkv,
                    d: hd,
                    dtype: y.dtype(),
                    device: y.device(),
                };
                cache.append_with(li, s.l, like, |ck, cv, t0| {
                    cuda_rope::scatter_into(ck, &y, &kp, t0)?;
                    cuda_rope::scatter_into(cv, &y, &vp, t0)?;
                    Ok(())
                })?
            }
            KvWrite::Fixed { slot_idx, view_len } => {
                cache.write_at_with(li, view_len, |ck, cv| {
                    cuda_rope::scatter_at(ck, &y, &kp, slot_idx)?;
                    cuda_rope::scatter_at(cv, &y, &vp, slot_idx)?;
                    Ok(())
                })?
            }
        };
        Ok((q, k_all, v_all))
    }

    /// The flash kernel over a cache the chunk was just appended to: `q` `[b, l, nh, hd]`
    /// (rotated), the block's window and the model's scale. Returns `[b, l, nh, hd]`.
    #[cfg(feature = "cuda")]
    fn flash_over_cache(
        &self,
        bl: &Block,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        pads: &Tensor,
    ) -> Result<Tensor> {
        let window = if bl.sliding {
            self.cfg.sliding_window.unwrap_or(0)
        } else {
            0
        };
        Ok(crate::kernels::cuda_flash::attention(
            &q.transpose(1, 2)?,
            k_all,
            v_all,
            pads,
            self.cfg.attn_scale() as f32,
            window,
        )?)
    }

    /// One decode token per row through the decode kernel (`kernels/cuda_decode.rs`: the cache
    /// read once, split over its length), with the step's own mask, for the cache lengths
    /// [`crate::kernels::cuda_decode::applies`] to: bf16 on CUDA, not
    /// batch-invariant, a shape the kernel is built for, no sliding window (its mask differs per
    /// layer kind and is not the step's global one). `q`: `[b, nh, 1, hd]` rotated. Returns
    /// `[b, 1, nh * hd]`, or `None` for the batched path.
    #[cfg(feature = "cuda")]
    pub(super) fn decode_attention(
        &self,
        bl: &Block,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        s: &StepInputs,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::cuda_decode;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        if s.l != 1
            || bl.sliding
            || s.host_masks.is_some()
            || !self.device.is_cuda()
            || q.dtype() != DType::BF16
            || !cuda_decode::supports(hd, nh / nkv)
            || !cuda_decode::applies(k_all.dim(2)?, s.b, nkv)
        {
            return Ok(None);
        }
        let attn = cuda_decode::attention(
            &q.contiguous()?,
            k_all,
            v_all,
            s.mask_global.as_ref(),
            cfg.attn_scale() as f32,
        )?;
        Ok(Some(attn.reshape((s.b, 1, nh * hd))?))
    }

    /// The rows' padding as a device tensor when this prefill chunk runs the flash kernel
    /// (`kernels/cuda_flash.rs`): bf16 on a CUDA device, head dim 64 or 128, more than one query
    /// (decode steps keep the batched path and its CUDA graphs), "halves" rotary, not
    /// batch-invariant, no `PGATE_FLASH=0`. `None`: the batched-matmul path, with masks.
    pub(super) fn flash_pads(&self, pads: &[usize], l: usize) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if l > 1
            && self.device.is_cuda()
            && self.dtype == DType::BF16
            && !self.batch_invariant
            && !self.rope_global.interleaved
            && self.rope_local.as_ref().is_none_or(|r| !r.interleaved)
            && crate::kernels::cuda_flash::enabled()
            && crate::kernels::cuda_flash::supports_head_dim(self.cfg.head_dim)
        {
            let p: Vec<u32> = pads.iter().map(|&p| p as u32).collect();
            return Ok(Some(Tensor::from_vec(p, pads.len(), &self.device)?));
        }
        let _ = (pads, l);
        Ok(None)
    }

    /// Rotary embedding, cache append and attention for a prefill chunk through the flash kernel:
    /// `q`, `k`, `v` stay in `[b, l, heads, hd]` order (no transposed copies of Q), and the
    /// result comes back as `[b, l, nh, hd]`, the order the output projection reads.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_attention(
        &self,
        li: usize,
        bl: &Block,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        cs: &(Tensor, Tensor),
        pads: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let q = rope.apply_thd(q, cs)?;
        let k = rope.apply_thd(k, cs)?;
        let (k_all, v_all) = cache.append(li, &k.transpose(1, 2)?, &v.transpose(1, 2)?)?;
        self.flash_over_cache(bl, &q, &k_all, &v_all, pads)
    }
}
