//! Scale, mask and softmax of attention scores in one pass on the GPU (bf16 in and out, f32 math).
//!
//! Why this exists: the unfused path makes five passes over every head's `queries x keys` scores
//! (scale in bf16, broadcast mask add, cast to f32, softmax, cast back). On an H200 those passes
//! were most of a 2k-token prefill's kernel time (BENCHMARKS.md, issue 22's profile) and five
//! launches per layer of every decode step. Here one block per score row reads the row, applies the
//! scale and the row's mask in f32, and writes the probabilities once. The scale is applied in f32
//! rather than after a bf16 rounding, which is what SDPA does.
//!
//! The kernel is compiled at first use with NVRTC (the CUDA runtime candle already loads), from
//! source with no headers: bf16 is handled as raw 16-bit values.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::nvrtc::{Ptx, Switch};

const SRC: &str = r#"
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : (is_max ? __int_as_float(0xff800000) : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    return v;
}
// x, y: [rows, cols]; row r belongs to batch row r / rows_per_b and query (r % l); mask, when
// present: [batch, l, cols].
extern "C" __global__ void pg_scaled_masked_softmax_bf16(
    const unsigned short* __restrict__ x, const unsigned short* __restrict__ mask,
    unsigned short* __restrict__ y, int cols, int l, int rows_per_b, int has_mask, float scale) {
    const long long row = blockIdx.x;
    const unsigned short* xr = x + row * cols;
    unsigned short* yr = y + row * cols;
    const unsigned short* mr = 0;
    if (has_mask) {
        long long bi = row / rows_per_b, qi = row % l;
        mr = mask + (bi * l + qi) * (long long)cols;
    }
    float m = __int_as_float(0xff800000);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = bf2f(xr[c]) * scale + (mr ? bf2f(mr[c]) : 0.f);
        m = fmaxf(m, v);
    }
    m = block_reduce(m, true);
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = bf2f(xr[c]) * scale + (mr ? bf2f(mr[c]) : 0.f);
        s += expf(v - m);
    }
    s = block_reduce(s, false);
    const float inv = 1.f / s;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = bf2f(xr[c]) * scale + (mr ? bf2f(mr[c]) : 0.f);
        yr[c] = f2bf(expf(v - m) * inv);
    }
}
"#;

const MODULE: &str = "pgate_softmax";
const FUNC: &str = "pg_scaled_masked_softmax_bf16";

static SWITCH: Switch = Switch::new("PGATE_FUSED_SOFTMAX", true);
static PTX: Ptx = Ptx::new("the fused softmax kernel", SRC, false);

/// Whether the fused kernel is on (`PGATE_FUSED_SOFTMAX=0` turns it off, for A/B runs).
pub fn enabled() -> bool {
    SWITCH.on()
}

/// `softmax(scores * scale + mask)` over the last dim. `scores`: `[b, g, r, cols]` bf16
/// contiguous with `r = n_rep * l` rows per KV head, row `i` at query `i % l`; `mask`:
/// `[b, 1, 1, l, cols]` bf16 contiguous, or `None`.
pub fn scaled_masked_softmax(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
    l: usize,
) -> candle_core::Result<Tensor> {
    let dims = scores.dims();
    let b = dims[0];
    let rows_per_b = scores.elem_count() / dims[dims.len() - 1] / b.max(1);
    let op = Fused {
        scale,
        l,
        rows_per_b,
        has_mask: mask.is_some(),
    };
    let mask = match mask {
        Some(m) => m.contiguous()?,
        None => scores.clone(),
    };
    scores.contiguous()?.apply_op2_no_bwd(&mask, &op)
}

struct Fused {
    scale: f32,
    l: usize,
    rows_per_b: usize,
    has_mask: bool,
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        "pgate-scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused softmax runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if s1.dtype() != DType::BF16 || s2.dtype() != DType::BF16 {
            candle_core::bail!("the fused softmax takes bf16 scores and mask");
        }
        let dev = s1.device().clone();
        let (Some((a0, a1)), Some((m0, m1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("the fused softmax needs contiguous inputs");
        };
        let x = s1.as_cuda_slice::<half::bf16>()?.slice(a0..a1);
        let m = s2.as_cuda_slice::<half::bf16>()?.slice(m0..m1);
        let el = l1.shape().elem_count();
        let cols = *l1.shape().dims().last().unwrap_or(&1);
        let rows = el / cols.max(1);
        // SAFETY: every element is written by the kernel below.
        let y = unsafe { dev.alloc::<half::bf16>(el)? };
        let func = dev.get_or_load_custom_func(FUNC, MODULE, PTX.get("")?)?;
        let mut b = func.builder();
        let (cols_i, l_i, rpb_i) = (cols as i32, self.l as i32, self.rows_per_b as i32);
        let has = self.has_mask as i32;
        b.arg(&x);
        b.arg(&m);
        b.arg(&y);
        b.arg(&cols_i);
        b.arg(&l_i);
        b.arg(&rpb_i);
        b.arg(&has);
        b.arg(&self.scale);
        let threads = if cols >= 1024 { 256 } else { 128 };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads `rows x cols` scores, `batch x l x cols` mask values and
        // writes `rows x cols` outputs, all inside the slices passed.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
    }
}
