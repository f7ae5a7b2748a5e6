//! Prefill attention on the GPU without a score tensor (flash-style): bf16 tensor-core tiles, f32
//! online softmax, the causal / padding / sliding-window mask computed from positions.
//!
//! Why this exists: the batched-matmul path writes every head's `queries x keys` scores to memory,
//! reads them back for the softmax, writes probabilities and reads them again for `P x V`; on an
//! H200 that traffic plus the copies around it (query blocks, masks, the output transpose) kept a
//! 2k-token prefill at 0.69x of PyTorch's SDPA (BENCHMARKS.md, issue 22). Here one CTA owns 64
//! queries of one head: it walks the keys in tiles of 64 through shared memory, keeps the running
//! row max and sum in registers, and writes only the output, already in `[b, l, heads, hd]` order
//! (what the output projection reads), so memory stays linear in the prompt and nothing is copied.
//!
//! Layout of the work (per CTA, 4 warps x 16 query rows): `S = Q K^T` and `O += P V` are
//! `mma.sync.m16n8k16` tiles (bf16 in, f32 accumulate) written as inline PTX, so the source needs no
//! CUDA headers and compiles with NVRTC at first use, once per head dim. K and V tiles of 32 keys
//! stream into two shared-memory stages with `cp.async` (the next tile loads while this one is
//! used) and reach the tensor cores through `ldmatrix` (V transposed on the way); tiles wholly
//! inside every row's visible range skip the mask arithmetic. The mask is the
//! decoder's: a query at cache slot `s` of a row left-padded to `pad` sees keys `pad..=s` (within
//! the window, if any); a padding query sees itself only, so its softmax stays finite.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::nvrtc::{Ptx, Switch};

const SRC: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
#define BQ 64
#define BK 32
#define RS (HD + 8)
#define STAGE (BK * RS)

// Two floats to packed bf16 (round to nearest even) in one instruction; `lo` in the low half.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void ldm_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldm_x4_t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// d += a (16x16, row-major fragment) * b (16x8, column-major fragment); bf16 in, f32 accumulate.
__device__ __forceinline__ void mma16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ bool sees(int s, int key, int pad, int window) {
    if (s < pad) return key == s;
    return key >= pad && key <= s && (window <= 0 || s - key < window);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// q: [b, nh, l, HD], k/v: [b, nkv, nkeys, HD], o: [b, nh, l, HD], each with its own strides
// (elements; the last dim contiguous, k/v rows 16-byte aligned). Query i sits at cache slot t0 + i.
// Grid (ceil(l/64), nh, b), 128 threads: warp w owns queries 16w..16w+15 of the CTA's 64.
extern "C" __global__ void __launch_bounds__(128) pg_flash_fwd_bf16(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    u16* __restrict__ o, const u32* __restrict__ pads,
    int l, int t0, int nkeys, int n_rep, int window,
    long long q_sb, long long q_sh, long long q_st,
    long long k_sb, long long k_sh, long long k_st,
    long long v_sb, long long v_sh, long long v_st,
    long long o_sb, long long o_sh, long long o_st, float scale_log2)
{
    // Two stages of K and V tiles, row-major with 16 bytes of padding per row (ldmatrix rows of
    // one 8x8 matrix then fall in distinct banks).
    __shared__ __align__(16) u16 Ks[2 * STAGE];
    __shared__ __align__(16) u16 Vs[2 * STAGE];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
    const int qb = blockIdx.x * BQ, h = blockIdx.y, bi = blockIdx.z, kh = h / n_rep;
    const int pad = (int)pads[bi];
    const u16* qp = q + bi * q_sb + h * q_sh;
    const u16* kp = k + bi * k_sb + kh * k_sh;
    const u16* vp = v + bi * v_sb + kh * v_sh;
    const int warp_first = qb + warp * 16;
    const int r0 = warp_first + g, r1 = r0 + 8;
    const int s0 = t0 + r0, s1 = t0 + r1;

    u32 qa[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
        const int c = ks * 16 + tq * 2;
        qa[ks][0] = r0 < l ? *(const u32*)(qp + r0 * q_st + c) : 0u;
        qa[ks][1] = r1 < l ? *(const u32*)(qp + r1 * q_st + c) : 0u;
        qa[ks][2] = r0 < l ? *(const u32*)(qp + r0 * q_st + c + 8) : 0u;
        qa[ks][3] = r1 < l ? *(const u32*)(qp + r1 * q_st + c + 8) : 0u;
    }
    float acc[HD / 8][4];
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    // Keys this CTA can see: from the first a padding / windowed query may read, to its last query.
    const int qlast = min(qb + BQ, l) - 1;
    const int kend = min(nkeys, t0 + qlast + 1);
    int kstart = window > 0 ? max(pad, t0 + qb - window + 1) : pad;
    kstart = max(0, min(kstart, t0 + qb));
    kstart = (kstart / BK) * BK;
    const int warp_first_slot = t0 + warp_first;
    const int warp_last_slot = t0 + min(warp_first + 15, l - 1);

    const u32 ks_base = smem_addr(Ks), vs_base = smem_addr(Vs);
    auto load = [&](int stage, int kt) {
        for (int i = tid; i < BK * (HD / 8); i += 128) {
            const int r = i / (HD / 8), c = (i % (HD / 8)) * 8, key = kt + r;
            const bool in = key < nkeys;
            const u32 off = (u32)((stage * STAGE + r * RS + c) * 2);
            cp16(ks_base + off, in ? (const void*)(kp + key * k_st + c) : (const void*)kp, in ? 16 : 0);
            cp16(vs_base + off, in ? (const void*)(vp + key * v_st + c) : (const void*)vp, in ? 16 : 0);
        }
        cp_commit();
    };
    // ldmatrix lane addresses (bytes within a stage): K as B of Q K^T (matrices: 8 keys x 8 dims at
    // dim offsets 0, 8, 16, 24 of a 32-dim step); V as B of P V, transposed (keys 0-7 / 8-15 at dim
    // offsets 0 and 8).
    const u32 k_lane = (u32)(((lane & 7) * RS + (lane >> 3) * 8) * 2);
    const u32 v_lane = (u32)((((lane & 7) + ((lane >> 3) & 1) * 8) * RS + (lane >> 4) * 8) * 2);

    if (kstart < kend) load(0, kstart);
    for (int kt = kstart, stage = 0; kt < kend; kt += BK, stage ^= 1) {
        if (kt + BK < kend) {
            load(stage ^ 1, kt + BK);
            cp_wait_1();
        } else {
            cp_wait_0();
        }
        __syncthreads();
        if (warp_first < l && kt <= warp_last_slot) {
            const u32 kst = ks_base + (u32)(stage * STAGE * 2), vst = vs_base + (u32)(stage * STAGE * 2);
            float s[BK / 8][4];
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
                for (int ks = 0; ks < HD / 16; ks += 2) {
                    u32 b[4];
                    ldm_x4(b, kst + k_lane + (u32)((nt * 8 * RS + ks * 16) * 2));
                    mma16816(s[nt], qa[ks], b[0], b[1]);
                    mma16816(s[nt], qa[ks + 1], b[2], b[3]);
                }
            }
            // Interior tiles (every key visible to every row of the warp) skip the mask.
            const bool full = warp_first_slot >= pad && kt >= pad && kt + BK - 1 <= warp_first_slot
                && (window <= 0 || warp_last_slot - kt < window);
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    const int key = kt + nt * 8 + tq * 2 + j;
                    const float a = (full || sees(s0, key, pad, window)) ? s[nt][j] * scale_log2 : NEG_INF;
                    const float b = (full || sees(s1, key, pad, window)) ? s[nt][2 + j] * scale_log2 : NEG_INF;
                    s[nt][j] = a;
                    s[nt][2 + j] = b;
                    mx0 = fmaxf(mx0, a);
                    mx1 = fmaxf(mx1, b);
                }
            }
            mx0 = quad_max(mx0);
            mx1 = quad_max(mx1);
            const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            // A row that has seen no key yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
            const float base0 = n0 == NEG_INF ? 0.f : n0, base1 = n1 == NEG_INF ? 0.f : n1;
            const float al0 = exp2f(m0 - base0), al1 = exp2f(m1 - base1);
            m0 = n0;
            m1 = n1;
            float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                s[nt][0] = exp2f(s[nt][0] - base0);
                s[nt][1] = exp2f(s[nt][1] - base0);
                s[nt][2] = exp2f(s[nt][2] - base1);
                s[nt][3] = exp2f(s[nt][3] - base1);
                ps0 += s[nt][0] + s[nt][1];
                ps1 += s[nt][2] + s[nt][3];
            }
            l0 = l0 * al0 + ps0;
            l1 = l1 * al1 + ps1;
            // Past the first tiles the running max rarely moves: skip the rescale when no row of
            // the warp changed (the factors are then exactly 1).
            if (!__all_sync(0xffffffffu, al0 == 1.f && al1 == 1.f)) {
#pragma unroll
                for (int dn = 0; dn < HD / 8; dn++) {
                    acc[dn][0] *= al0;
                    acc[dn][1] *= al0;
                    acc[dn][2] *= al1;
                    acc[dn][3] *= al1;
                }
            }
#pragma unroll
            for (int j = 0; j < BK / 16; j++) {
                u32 pa[4];
                pa[0] = pack2(s[2 * j][0], s[2 * j][1]);
                pa[1] = pack2(s[2 * j][2], s[2 * j][3]);
                pa[2] = pack2(s[2 * j + 1][0], s[2 * j + 1][1]);
                pa[3] = pack2(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
                for (int dn = 0; dn < HD / 8; dn += 2) {
                    u32 b[4];
                    ldm_x4_t(b, vst + v_lane + (u32)((j * 16 * RS + dn * 8) * 2));
                    mma16816(acc[dn], pa, b[0], b[1]);
                    mma16816(acc[dn + 1], pa, b[2], b[3]);
                }
            }
        }
        __syncthreads();
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    u16* op = o + bi * o_sb + h * o_sh;
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++) {
        const int c = dn * 8 + tq * 2;
        if (r0 < l) *(u32*)(op + r0 * o_st + c) = pack2(acc[dn][0] * i0, acc[dn][1] * i0);
        if (r1 < l) *(u32*)(op + r1 * o_st + c) = pack2(acc[dn][2] * i1, acc[dn][3] * i1);
    }
}
"#;

const FUNC: &str = "pg_flash_fwd_bf16";

static SWITCH: Switch = Switch::new("PGATE_FLASH", true);
static PTX: Ptx = Ptx::new("the flash attention kernel", SRC, true);

/// Whether the flash kernel is on (`PGATE_FLASH=0` turns it off, for A/B runs).
pub fn enabled() -> bool {
    SWITCH.on()
}

/// Head dims the kernel is built for (its registers hold a 16-row slice of Q and O per warp; 256
/// would not fit, and those models take the batched-matmul path).
pub fn supports_head_dim(hd: usize) -> bool {
    matches!(hd, 64 | 128)
}

/// Causal attention of a chunk's queries over the cache.
///
/// `q`: `[b, nh, l, hd]` (any strides, last dim contiguous; a transposed `[b, l, nh, hd]` view
/// is read in place); `k_all`, `v_all`: `[b, nkv, nkeys, hd]` with the chunk's queries at the last
/// `l` slots; `pads`: `[b]` u32 on the same device, each row's leading padding slots; `window`: the
/// sliding window (0: none). Returns `[b, l, nh, hd]` contiguous.
pub fn attention(
    q: &Tensor,
    k_all: &Tensor,
    v_all: &Tensor,
    pads: &Tensor,
    scale: f32,
    window: usize,
) -> candle_core::Result<Tensor> {
    let op = Flash {
        pads: pads.clone(),
        scale,
        window,
    };
    q.apply_op3_no_bwd(k_all, v_all, &op)
}

struct Flash {
    pads: Tensor,
    scale: f32,
    window: usize,
}

/// Element strides of a 4-D layout (last dim contiguous, 16-byte aligned rows), or why not.
fn strides4(l: &Layout, what: &str, vec_aligned: bool) -> candle_core::Result<[i64; 3]> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!("flash attention: {what} needs 4 dims with a contiguous last dim");
    }
    let align = if vec_aligned { 8 } else { 2 };
    if l.start_offset() % align != 0 || st[..3].iter().any(|s| s % align != 0) {
        candle_core::bail!("flash attention: {what} rows are not aligned");
    }
    Ok([st[0] as i64, st[1] as i64, st[2] as i64])
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "pgate-flash-attention"
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
        candle_core::bail!("the flash attention kernel runs on CUDA only")
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
            candle_core::bail!("flash attention takes bf16 q, k and v");
        }
        let (b, nh, l, hd) = lq.shape().dims4()?;
        let (kb, nkv, nkeys, khd) = lk.shape().dims4()?;
        if lv.shape().dims() != lk.shape().dims() || kb != b || khd != hd || nkv == 0 {
            candle_core::bail!("flash attention: k/v shapes do not match q");
        }
        if nh % nkv != 0 || nkeys < l || !supports_head_dim(hd) {
            candle_core::bail!(
                "flash attention: unsupported shape q {b}x{nh}x{l}x{hd}, kv {nkv}x{nkeys}"
            );
        }
        let qs = strides4(lq, "q", false)?;
        let ks = strides4(lk, "k", true)?;
        let vs = strides4(lv, "v", true)?;
        let dev = sq.device().clone();
        let (pst, pl) = self.pads.storage_and_layout();
        let Storage::Cuda(pc) = &*pst else {
            candle_core::bail!("flash attention: pads must be on the GPU");
        };
        if self.pads.dims() != [b] || self.pads.dtype() != DType::U32 {
            candle_core::bail!("flash attention: pads must be [{b}] u32");
        }
        let pads = pc
            .as_cuda_slice::<u32>()?
            .slice(pl.start_offset()..pl.start_offset() + b);
        let q = sq.as_cuda_slice::<half::bf16>()?.slice(lq.start_offset()..);
        let k = sk.as_cuda_slice::<half::bf16>()?.slice(lk.start_offset()..);
        let v = sv.as_cuda_slice::<half::bf16>()?.slice(lv.start_offset()..);
        let el = b * l * nh * hd;
        // SAFETY: every output element is written by the kernel (each CTA writes its rows < l).
        let out = unsafe { dev.alloc::<half::bf16>(el)? };
        let module = format!("pgate_flash_{hd}");
        let func =
            dev.get_or_load_custom_func(FUNC, &module, PTX.get(&format!("#define HD {hd}\n"))?)?;
        let (l_i, t0_i, nk_i) = (l as i32, (nkeys - l) as i32, nkeys as i32);
        let (rep_i, win_i) = ((nh / nkv) as i32, self.window.min(i32::MAX as usize) as i32);
        // Output `[b, l, nh, hd]`, addressed as `[b, nh, l, hd]` strides.
        let os = [(l * nh * hd) as i64, hd as i64, (nh * hd) as i64];
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let mut bld = func.builder();
        bld.arg(&q);
        bld.arg(&k);
        bld.arg(&v);
        bld.arg(&out);
        bld.arg(&pads);
        bld.arg(&l_i);
        bld.arg(&t0_i);
        bld.arg(&nk_i);
        bld.arg(&rep_i);
        bld.arg(&win_i);
        for s in qs.iter().chain(&ks).chain(&vs).chain(&os) {
            bld.arg(s);
        }
        bld.arg(&scale_log2);
        let cfg = LaunchConfig {
            grid_dim: (l.div_ceil(64) as u32, nh as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads q/k/v inside the strides checked above (rows < l, keys <
        // nkeys), `b` pads, and writes `b x l x nh x hd` outputs.
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from_dims(&[b, l, nh, hd]),
        ))
    }
}
