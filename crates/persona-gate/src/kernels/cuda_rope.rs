//! From the fused Q/K/V projection to attention's inputs in one pass per part, on the GPU: rotary
//! embedding applied to Q (into a new `[b, l, nh, hd]` tensor) and to K (written straight into the
//! KV cache at the chunk's slots), V copied into the cache.
//!
//! Why this exists: the general path splits the projection's output with three strided copies,
//! rotates Q and K in two more passes, transposes K and V for the cache's `[b, kv heads, slot, hd]`
//! order (two copies) and copies them into the cache (two more): 65 ms of a 515 ms 2k x 8 prefill
//! on an H200 (BENCHMARKS.md, issue 22). Each kernel here reads its part of the projection once and
//! writes its destination once. Rotation is the "halves" layout (`x[i]`, `x[i + hd/2]`), computed in
//! f32 and rounded once. Compiled with NVRTC at first use, like the other kernels here.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{cudarc, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, DType, InplaceOp3, Layout, Shape, Storage, Tensor};

use super::nvrtc::{Ptx, Switch};

const SRC: &str = r#"
// src: b*l rows, `src_rs` elements apart; head h of this part starts at column (head0 + h) * hd.
// dst element (bi, i, h, d) sits at bi*d_sb + h*d_sh + (t0 + i)*d_st + d, or, with `slots` (one
// decode token per row, l == 1), at slot slots[bi * slots_rs] instead of t0 + i (slots past `cap`
// are not written). cos/sin: [b*l, hd/2] (ignored when rope is 0). One thread per
// (row, head, j < hd/2) pair of elements j and j + hd/2.
extern "C" __global__ void pg_rope_scatter_bf16(
    const u16* __restrict__ src, const u16* __restrict__ cos, const u16* __restrict__ sin,
    u16* __restrict__ dst, int l, int heads, int hd, long long src_rs, int head0, int t0,
    long long d_sb, long long d_sh, long long d_st, long long total, int rope,
    const u32* __restrict__ slots, long long slots_rs, long long cap) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    const int half = hd / 2;
    const int j = (int)(t % half);
    const long long rh = t / half;
    const int h = (int)(rh % heads);
    const long long row = rh / heads;
    const long long bi = row / l, i = row % l;
    const u16* x = src + row * src_rs + (long long)(head0 + h) * hd;
    const long long slot = slots ? (long long)slots[bi * slots_rs] : (long long)(t0 + i);
    if (slot >= cap) return;
    u16* y = dst + bi * d_sb + h * d_sh + slot * d_st;
    if (rope) {
        const float x1 = bf2f(x[j]), x2 = bf2f(x[j + half]);
        const float c = bf2f(cos[row * half + j]), s = bf2f(sin[row * half + j]);
        y[j] = f2bf(x1 * c - x2 * s);
        y[j + half] = f2bf(x2 * c + x1 * s);
    } else {
        y[j] = x[j];
        y[j + half] = x[j + half];
    }
}
"#;

const MODULE: &str = "pgate_rope";
const FUNC: &str = "pg_rope_scatter_bf16";

static SWITCH: Switch = Switch::new("PGATE_FUSED_ROPE", true);
static PTX: Ptx = Ptx::new("the rope scatter kernel", SRC, false);

/// Whether the fused split + rotate + cache write is on (`PGATE_FUSED_ROPE=0` turns it off).
pub fn enabled() -> bool {
    SWITCH.on()
}

/// One part of a fused projection: `heads` heads of `hd` starting at head `head0`, rotated with
/// `rope` (`(cos, sin)`, each `[b, l, hd/2]` contiguous) when given.
#[derive(Clone)]
pub struct Part<'a> {
    pub head0: usize,
    pub heads: usize,
    pub hd: usize,
    pub rope: Option<(&'a Tensor, &'a Tensor)>,
}

/// Q as `[b, l, heads, hd]` from the projection output `y` (`[b, l, width]` contiguous bf16).
pub fn rotate_new(y: &Tensor, part: &Part<'_>) -> candle_core::Result<Tensor> {
    let (cos, sin) = part
        .rope
        .ok_or_else(|| candle_core::Error::Msg("rotate_new needs cos/sin".into()))?;
    y.apply_op2_no_bwd(
        cos,
        &Scatter {
            head0: part.head0,
            heads: part.heads,
            hd: part.hd,
            sin: Some(sin.clone()),
            t0: 0,
            slots: None,
        },
    )
}

/// Write the part (rotated when it has `rope`) into `cache` (`[b, heads, capacity, hd]`) at
/// slots `t0..t0 + l`.
pub fn scatter_into(
    cache: &Tensor,
    y: &Tensor,
    part: &Part<'_>,
    t0: usize,
) -> candle_core::Result<()> {
    scatter(cache, y, part, t0, None)
}

/// [`scatter_into`] for one decode token per row of a fixed-slot cache: row `bi` goes to slot
/// `slot_idx[bi, 0, 0, 0]` (`slot_idx`: the `[b, heads, 1, hd]` u32 index tensor of
/// [`crate::model::kv_cache::KvCache::write_at`], every entry of a row the same slot), read on the
/// device so one CUDA graph serves every step.
pub fn scatter_at(
    cache: &Tensor,
    y: &Tensor,
    part: &Part<'_>,
    slot_idx: &Tensor,
) -> candle_core::Result<()> {
    scatter(cache, y, part, 0, Some(slot_idx))
}

fn scatter(
    cache: &Tensor,
    y: &Tensor,
    part: &Part<'_>,
    t0: usize,
    slots: Option<&Tensor>,
) -> candle_core::Result<()> {
    let (cos, sin) = match part.rope {
        Some((c, s)) => (c.clone(), Some(s.clone())),
        None => (y.clone(), None),
    };
    cache.inplace_op3(
        y,
        &cos,
        &Scatter {
            head0: part.head0,
            heads: part.heads,
            hd: part.hd,
            sin,
            t0,
            slots: slots.cloned(),
        },
    )
}

struct Scatter {
    head0: usize,
    heads: usize,
    hd: usize,
    /// `None`: copy without rotating (V).
    sin: Option<Tensor>,
    t0: usize,
    /// Per-row destination slots on the device (fixed-slot decode), instead of `t0..t0 + l`.
    slots: Option<Tensor>,
}

/// Destination strides `[b, head, slot]` in elements.
type Dst = [i64; 3];

impl Scatter {
    /// Launch over `y` (`[b, l, width]` contiguous) into `dst` with strides `ds`.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        sy: &CudaStorage,
        ly: &Layout,
        cos: &CudaStorage,
        lc: &Layout,
        dst: &mut cudarc::driver::CudaViewMut<'_, half::bf16>,
        ds: Dst,
        cap: usize,
    ) -> candle_core::Result<()> {
        let (b, l, width) = ly.shape().dims3()?;
        if sy.dtype() != DType::BF16 || ly.contiguous_offsets().is_none() {
            candle_core::bail!("rope scatter: the projection must be contiguous bf16");
        }
        if (self.head0 + self.heads) * self.hd > width || self.hd % 2 != 0 {
            candle_core::bail!("rope scatter: heads out of the projection's width");
        }
        let dev = sy.device().clone();
        let y = sy.as_cuda_slice::<half::bf16>()?.slice(ly.start_offset()..);
        let rope = self.sin.is_some();
        let sin_guard = self.sin.as_ref().map(|s| s.storage_and_layout());
        let (c, s) = match &sin_guard {
            Some((st, sl)) => {
                let Storage::Cuda(sc) = &**st else {
                    candle_core::bail!("rope scatter: sin must be on the GPU");
                };
                let half = self.hd / 2;
                if lc.shape().elem_count() != b * l * half || lc.contiguous_offsets().is_none() {
                    candle_core::bail!("rope scatter: cos/sin must be [b, l, hd/2] contiguous");
                }
                (
                    cos.as_cuda_slice::<half::bf16>()?
                        .slice(lc.start_offset()..),
                    sc.as_cuda_slice::<half::bf16>()?.slice(sl.start_offset()..),
                )
            }
            // Unused by the kernel when rope is 0; any valid pointer will do.
            None => (y.slice(0..), y.slice(0..)),
        };
        let func = dev.get_or_load_custom_func(FUNC, MODULE, PTX.get("")?)?;
        let total = (b * l * self.heads * (self.hd / 2)) as i64;
        let (l_i, heads_i, hd_i) = (l as i32, self.heads as i32, self.hd as i32);
        let (rs, head0_i, t0_i, rope_i) =
            (width as i64, self.head0 as i32, self.t0 as i32, rope as i32);
        let mut bld = func.builder();
        bld.arg(&y);
        bld.arg(&c);
        bld.arg(&s);
        bld.arg(dst);
        bld.arg(&l_i);
        bld.arg(&heads_i);
        bld.arg(&hd_i);
        bld.arg(&rs);
        bld.arg(&head0_i);
        bld.arg(&t0_i);
        for d in &ds {
            bld.arg(d);
        }
        bld.arg(&total);
        bld.arg(&rope_i);
        let slots_guard = self.slots.as_ref().map(|s| s.storage_and_layout());
        let slots = match (&slots_guard, &self.slots) {
            (Some((st, sl)), Some(t)) => {
                let Storage::Cuda(sc) = &**st else {
                    candle_core::bail!("rope scatter: the slots must be on the GPU");
                };
                if t.dtype() != DType::U32
                    || l != 1
                    || sl.contiguous_offsets().is_none()
                    || t.elem_count() % b.max(1) != 0
                {
                    candle_core::bail!(
                        "rope scatter: slots must be contiguous u32, one token per row"
                    );
                }
                Some((
                    sc.as_cuda_slice::<u32>()?.slice(sl.start_offset()..),
                    (t.elem_count() / b.max(1)) as i64,
                ))
            }
            _ => None,
        };
        let null: u64 = 0;
        let zero: i64 = 0;
        match &slots {
            Some((view, rs)) => {
                bld.arg(view);
                bld.arg(rs);
            }
            None => {
                bld.arg(&null);
                bld.arg(&zero);
            }
        }
        let cap_i = cap as i64;
        bld.arg(&cap_i);
        let cfg = LaunchConfig {
            grid_dim: ((total as usize).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: thread t < total reads two elements of its row's head in `y` (checked inside
        // the width above) and cos/sin at its row, and writes two elements at the destination
        // strides, which the callers derive from the destination's own layout and shape.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }
}

impl CustomOp2 for Scatter {
    fn name(&self) -> &'static str {
        "pgate-rope-new"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the rope scatter runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sy: &CudaStorage,
        ly: &Layout,
        sc: &CudaStorage,
        lc: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, l, _) = ly.shape().dims3()?;
        let (heads, hd) = (self.heads, self.hd);
        let dev = sy.device().clone();
        // SAFETY: the kernel writes every element of the `[b, l, heads, hd]` output.
        let mut out = unsafe { dev.alloc::<half::bf16>(b * l * heads * hd)? };
        let ds = [(l * heads * hd) as i64, hd as i64, (heads * hd) as i64];
        {
            let mut view = out.slice_mut(..);
            self.launch(sy, ly, sc, lc, &mut view, ds, l)?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from_dims(&[b, l, heads, hd]),
        ))
    }
}

impl InplaceOp3 for Scatter {
    fn name(&self) -> &'static str {
        "pgate-rope-into-cache"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("the rope scatter runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sd: &mut CudaStorage,
        ld: &Layout,
        sy: &CudaStorage,
        ly: &Layout,
        sc: &CudaStorage,
        lc: &Layout,
    ) -> candle_core::Result<()> {
        let (b, l, _) = ly.shape().dims3()?;
        let (db, dh, cap, dd) = ld.shape().dims4()?;
        let st = ld.stride();
        if db != b || dh != self.heads || dd != self.hd || self.t0 + l > cap || st[3] != 1 {
            candle_core::bail!("rope scatter: the cache does not fit the chunk");
        }
        if sd.dtype() != DType::BF16 {
            candle_core::bail!("rope scatter: the cache must be bf16");
        }
        let ds = [st[0] as i64, st[1] as i64, st[2] as i64];
        let off = ld.start_offset();
        let mut dst = sd.as_cuda_slice_mut::<half::bf16>()?.slice_mut(off..);
        self.launch(sy, ly, sc, lc, &mut dst, ds, cap)
    }
}
