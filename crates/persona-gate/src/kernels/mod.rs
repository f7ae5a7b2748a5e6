//! Small-batch quantized matmuls on the CPU that stream the GGUF blocks as stored.
//!
//! Why this exists: batch-1 decode is a chain of GEMVs whose cost is reading every weight byte once
//! per token. candle's x86 path repacks Q4_K into 16-row tiles with f32 scales (1.33x the bytes of
//! the compact blocks) and runs Q6_K through a generic dot product, so a decode step reads more
//! memory than the model holds and spends time in the thread pool. Here every row of a Q4_K / Q6_K /
//! Q8_0 matrix is read in its compact GGUF form exactly once per call, whatever the number of
//! activation rows (up to [`MAX_ROWS_PER_PASS`] per pass), so the kernels run near the machine's
//! memory bandwidth. For larger batches candle's tiles win (they reuse unpacked weights across many
//! rows), so callers should keep candle for `m` above [`CompactQMatrix::max_rows`].
//!
//! Numerics follow ggml's integer dot products: activations are quantized per row to 8-bit blocks
//! (one f32 scale per 256 values for the k-quants, per 32 for Q8_0) and every block dot product is
//! exact in i32 before one f32 multiply-add, so all code paths (AVX512-VNNI, AVX2, scalar) agree up
//! to f32 summation order.

mod act;
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda_argmax;
#[cfg(feature = "cuda")]
pub mod cuda_decode;
#[cfg(feature = "cuda")]
pub mod cuda_flash;
#[cfg(feature = "cuda")]
pub mod cuda_glu;
#[cfg(feature = "cuda")]
pub mod cuda_rope;
#[cfg(feature = "cuda")]
pub mod cuda_softmax;
#[cfg(feature = "cuda")]
mod nvrtc;
mod pool;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use act::{ActLayout, QuantActs};
use pool::Pool;
pub use pool::{init_threads, set_threads, threads};

/// Activation rows handled per pass over the weights: the kernels keep one accumulator per row in
/// registers, and 8 rows still fit the AVX512 register file next to the unpacked weights.
pub const MAX_ROWS_PER_PASS: usize = 8;

/// Below this many weight bytes a matmul runs on the calling thread alone: waking the pool costs a
/// few microseconds, as much as streaming this many bytes on one core.
const PAR_MIN_BYTES: usize = 96 * 1024;

/// The GGUF block types the kernels read directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// 256 values: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.
    Q4K,
    /// 256 values: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 i8 scales, f16 d.
    Q6K,
    /// 32 values: f16 d, 32 i8.
    Q8_0,
}

impl BlockType {
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        match t {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Values per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => 256,
            Self::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q6K => 210,
            Self::Q8_0 => 34,
        }
    }
}

/// Which instruction set the kernels use; detected once, overridable for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX512 F/BW/VL + VNNI (plus the AVX2 set).
    Avx512Vnni,
}

impl Isa {
    /// The best instruction set this CPU supports. `PGATE_KERNEL_ISA=scalar|avx2` caps it, so the
    /// fallbacks can be timed and checked on a machine that has AVX512.
    pub fn detect() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best_supported();
            match std::env::var("PGATE_KERNEL_ISA").as_deref() {
                Ok("scalar") => Self::Scalar,
                Ok("avx2") if best != Self::Scalar => Self::Avx2,
                _ => best,
            }
        })
    }

    /// Whether this CPU can run `self`'s kernels.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Scalar => true,
            Self::Avx2 => Self::best_supported() != Self::Scalar,
            Self::Avx512Vnni => Self::best_supported() == Self::Avx512Vnni,
        }
    }

    fn best_supported() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            if avx512 {
                return Self::Avx512Vnni;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }
}

/// Where a matrix's block bytes live. Sharing a candle `QTensor` avoids a second copy of the
/// weights: its CPU storage is exactly the GGUF block array, and `data()` borrows it.
#[derive(Clone)]
enum Backing {
    Shared(Arc<QTensor>),
    Owned(Arc<Vec<u8>>),
}

/// A quantized weight matrix `[n, k]` (n output features, k input features) kept in its compact GGUF
/// block layout, rows contiguous, for `y = x W^T` with few activation rows.
#[derive(Clone)]
pub struct CompactQMatrix {
    backing: Backing,
    ty: BlockType,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for CompactQMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactQMatrix")
            .field("ty", &self.ty)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl CompactQMatrix {
    /// Share a CPU `QTensor`'s blocks. `None` when its type has no kernel here, it is not on the
    /// CPU, or it is not a 2-D matrix whose rows are whole blocks.
    pub fn from_qtensor(q: Arc<QTensor>) -> Option<Self> {
        let ty = BlockType::from_ggml(q.dtype())?;
        if !q.device().is_cpu() {
            return None;
        }
        let (n, k) = q.shape().dims2().ok()?;
        if k == 0 || !k.is_multiple_of(ty.block_elems()) {
            return None;
        }
        let data = q.data().ok()?;
        if data.len() != n * (k / ty.block_elems()) * ty.block_bytes() {
            return None;
        }
        drop(data);
        Some(Self {
            backing: Backing::Shared(q),
            ty,
            n,
            k,
        })
    }

    /// Own raw GGUF block bytes (row-major: `n` rows of `k / block_elems` blocks).
    pub fn from_bytes(bytes: Vec<u8>, ty: BlockType, n: usize, k: usize) -> crate::Result<Self> {
        if k == 0 || !k.is_multiple_of(ty.block_elems()) {
            return Err(crate::Error::InvalidValue(format!(
                "{ty:?} matrix needs k to be a multiple of {}, got {k}",
                ty.block_elems()
            )));
        }
        let want = n * (k / ty.block_elems()) * ty.block_bytes();
        if bytes.len() != want {
            return Err(crate::Error::InvalidValue(format!(
                "{ty:?} matrix [{n}, {k}] needs {want} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Self {
            backing: Backing::Owned(Arc::new(bytes)),
            ty,
            n,
            k,
        })
    }

    pub fn block_type(&self) -> BlockType {
        self.ty
    }

    /// Output features (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The most activation rows for which these kernels beat candle's `QMatMul` on this CPU; use
    /// candle above it. Measured with `benches/gemv.rs` on the reference machine (2 Zen 4 cores,
    /// AVX512-VNNI) at q15's shapes:
    /// - Q4_K: ahead up to m = 8 (1.9x at m = 1, 1.1-1.3x at m = 8), behind at 16, where candle's
    ///   16-row tiles reuse each unpacked weight for many rows.
    /// - Q6_K: ahead up to m = 4 (1.0-1.2x at m = 1, 1.1-1.9x at m = 4); at m = 8 it depends on k
    ///   (wide rows spill the activations out of L1).
    /// - Q8_0: candle's repacked VNNI tiles are no bigger than the compact blocks and already
    ///   stream at full bandwidth, so candle is kept; without AVX512-VNNI candle has no SIMD
    ///   Q8_0 path and these kernels win for small batches.
    pub fn max_rows(&self) -> usize {
        match (self.ty, Isa::detect()) {
            (BlockType::Q4K, _) => 8,
            (BlockType::Q6K, _) => 4,
            (BlockType::Q8_0, Isa::Avx512Vnni) => 0,
            (BlockType::Q8_0, _) => 8,
        }
    }

    /// Bytes of weights one pass reads.
    pub fn size_in_bytes(&self) -> usize {
        self.n * self.row_bytes()
    }

    fn row_bytes(&self) -> usize {
        self.k / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// `out[m, n] = x[m, k] W^T`, both row-major, with the best kernels for this CPU.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, m, out)
    }

    /// [`Self::matmul`] with a chosen instruction set (falls back to scalar when unsupported).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_on(pool::global(), isa, x, m, out)
    }

    /// [`Self::matmul_with`] on a given thread pool (tests compare thread counts with it).
    fn matmul_on(&self, pool: &Pool, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "x must be m x k");
        assert_eq!(out.len(), m * self.n, "out must be m x n");
        if m == 0 || self.n == 0 {
            return;
        }
        let isa = if isa.is_supported() { isa } else { Isa::Scalar };
        let layout = ActLayout::for_weights(self.ty, isa);
        let acts = QuantActs::quantize(x, m, self.k, layout, isa);
        let data = match &self.backing {
            Backing::Shared(q) => q.data().expect("CPU QTensor data is always readable"),
            Backing::Owned(v) => std::borrow::Cow::Borrowed(v.as_slice()),
        };
        let w = WeightsView {
            ptr: data.as_ptr(),
            row_bytes: self.row_bytes(),
            k: self.k,
        };
        let outp = OutPtr(out.as_mut_ptr());
        let n = self.n;
        let ty = self.ty;
        let run = |rows: Range<usize>| {
            // SAFETY: every call gets a disjoint row range, so the (row i, column r) cells written
            // through `outp` never overlap between threads; `out` outlives the parallel region.
            let outp = &outp;
            for i0 in (0..m).step_by(MAX_ROWS_PER_PASS) {
                let mm = (m - i0).min(MAX_ROWS_PER_PASS);
                let a = acts.view(i0);
                unsafe {
                    run_kernel(isa, ty, mm, &w, rows.clone(), &a, outp.0.add(i0 * n), n);
                }
            }
        };
        par_rows(
            pool,
            n,
            self.size_in_bytes() * m.div_ceil(MAX_ROWS_PER_PASS),
            run,
        );
    }
}

/// Raw pointer to the output, shared by the threads that fill disjoint parts of it.
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint elements (see `matmul_with`).
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// The weight bytes as kernels see them: `row_bytes` per row, rows contiguous.
pub(crate) struct WeightsView {
    pub ptr: *const u8,
    pub row_bytes: usize,
    pub k: usize,
}
// SAFETY: read-only view of bytes that outlive the parallel region.
unsafe impl Sync for WeightsView {}

/// Run one kernel over weight rows `rows` for `m` (1..=8) activation rows starting at `a`.
///
/// # Safety
/// `w` must hold at least `rows.end` rows, `a` at least `m` quantized rows of the matching layout,
/// and `out` must have room for `m` rows of `n` values.
#[allow(clippy::too_many_arguments)]
unsafe fn run_kernel(
    isa: Isa,
    ty: BlockType,
    m: usize,
    w: &WeightsView,
    rows: Range<usize>,
    a: &act::ActView,
    out: *mut f32,
    n: usize,
) {
    macro_rules! by_m {
        ($($f:ident)::+) => {
            match m {
                1 => $($f)::+::<1>(w, rows, a, out, n),
                2 => $($f)::+::<2>(w, rows, a, out, n),
                3 => $($f)::+::<3>(w, rows, a, out, n),
                4 => $($f)::+::<4>(w, rows, a, out, n),
                5 => $($f)::+::<5>(w, rows, a, out, n),
                6 => $($f)::+::<6>(w, rows, a, out, n),
                7 => $($f)::+::<7>(w, rows, a, out, n),
                _ => $($f)::+::<8>(w, rows, a, out, n),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => match ty {
            BlockType::Q4K => by_m!(x86::q4k_512),
            BlockType::Q6K => by_m!(x86::q6k_512),
            BlockType::Q8_0 => by_m!(x86::q8_0_512),
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => match ty {
            BlockType::Q4K => by_m!(x86::q4k_256),
            BlockType::Q6K => by_m!(x86::q6k_256),
            BlockType::Q8_0 => by_m!(x86::q8_0_256),
        },
        _ => match ty {
            BlockType::Q4K => scalar::q4k(m, w, rows, a, out, n),
            BlockType::Q6K => scalar::q6k(m, w, rows, a, out, n),
            BlockType::Q8_0 => scalar::q8_0(m, w, rows, a, out, n),
        },
    }
}

/// Split `n` weight rows over the kernels' thread pool ([`pool`]: workers that sleep rather than
/// spin, and that stop being used while other processes hold the cores) in a handful of contiguous
/// chunks per thread: contiguous ranges keep each core's hardware prefetcher on one long stream, and
/// the pool's shared cursor lets the caller take over chunks a descheduled worker has not started.
/// Each output row is computed by one kernel call whatever the split, so results do not depend on the
/// thread count.
fn par_rows<F: Fn(Range<usize>) + Sync>(pool: &Pool, n: usize, bytes: usize, f: F) {
    let threads = pool.threads();
    if threads == 1 || bytes < PAR_MIN_BYTES || n < 2 * threads {
        f(0..n);
        return;
    }
    // 4 chunks per thread: enough to rebalance, few enough that each is a long stream.
    let chunks = (threads * 4).min(n);
    let per = n.div_ceil(chunks);
    // The bytes read name the matmul (shape and passes) for the pool's governor.
    pool.run(n.div_ceil(per), bytes as u64, |c| {
        f(c * per..((c + 1) * per).min(n))
    });
}

impl CustomOp1 for CompactQMatrix {
    fn name(&self) -> &'static str {
        "compact-qmatmul"
    }

    /// `x` of shape `[..., k]` (f32, contiguous) to `[..., n]`.
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("compact-qmatmul: input must be contiguous");
        };
        let CpuStorage::F32(xs) = storage else {
            candle_core::bail!("compact-qmatmul: input must be f32");
        };
        let dims = layout.shape().dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("compact-qmatmul: input must have rank >= 1");
        };
        if k != self.k {
            candle_core::bail!(
                "compact-qmatmul: input width {k} does not match the weight's {}",
                self.k
            );
        }
        let m: usize = lead.iter().product();
        let mut out = vec![0f32; m * self.n];
        self.matmul(&xs[start..end], m, &mut out);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.n;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}
