//! The end of a greedy decode step on the GPU: each row's argmax (first index on ties) and its
//! logit sum (a non-finite sum flags a row whose steering blew up) in two small launches.
//!
//! Why this exists: candle's argmax reduces a row in one thread block, so at batch 1 a 128k-token
//! vocabulary took 113 us of a 5.8 ms steered 8B step on an H200 (ncu, BENCHMARKS.md, issue 22),
//! and the sum was a second pass. Here a grid of blocks per row each reduce a slice of the row to
//! (max, first index, sum), and one warp per row merges the slices in a fixed order, so the result
//! does not depend on timing. Compiled with NVRTC at first use, like the other kernels here.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::nvrtc::{Ptx, Switch};

const SRC: &str = r#"
#define NT 256
// Larger value wins; equal values: the smaller index. NaN counts as the largest (as torch.argmax).
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    if (v != v) return !(bv != bv) || i < bi;
    if (bv != bv) return false;
    return v > bv || (v == bv && i < bi);
}
// x: [b, n] f32 rows; grid (slices, b): slice s of a row covers [s*len, min(n, (s+1)*len)).
// Writes pm/pi/ps [b, slices]: the slice's max, its first index, its sum.
extern "C" __global__ void __launch_bounds__(NT) pg_argmax_part_f32(
    const float* __restrict__ x, float* __restrict__ pm, int* __restrict__ pi, float* __restrict__ ps,
    int n, int len, int slices) {
    __shared__ float sm[NT / 32], ss[NT / 32];
    __shared__ int si[NT / 32];
    const int s = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
    const float* xr = x + (long long)row * n;
    const int a = s * len, e = min(n, a + len);
    float bv = __int_as_float(0xff800000), sum = 0.f;
    int bi = 0x7fffffff;
    for (int i = a + tid; i < e; i += NT) {
        const float v = xr[i];
        sum += v;
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if ((tid & 31) == 0) { sm[tid >> 5] = bv; si[tid >> 5] = bi; ss[tid >> 5] = sum; }
    __syncthreads();
    if (tid == 0) {
        float m = sm[0], t = ss[0];
        int k = si[0];
        for (int w = 1; w < NT / 32; w++) {
            t += ss[w];
            if (better(sm[w], si[w], m, k)) { m = sm[w]; k = si[w]; }
        }
        const long long o = (long long)row * slices + s;
        pm[o] = m; pi[o] = k; ps[o] = t;
    }
}
// One warp per row merges its slices in order. out: [2, b] f32: the argmaxes (exact below 2^24),
// then the sums.
extern "C" __global__ void pg_argmax_merge_f32(
    const float* __restrict__ pm, const int* __restrict__ pi, const float* __restrict__ ps,
    float* __restrict__ out, int slices) {
    const int row = blockIdx.x, lane = threadIdx.x;
    float bv = __int_as_float(0xff800000), sum = 0.f;
    int bi = 0x7fffffff;
    for (int s = lane; s < slices; s += 32) {
        const long long o = (long long)row * slices + s;
        sum += ps[o];
        if (better(pm[o], pi[o], bv, bi)) { bv = pm[o]; bi = pi[o]; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) {
        out[row] = (float)(bi == 0x7fffffff ? 0 : bi);
        out[gridDim.x + row] = sum;
    }
}
"#;

const MODULE: &str = "pgate_argmax";

static SWITCH: Switch = Switch::new("PGATE_FAST_ARGMAX", true);
static PTX: Ptx = Ptx::new("the argmax kernel", SRC, false);

/// Each row's argmax and logit sum, `[2, b]` f32 (the indices, then the sums), for `logits` `[b, n]` f32 on CUDA
/// with `n < 2^24`; `None` when the kernel does not apply (`PGATE_FAST_ARGMAX=0`, another device
/// or dtype), so the caller takes candle's argmax and sum.
pub fn argmax_and_sum(logits: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !SWITCH.on()
        || !logits.device().is_cuda()
        || logits.dtype() != DType::F32
        || logits.rank() != 2
        || logits.dim(1)? >= 1 << 24
    {
        return Ok(None);
    }
    Ok(Some(logits.contiguous()?.apply_op1_no_bwd(&ArgmaxSum)?))
}

struct ArgmaxSum;

/// Slices per row: enough blocks to fill an H200 at batch 1 (132 SMs), each at least 2,048 values.
fn slices(b: usize, n: usize) -> usize {
    264usize
        .div_ceil(b.max(1))
        .clamp(1, n.div_ceil(2048).max(1))
}

impl CustomOp1 for ArgmaxSum {
    fn name(&self) -> &'static str {
        "pgate-argmax-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the argmax kernel runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, n) = l.shape().dims2()?;
        if l.contiguous_offsets().is_none() || n == 0 {
            candle_core::bail!("argmax: logits must be [b, n] contiguous, n > 0");
        }
        let dev = s.device().clone();
        let x = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
        let ns = slices(b, n);
        let len = n.div_ceil(ns);
        // SAFETY: the first kernel writes every (row, slice) partial, the second every output.
        let (pm, pi, ps, out) = unsafe {
            (
                dev.alloc::<f32>(b * ns)?,
                dev.alloc::<i32>(b * ns)?,
                dev.alloc::<f32>(b * ns)?,
                dev.alloc::<f32>(b * 2)?,
            )
        };
        let ptx = PTX.get("")?;
        let part = dev.get_or_load_custom_func("pg_argmax_part_f32", MODULE, ptx)?;
        let (n_i, len_i, ns_i) = (n as i32, len as i32, ns as i32);
        let mut bld = part.builder();
        bld.arg(&x);
        bld.arg(&pm);
        bld.arg(&pi);
        bld.arg(&ps);
        bld.arg(&n_i);
        bld.arg(&len_i);
        bld.arg(&ns_i);
        let cfg = LaunchConfig {
            grid_dim: (ns as u32, b as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block (s, row) reads row values [s*len, min(n, (s+1)*len)) and writes partial
        // (row, s); all inside the slices allocated above.
        unsafe { bld.launch(cfg) }.w()?;
        let merge = dev.get_or_load_custom_func("pg_argmax_merge_f32", MODULE, ptx)?;
        let mut bld = merge.builder();
        bld.arg(&pm);
        bld.arg(&pi);
        bld.arg(&ps);
        bld.arg(&out);
        bld.arg(&ns_i);
        let cfg = LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: warp `row` reads the row's `ns` partials and writes out[row], out[b + row].
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from_dims(&[2, b]),
        ))
    }
}
