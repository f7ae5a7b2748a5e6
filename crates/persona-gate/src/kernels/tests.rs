//! The kernels against candle's own dequantization: `x W^T` with `W = dequantize(quantize(W0))`
//! computed in f64 is the exact answer for the stored weights; the kernels differ from it only by
//! the 8-bit quantization of the activations (well under 1% relative L2). SIMD and scalar paths
//! see the same quantized activations and must agree to f32 rounding.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::act::{ActLayout, QuantActs};
use super::{BlockType, CompactQMatrix, Isa};

/// Deterministic pseudo-random values in [-1, 1) (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        v as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Weights with per-row scale and offset and a few outliers, so scales, mins and the 6-bit
/// fields all vary between sub-blocks.
fn weights(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut w = Vec::with_capacity(n * k);
    for r in 0..n {
        let scale = 0.02 + 0.05 * ((r % 7) as f32);
        let offset = 0.01 * ((r % 5) as f32 - 2.0);
        for c in 0..k {
            let mut v = rng.next() * scale + offset;
            if c % 97 == 13 {
                v *= 6.0;
            }
            w.push(v);
        }
    }
    w
}

/// Activations in [-1, 1), optionally with residual-stream-like outliers (8x every 53rd value).
fn acts(m: usize, k: usize, seed: u64, outliers: bool) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..m * k)
        .map(|i| rng.next() * if outliers && i % 53 == 0 { 8.0 } else { 1.0 })
        .collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

struct Case {
    q: Arc<QTensor>,
    deq: Vec<f32>,
    n: usize,
    k: usize,
}

fn case(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> Case {
    let w = Tensor::from_vec(weights(n, k, seed), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    Case {
        q: Arc::new(q),
        deq,
        n,
        k,
    }
}

fn reference(c: &Case, x: &[f32], m: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * c.n];
    for i in 0..m {
        for r in 0..c.n {
            let xr = &x[i * c.k..(i + 1) * c.k];
            let wr = &c.deq[r * c.k..(r + 1) * c.k];
            y[i * c.n + r] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    y
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|i| i.is_supported())
        .collect()
}

fn check(dtype: GgmlDType, n: usize, k: usize, ms: &[usize]) {
    let c = case(dtype, n, k, 0x9e37_79b9_7f4a_7c15 ^ (n * 31 + k) as u64);
    let mat = CompactQMatrix::from_qtensor(c.q.clone()).expect("supported type");
    let ty = mat.block_type();
    for &m in ms {
        for outliers in [false, true] {
            let x = acts(m, k, 7 + m as u64, outliers);
            let mut scalar = vec![0f32; m * n];
            mat.matmul_with(Isa::Scalar, &x, m, &mut scalar);
            let scalar64: Vec<f64> = scalar.iter().map(|&v| v as f64).collect();
            for isa in isas() {
                let mut got = vec![f32::NAN; m * n];
                mat.matmul_with(isa, &x, m, &mut got);
                // Exact for the quantized activations: only f32 rounding may differ.
                let layout = ActLayout::for_weights(ty, isa);
                let xq = QuantActs::quantize(&x, m, k, layout, isa).dequantize(layout);
                let err = rel_l2(&got, &reference(&c, &xq, m));
                assert!(
                    err < 2e-6,
                    "{dtype:?} [{n},{k}] m={m} {isa:?}: rel L2 vs exact reference {err:.2e}"
                );
                // Against the unquantized activations: the 8-bit activation error, which
                // outliers inflate (they set the block scale). A relative error over a handful of
                // outputs is dominated by chance cancellations, so only larger outputs count.
                let err = rel_l2(&got, &reference(&c, &x, m));
                let tol = if outliers { 3e-2 } else { 1e-2 };
                assert!(
                    m * n < 32 || err < tol,
                    "{dtype:?} [{n},{k}] m={m} {isa:?}: rel L2 vs f32 reference {err:.2e}"
                );
                let agree = rel_l2(&got, &scalar64);
                assert!(
                    agree < 1e-5,
                    "{dtype:?} [{n},{k}] m={m} {isa:?}: rel L2 vs scalar path {agree:.2e}"
                );
            }
        }
    }
}

const MS: &[usize] = &[1, 2, 3, 5, 8, 11];

#[test]
fn q4k_matches_dequantized_reference() {
    check(GgmlDType::Q4K, 37, 512, MS);
    check(GgmlDType::Q4K, 1, 256, &[1, 4]);
}

#[test]
fn q6k_matches_dequantized_reference() {
    check(GgmlDType::Q6K, 37, 512, MS);
    check(GgmlDType::Q6K, 3, 256, &[1, 4]);
}

#[test]
fn q8_0_matches_dequantized_reference() {
    check(GgmlDType::Q8_0, 37, 96, MS);
    check(GgmlDType::Q8_0, 5, 1024, &[1, 4]);
}

/// Big enough to be split over the thread pool.
#[test]
fn parallel_split_matches() {
    check(GgmlDType::Q4K, 301, 1536, &[1, 4]);
    check(GgmlDType::Q6K, 257, 1536, &[1, 3]);
    check(GgmlDType::Q8_0, 263, 1536, &[2]);
}

/// The candle custom op gives the same numbers as `matmul` and keeps leading dimensions.
#[test]
fn custom_op_matches_matmul() {
    let c = case(GgmlDType::Q4K, 33, 256, 3);
    let mat = CompactQMatrix::from_qtensor(c.q.clone()).unwrap();
    let x = acts(6, 256, 11, true);
    let mut want = vec![0f32; 6 * 33];
    mat.matmul(&x, 6, &mut want);
    let xt = Tensor::from_vec(x, (2, 3, 256), &Device::Cpu).unwrap();
    let y = xt.apply_op1_no_bwd(&mat).unwrap();
    assert_eq!(y.dims(), &[2, 3, 33]);
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
}

#[test]
fn rejects_unsupported_and_bad_sizes() {
    let w = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
    assert!(CompactQMatrix::from_qtensor(Arc::new(q)).is_none());
    assert!(CompactQMatrix::from_bytes(vec![0; 10], BlockType::Q4K, 1, 256).is_err());
    assert!(CompactQMatrix::from_bytes(vec![0; 144], BlockType::Q4K, 1, 256).is_ok());
}

/// All-zero activations (amax = 0) give exact zeros, not NaN.
#[test]
fn zero_activations() {
    let c = case(GgmlDType::Q6K, 5, 256, 5);
    let mat = CompactQMatrix::from_qtensor(c.q).unwrap();
    for isa in isas() {
        let mut out = vec![f32::NAN; 10];
        mat.matmul_with(isa, &[0.0; 512], 2, &mut out);
        assert!(out.iter().all(|&v| v == 0.0), "{isa:?}: {out:?}");
    }
}

/// Results are bit-identical whatever the thread count and however chunks land on threads (the
/// pool's governor may run any section inline): every output row is one kernel call.
#[test]
fn results_do_not_depend_on_threads() {
    use super::pool::{GovernorMode, Pool};
    for (dtype, n, k) in [
        (GgmlDType::Q4K, 301, 1536),
        (GgmlDType::Q6K, 257, 1536),
        (GgmlDType::Q8_0, 263, 1536),
    ] {
        let c = case(dtype, n, k, 17);
        let mat = CompactQMatrix::from_qtensor(c.q.clone()).unwrap();
        for m in [1, 4, 8, 11] {
            let x = acts(m, k, 5 + m as u64, true);
            for isa in isas() {
                let one = Pool::new(1, GovernorMode::AlwaysParallel);
                let mut want = vec![f32::NAN; m * n];
                mat.matmul_on(&one, isa, &x, m, &mut want);
                for threads in [2, 3, 4] {
                    let pool = Pool::new(threads, GovernorMode::AlwaysParallel);
                    for _ in 0..3 {
                        let mut got = vec![f32::NAN; m * n];
                        mat.matmul_on(&pool, isa, &x, m, &mut got);
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{dtype:?} m={m} {isa:?} threads={threads}");
                    }
                }
            }
        }
    }
}
