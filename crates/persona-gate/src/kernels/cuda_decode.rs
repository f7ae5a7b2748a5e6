//! Decode attention on the GPU that reads each sequence's K and V once (split over the cache length
//! for long contexts), bf16 in, f32 accumulate.
//!
//! Why this exists: a decode step's attention as batched matmuls writes and re-reads a score row per
//! head and, with grouped-query attention, goes through the cache once per matmul; with an 8k-token
//! cache that kept steps at 62-65% of the HBM floor on an H200 (BENCHMARKS.md, issue 22). Here one
//! CTA owns one KV head of one row over a slice of the cache: all `n_rep` query heads that share the
//! KV head are scored against each key as it streams by, so the cache is read exactly once. Groups of
//! 8 lanes take one key each (16-byte loads, a 3-step shuffle per dot product) and keep their own
//! online softmax; the CTA merges its 16 groups, and when the cache is split over several CTAs (to
//! fill the GPU at small batch) a second kernel merges the slices. The additive mask is the step's
//! own (padding, the unused tail of a fixed-slot view), read from the device, so the launch is the
//! same on every replay of a CUDA graph. Compiled with NVRTC at first use per (head dim, n_rep).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::nvrtc::{Ptx, Switch};

const SRC: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
#define DPL (HD / 8)
#define GROUPS 16
#define NV (DPL / 8)
__device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
// One key's slice (DPL bf16, as NV 16-byte words) of a K or V row.
struct Row { uint4 w[NV]; };
__device__ __forceinline__ Row load(const u16* p, bool ok) {
    Row r;
#pragma unroll
    for (int i = 0; i < NV; i++) r.w[i] = ok ? *(const uint4*)(p + 8 * i) : make_uint4(0u, 0u, 0u, 0u);
    return r;
}
__device__ __forceinline__ float elem(const Row& r, int d) {
    const uint4& w = r.w[d / 8];
    const int j = d % 8;
    const u32 x = j < 2 ? w.x : j < 4 ? w.y : j < 6 ? w.z : w.w;
    return (j & 1) ? hi(x) : lo(x);
}

// q: [b, nh, HD] (row stride q_sb, head stride HD); k/v: [b, nkv, nkeys, HD] strided; mask: [b, nkeys]
// additive (natural-log units) or null. Grid (nsplit, nkv, b), 128 threads: 16 groups of 8 lanes,
// each group one key at a time (two in flight), each lane DPL dims. Writes the slice's
// unnormalized state per query head to part_m/part_l [b, nh, nsplit] and part_o [b, nh, nsplit, HD]
// when nsplit > 1, or the finished bf16 output o [b, nh, HD] when nsplit == 1.
extern "C" __global__ void __launch_bounds__(128, 3) pg_decode_attn_bf16(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u16* __restrict__ mask, u16* __restrict__ o,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o,
    int nkeys, int nh, int nsplit, int chunk,
    long long q_sb, long long k_sb, long long k_sh, long long k_st,
    long long v_sb, long long v_sh, long long v_st, float scale_log2)
{
    __shared__ float sq[NREP][HD];
    __shared__ float sm_m[GROUPS][NREP], sm_l[GROUPS][NREP];
    __shared__ float sm_o[GROUPS][NREP][HD + 4];
    const int tid = threadIdx.x, grp = tid >> 3, sub = tid & 7;
    const int split = blockIdx.x, kh = blockIdx.y, bi = blockIdx.z;
    const int k0 = split * chunk, k1 = min(nkeys, k0 + chunk);
    const u16* kp = k + bi * k_sb + kh * k_sh + sub * DPL;
    const u16* vp = v + bi * v_sb + kh * v_sh + sub * DPL;
    const u16* mp = mask ? mask + (long long)bi * nkeys : 0;
    const float LOG2E = 1.4426950408889634f;
    for (int i = tid; i < NREP * HD; i += 128)
        sq[i / HD][i % HD] = bf2f(q[bi * q_sb + (long long)kh * NREP * HD + i]) * scale_log2;
    __syncthreads();

    float m[NREP], l[NREP], acc[NREP][DPL];
#pragma unroll
    for (int h = 0; h < NREP; h++) {
        m[h] = NEG_INF;
        l[h] = 0.f;
#pragma unroll
        for (int d = 0; d < DPL; d++) acc[h][d] = 0.f;
    }
    // Every lane runs every iteration (the shuffles need the whole warp); a key past the slice or
    // masked out loads nothing and updates nothing.
    for (int base = k0; base < k1; base += 2 * GROUPS) {
        int key[2];
        float mk[2];
        bool ok[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            key[u] = base + grp + u * GROUPS;
            const bool in = key[u] < k1;
            mk[u] = (in && mp) ? bf2f(mp[key[u]]) * LOG2E : 0.f;
            ok[u] = in && mk[u] != NEG_INF;
        }
        const Row kr0 = load(kp + key[0] * k_st, ok[0]), kr1 = load(kp + key[1] * k_st, ok[1]);
        const Row vr0 = load(vp + key[0] * v_st, ok[0]), vr1 = load(vp + key[1] * v_st, ok[1]);
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const Row& kr = u ? kr1 : kr0;
            const Row& vr = u ? vr1 : vr0;
#pragma unroll
            for (int h = 0; h < NREP; h++) {
                float s = 0.f;
#pragma unroll
                for (int d = 0; d < DPL; d++) s += sq[h][sub * DPL + d] * elem(kr, d);
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                s += __shfl_xor_sync(0xffffffffu, s, 2);
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                if (ok[u]) {
                    s += mk[u];
                    const float mn = fmaxf(m[h], s);
                    const float al = exp2f(m[h] - mn), p = exp2f(s - mn);
                    m[h] = mn;
                    l[h] = l[h] * al + p;
#pragma unroll
                    for (int d = 0; d < DPL; d++) acc[h][d] = acc[h][d] * al + p * elem(vr, d);
                }
            }
        }
    }
    // Merge the CTA's 16 groups through shared memory.
#pragma unroll
    for (int h = 0; h < NREP; h++) {
        if (sub == 0) {
            sm_m[grp][h] = m[h];
            sm_l[grp][h] = l[h];
        }
#pragma unroll
        for (int d = 0; d < DPL; d++) sm_o[grp][h][sub * DPL + d] = acc[h][d];
    }
    __syncthreads();
    for (int i = tid; i < NREP * HD; i += 128) {
        const int h = i / HD, d = i % HD;
        float mx = NEG_INF;
        for (int g = 0; g < GROUPS; g++) mx = fmaxf(mx, sm_m[g][h]);
        float sl = 0.f, so = 0.f;
        if (mx != NEG_INF) {
            for (int g = 0; g < GROUPS; g++) {
                const float w = exp2f(sm_m[g][h] - mx);
                sl += sm_l[g][h] * w;
                so += sm_o[g][h][d] * w;
            }
        }
        const int qh = kh * NREP + h;
        if (nsplit == 1) {
            o[((long long)bi * nh + qh) * HD + d] = f2bf(sl > 0.f ? so / sl : 0.f);
        } else {
            const long long pi = ((long long)bi * nh + qh) * nsplit + split;
            part_o[pi * HD + d] = so;
            if (d == 0) {
                part_m[pi] = mx;
                part_l[pi] = sl;
            }
        }
    }
}

// Merge nsplit slices: grid (nh, b), HD threads.
extern "C" __global__ void pg_decode_merge_bf16(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_o, u16* __restrict__ o, int nh, int nsplit)
{
    const int h = blockIdx.x, bi = blockIdx.y, d = threadIdx.x;
    const long long base = ((long long)bi * nh + h) * nsplit;
    float mx = NEG_INF;
    for (int s = 0; s < nsplit; s++) mx = fmaxf(mx, part_m[base + s]);
    float sl = 0.f, so = 0.f;
    if (mx != NEG_INF) {
        for (int s = 0; s < nsplit; s++) {
            const float w = exp2f(part_m[base + s] - mx);
            sl += part_l[base + s] * w;
            so += part_o[(base + s) * HD + d] * w;
        }
    }
    o[((long long)bi * nh + h) * HD + d] = f2bf(sl > 0.f ? so / sl : 0.f);
}
"#;

const FUNC: &str = "pg_decode_attn_bf16";
const MERGE: &str = "pg_decode_merge_bf16";

/// Whether the decode kernel is on: only with `PGATE_DECODE_ATTN=1`. Off by default because it is
/// slower than the batched path it would replace (H200, 8B, add+ablate, CUDA graphs: 8k-token cache
/// at batch 16, 18.6 ms/step against 12.0; batch 1, 6.6 against 6.4; BENCHMARKS.md): its CUDA-core
/// dot products and per-key softmax updates are compute-bound long before the reads are, so the
/// cache-read-once design only pays with tensor cores (the n_rep query heads as rows of an mma
/// tile, as the prefill kernel does), which is not written. Kept, correct and tested, for that.
pub fn enabled() -> bool {
    SWITCH.on()
}

static SWITCH: Switch = Switch::new("PGATE_DECODE_ATTN", false);
static PTX: Ptx = Ptx::new("the decode attention kernel", SRC, true);

/// Shapes the kernel is built for: its registers hold `n_rep` query heads' slices of Q and of the
/// output per lane (`n_rep x hd / 8` each), so `hd x n_rep <= 512`.
pub fn supports(hd: usize, n_rep: usize) -> bool {
    matches!(hd, 64 | 128) && (1..=8).contains(&n_rep) && hd * n_rep <= 512
}

/// One decode token's attention: `q` `[b, nh, 1, hd]` (contiguous), `k_all`, `v_all`
/// `[b, nkv, nkeys, hd]` (strided, rows 16-byte aligned), `mask` `[b, .., nkeys]` additive bf16
/// (contiguous) or `None`. Returns `[b, 1, nh, hd]`.
pub fn attention(
    q: &Tensor,
    k_all: &Tensor,
    v_all: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let op = Decode {
        mask: mask.cloned(),
        scale,
    };
    q.apply_op3_no_bwd(k_all, v_all, &op)
}

struct Decode {
    mask: Option<Tensor>,
    scale: f32,
}

/// Splits of the cache so that about four CTAs per SM run (132 SMs on an H200), each slice at
/// least 128 keys.
fn splits(b: usize, nkv: usize, nkeys: usize) -> usize {
    let ctas = (b * nkv).max(1);
    528usize.div_ceil(ctas).clamp(1, nkeys.div_ceil(128).max(1))
}

/// The shortest cache the kernel takes: below it the batched path's two small matmuls are faster
/// (measured on an H200: at 128-256 slots and batch 16-64 the kernel's per-CTA merge cost more
/// than the reads it saves).
pub const MIN_KEYS: usize = 1024;

impl CustomOp3 for Decode {
    fn name(&self) -> &'static str {
        "pgate-decode-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the decode attention kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        sk: &CudaStorage,
        lk: &Layout,
        sv: &CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if [sq.dtype(), sk.dtype(), sv.dtype()] != [DType::BF16; 3] {
            candle_core::bail!("decode attention takes bf16 q, k and v");
        }
        let (b, nh, one, hd) = lq.shape().dims4()?;
        let (kb, nkv, nkeys, khd) = lk.shape().dims4()?;
        if one != 1 || lq.contiguous_offsets().is_none() {
            candle_core::bail!("decode attention: q must be [b, nh, 1, hd] contiguous");
        }
        if lv.shape().dims() != lk.shape().dims() || kb != b || khd != hd || nkv == 0 {
            candle_core::bail!("decode attention: k/v shapes do not match q");
        }
        if nh % nkv != 0 || !supports(hd, nh / nkv) || nkeys == 0 {
            candle_core::bail!(
                "decode attention: unsupported shape {nh} heads / {nkv} kv, hd {hd}"
            );
        }
        let (ks, vs) = (lk.stride(), lv.stride());
        let aligned = |l: &Layout| {
            let st = l.stride();
            st[3] == 1 && l.start_offset() % 8 == 0 && st[..3].iter().all(|s| s % 8 == 0)
        };
        if !aligned(lk) || !aligned(lv) {
            candle_core::bail!("decode attention: k/v rows are not 16-byte aligned");
        }
        let dev = sq.device().clone();
        let guard = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match (&guard, &self.mask) {
            (Some((st, ml)), Some(m)) => {
                let Storage::Cuda(mc) = &**st else {
                    candle_core::bail!("decode attention: the mask must be on the GPU");
                };
                if m.dtype() != DType::BF16
                    || m.elem_count() != b * nkeys
                    || ml.contiguous_offsets().is_none()
                {
                    candle_core::bail!("decode attention: the mask must be [b, {nkeys}] bf16");
                }
                Some(mc.as_cuda_slice::<half::bf16>()?.slice(ml.start_offset()..))
            }
            _ => None,
        };
        let q = sq.as_cuda_slice::<half::bf16>()?.slice(lq.start_offset()..);
        let k = sk.as_cuda_slice::<half::bf16>()?.slice(lk.start_offset()..);
        let v = sv.as_cuda_slice::<half::bf16>()?.slice(lv.start_offset()..);
        let n_rep = nh / nkv;
        let nsplit = splits(b, nkv, nkeys);
        let chunk = nkeys.div_ceil(nsplit);
        // SAFETY: the output and the partials are fully written (every (row, head, split) slot by
        // the first kernel, every output element by one of the two kernels).
        let out = unsafe { dev.alloc::<half::bf16>(b * nh * hd)? };
        let parts = b * nh * nsplit;
        let (pm, pl, po) = if nsplit > 1 {
            unsafe {
                (
                    dev.alloc::<f32>(parts)?,
                    dev.alloc::<f32>(parts)?,
                    dev.alloc::<f32>(parts * hd)?,
                )
            }
        } else {
            // Not read or written with one split; any allocation will do.
            unsafe {
                (
                    dev.alloc::<f32>(1)?,
                    dev.alloc::<f32>(1)?,
                    dev.alloc::<f32>(1)?,
                )
            }
        };
        let module = format!("pgate_decode_{hd}_{n_rep}");
        let ptx = PTX.get(&format!("#define HD {hd}\n#define NREP {n_rep}\n"))?;
        let func = dev.get_or_load_custom_func(FUNC, &module, ptx)?;
        let null: u64 = 0;
        let (nk_i, nh_i, ns_i, ch_i) = (nkeys as i32, nh as i32, nsplit as i32, chunk as i32);
        let q_sb = (nh * hd) as i64;
        let st: Vec<i64> = [ks[0], ks[1], ks[2], vs[0], vs[1], vs[2]]
            .iter()
            .map(|&s| s as i64)
            .collect();
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let mut bld = func.builder();
        bld.arg(&q);
        bld.arg(&k);
        bld.arg(&v);
        match &mask {
            Some(m) => bld.arg(m),
            None => bld.arg(&null),
        };
        bld.arg(&out);
        bld.arg(&pm);
        bld.arg(&pl);
        bld.arg(&po);
        bld.arg(&nk_i);
        bld.arg(&nh_i);
        bld.arg(&ns_i);
        bld.arg(&ch_i);
        bld.arg(&q_sb);
        for s in &st {
            bld.arg(s);
        }
        bld.arg(&scale_log2);
        let cfg = LaunchConfig {
            grid_dim: (nsplit as u32, nkv as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads q rows of its KV head's query heads, keys and values in
        // `[k0, k1) < nkeys` at the strides checked above, `b x nkeys` mask values, and writes
        // inside `out` (b x nh x hd) or the partials (b x nh x nsplit (x hd)).
        unsafe { bld.launch(cfg) }.w()?;
        if nsplit > 1 {
            let merge = dev.get_or_load_custom_func(MERGE, &module, ptx)?;
            let mut bld = merge.builder();
            bld.arg(&pm);
            bld.arg(&pl);
            bld.arg(&po);
            bld.arg(&out);
            bld.arg(&nh_i);
            bld.arg(&ns_i);
            let cfg = LaunchConfig {
                grid_dim: (nh as u32, b as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: reads the partials the first kernel wrote, writes b x nh x hd outputs.
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from_dims(&[b, 1, nh, hd]),
        ))
    }
}
