//! Decode attention on the GPU that reads each sequence's K and V once (split over the cache length
//! for long contexts), bf16 in, f32 accumulate.
//!
//! Why this exists: a decode step's attention as batched matmuls writes and re-reads a score row per
//! head and, with grouped-query attention, goes through the cache once per matmul; with an 8k-token
//! cache that kept steps at 62-65% of the HBM floor on an H200 (BENCHMARKS.md, issue 22). Here one
//! CTA owns one KV head of one row over a slice of the cache, and all `n_rep` query heads that share
//! the KV head are scored against each tile of keys, so the cache is read exactly once. Tiles of 32
//! keys stream into shared memory with `cp.async` (the next tile loads while this one is computed);
//! a tile costs one score pass (a thread per (head, key)), one online-softmax update per head (a
//! warp per head), and one pass over the V rows (a thread per two output dims of a head). The first
//! version updated the softmax and rescaled the output per key, on CUDA cores, and was compute-bound
//! long before the reads were (8k cache, batch 16: 18.6 ms/step against 12.0 batched); per tile the
//! rescale is paid once per 32 keys (the 8k-cache batch-1 step: 5.84 ms against 6.40 batched; at
//! batch 16 the batched path stays faster, 11.83 against 13.18, so [`applies`] picks by shape). A
//! rewrite that read each V element once for all heads (a thread per dim pair over every head) and
//! scored with 8 lanes per key measured slower still (18.7 ms at batch 16; not profiled: its Q
//! reads from shared memory conflict four ways, the likely cause). When the cache is split over several CTAs (to fill the GPU at
//! small batch) a second kernel merges the slices. The additive mask is the step's own (padding, the
//! unused tail of a fixed-slot view), read from the device, so the launch is the same on every replay
//! of a CUDA graph. Compiled with NVRTC at first use per (head dim, n_rep).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::nvrtc::Ptx;

const SRC: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
#define TK 32
#define NT 128
#define KST (HD + 8)
#define CPR (HD / 8)
#define ITEMS ((NREP * HD / 2 + NT - 1) / NT)
__device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float wmax(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float wsum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// One tile of TK keys of K and V into shared stage rows (padded to KST), zero-filled past k1.
__device__ __forceinline__ void load_tile(u16 (*sk)[KST], u16 (*sv)[KST], const u16* kb, const u16* vb,
                                          int t0, int k1, long long k_st, long long v_st) {
    for (int c = threadIdx.x; c < TK * CPR; c += NT) {
        const int r = c / CPR, col = (c % CPR) * 8;
        const int key = t0 + r;
        const bool in = key < k1;
        const long long kk = in ? key : t0;
        cp16(smem_addr(&sk[r][col]), kb + kk * k_st + col, in ? 16 : 0);
        cp16(smem_addr(&sv[r][col]), vb + kk * v_st + col, in ? 16 : 0);
    }
    cp_commit();
}

// q: [b, nh, HD] (row stride q_sb); k/v: [b, nkv, nkeys, HD] strided; mask: [b, nkeys] additive
// (natural-log units) or null. Grid (nsplit, nkv, b), NT threads. Per tile of TK keys, streamed into
// shared memory with cp.async (the next tile loads while this one is computed): all NREP x TK scores
// (one thread per (head, key)), one online-softmax update per head and tile (one warp per head,
// lane = key), then the probability-weighted V rows (each thread two output dims of one head).
// Writes the slice's unnormalized state per query head to part_m/part_l [b, nh, nsplit] and part_o
// [b, nh, nsplit, HD] when nsplit > 1, or the finished bf16 output o [b, nh, HD] when nsplit == 1.
extern "C" __global__ void __launch_bounds__(NT) pg_decode_attn_bf16(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u16* __restrict__ mask, u16* __restrict__ o,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o,
    int nkeys, int nh, int nsplit, int chunk,
    long long q_sb, long long k_sb, long long k_sh, long long k_st,
    long long v_sb, long long v_sh, long long v_st, float scale_log2)
{
    __shared__ __align__(16) u16 sk[2][TK][KST];
    __shared__ __align__(16) u16 sv[2][TK][KST];
    __shared__ __align__(16) float sq[NREP][HD];
    __shared__ float sp[NREP][TK];
    __shared__ float s_m[NREP], s_l[NREP], s_a[NREP];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int split = blockIdx.x, kh = blockIdx.y, bi = blockIdx.z;
    const int k0 = split * chunk, k1 = min(nkeys, k0 + chunk);
    const u16* kb = k + bi * k_sb + kh * k_sh;
    const u16* vb = v + bi * v_sb + kh * v_sh;
    const u16* mp = mask ? mask + (long long)bi * nkeys : 0;
    const float LOG2E = 1.4426950408889634f;
    const int ntiles = k1 > k0 ? (k1 - k0 + TK - 1) / TK : 0;
    if (ntiles > 0) load_tile(sk[0], sv[0], kb, vb, k0, k1, k_st, v_st);
    for (int i = tid; i < NREP * HD; i += NT)
        sq[i / HD][i % HD] = bf2f(q[bi * q_sb + (long long)kh * NREP * HD + i]) * scale_log2;
    if (tid < NREP) {
        s_m[tid] = NEG_INF;
        s_l[tid] = 0.f;
        s_a[tid] = 0.f;
    }
    float acc[ITEMS][2];
#pragma unroll
    for (int it = 0; it < ITEMS; it++) acc[it][0] = acc[it][1] = 0.f;

    for (int t = 0; t < ntiles; t++) {
        const int st = t & 1, t0 = k0 + t * TK;
        if (t + 1 < ntiles) {
            load_tile(sk[st ^ 1], sv[st ^ 1], kb, vb, t0 + TK, k1, k_st, v_st);
            cp_wait_1();
        } else {
            cp_wait_0();
        }
        __syncthreads();
        // Scores, log2 units, mask added; -inf for keys past the slice or masked out.
        for (int i = tid; i < NREP * TK; i += NT) {
            const int h = i / TK, r = i % TK, key = t0 + r;
            float s = NEG_INF;
            const float mk = (key < k1 && mp) ? bf2f(mp[key]) * LOG2E : 0.f;
            if (key < k1 && mk != NEG_INF) {
                const uint4* kr = (const uint4*)&sk[st][r][0];
                const float4* qh = (const float4*)&sq[h][0];
                float d = 0.f;
#pragma unroll
                for (int c = 0; c < CPR; c++) {
                    const uint4 w = kr[c];
                    const float4 a = qh[2 * c], b2 = qh[2 * c + 1];
                    d += a.x * lo(w.x) + a.y * hi(w.x) + a.z * lo(w.y) + a.w * hi(w.y);
                    d += b2.x * lo(w.z) + b2.y * hi(w.z) + b2.z * lo(w.w) + b2.w * hi(w.w);
                }
                s = d + mk;
            }
            sp[h][r] = s;
        }
        __syncthreads();
        // One online-softmax update per head: scores -> probabilities, the rescale kept in s_a.
        for (int h = warp; h < NREP; h += NT / 32) {
            const float s = sp[h][lane];
            const float mo = s_m[h], mn = fmaxf(mo, wmax(s));
            const float p = mn == NEG_INF ? 0.f : exp2f(s - mn);
            const float a = mo == NEG_INF ? 0.f : exp2f(mo - mn);
            const float ps = wsum(p);
            sp[h][lane] = p;
            if (lane == 0) {
                s_m[h] = mn;
                s_l[h] = s_l[h] * a + ps;
                s_a[h] = a;
            }
        }
        __syncthreads();
#pragma unroll
        for (int it = 0; it < ITEMS; it++) {
            const int i = tid + it * NT;
            if (i < NREP * HD / 2) {
                const int h = i / (HD / 2), d2 = i % (HD / 2);
                const float a = s_a[h];
                float x0 = acc[it][0] * a, x1 = acc[it][1] * a;
#pragma unroll 8
                for (int r = 0; r < TK; r++) {
                    const u32 w = *(const u32*)&sv[st][r][2 * d2];
                    const float p = sp[h][r];
                    x0 += p * lo(w);
                    x1 += p * hi(w);
                }
                acc[it][0] = x0;
                acc[it][1] = x1;
            }
        }
        // The stage just read is the one the next iteration's load overwrites.
        __syncthreads();
    }
#pragma unroll
    for (int it = 0; it < ITEMS; it++) {
        const int i = tid + it * NT;
        if (i < NREP * HD / 2) {
            const int h = i / (HD / 2), d = 2 * (i % (HD / 2));
            const int qh = kh * NREP + h;
            const float sl = ntiles > 0 ? s_l[h] : 0.f;
            const float mx = ntiles > 0 ? s_m[h] : NEG_INF;
            if (nsplit == 1) {
                const long long oi = ((long long)bi * nh + qh) * HD + d;
                o[oi] = f2bf(sl > 0.f ? acc[it][0] / sl : 0.f);
                o[oi + 1] = f2bf(sl > 0.f ? acc[it][1] / sl : 0.f);
            } else {
                const long long pi = ((long long)bi * nh + qh) * nsplit + split;
                part_o[pi * HD + d] = acc[it][0];
                part_o[pi * HD + d + 1] = acc[it][1];
                if (d == 0) {
                    part_m[pi] = mx;
                    part_l[pi] = sl;
                }
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

/// When the decode kernel runs for a step of `rows` sequences with `nkv` KV heads over `nkeys`
/// cache slots (`PGATE_DECODE_ATTN`: `0` never, `1` always). By default: caches of at least
/// [`MIN_KEYS`] slots and at most [`MAX_CTAS`] (row, KV head) pairs, where it was measured faster
/// (H200, 8B, add+ablate, graphs on: 8k-token cache at batch 1, 5.84 ms/step against 6.40
/// batched); with more pairs the batched path's matmuls already fill the GPU and were faster
/// (batch 16: 11.83 against 13.18), and at 128-256 slots the two were within 2%.
pub fn applies(nkeys: usize, rows: usize, nkv: usize) -> bool {
    static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let mode = MODE.get_or_init(|| match std::env::var("PGATE_DECODE_ATTN").as_deref() {
        Ok("0") => Some(false),
        Ok("1") => Some(true),
        _ => None,
    });
    mode.unwrap_or(nkeys >= MIN_KEYS && rows * nkv <= MAX_CTAS)
}

static PTX: Ptx = Ptx::new("the decode attention kernel", SRC, true);

/// Shapes the kernel is built for: head dim 64 or 128 (two shared-memory stages of 32 keys of K
/// and V fit the 48 KiB of static shared memory), up to 8 query heads per KV head.
pub fn supports(hd: usize, n_rep: usize) -> bool {
    matches!(hd, 64 | 128) && (1..=8).contains(&n_rep)
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

/// The shortest cache the kernel takes by default.
pub const MIN_KEYS: usize = 1024;

/// The most (row, KV head) pairs a step may have for the kernel to run by default.
pub const MAX_CTAS: usize = 32;

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
