//! Small-batch quantized matmul throughput: persona-gate's compact kernels against candle's
//! `QMatMul` on q15-shaped matrices (Qwen2.5-1.5B: d=1536, ffn=8960, vocab=151936).
//!
//! Memory-bound work is only measured honestly when the weights come from DRAM, so every case
//! cycles through enough distinct copies of its matrix to overflow the last-level cache
//! (>= 96 MB per case). Reports the median over repetitions, in ms per matmul and in GB/s of
//! weight bytes read. Run: `cargo bench -p persona-gate --bench gemv`; arguments after `--`:
//! `m=1,4` (activation rows), `case=Q6K` (substring of the matrix name), `quick` (fewer reps),
//! `ours` (skip candle). `RAYON_NUM_THREADS` sets the thread count for both. The machine is
//! shared: check that it is idle first, and repeat.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use persona_gate::kernels::CompactQMatrix;

const WORKING_SET: usize = 96 << 20;

struct Case {
    name: &'static str,
    dtype: GgmlDType,
    n: usize,
    k: usize,
}

/// Random-ish block bytes for an `[n, k]` matrix: quantize a small random matrix and tile its
/// bytes (the values do not matter for timing, only that scales are sane).
fn matrix_bytes(dtype: GgmlDType, n: usize, k: usize, seed: u32) -> Vec<u8> {
    let rows = 64.min(n);
    let mut s = seed.wrapping_mul(2654435761).max(1);
    let vals: Vec<f32> = (0..rows * k)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 0.1
        })
        .collect();
    let t = Tensor::from_vec(vals, (rows, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let small = q.data().unwrap().into_owned();
    let row_bytes = small.len() / rows;
    let mut out = Vec::with_capacity(n * row_bytes);
    for r in 0..n {
        let src = (r % rows) * row_bytes;
        out.extend_from_slice(&small[src..src + row_bytes]);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    let ms: Vec<usize> = args
        .iter()
        .find_map(|a| a.strip_prefix("m="))
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16]);
    let only: Option<&str> = args.iter().find_map(|a| a.strip_prefix("case="));
    let skip_candle = args.iter().any(|a| a == "ours");
    let cases = [
        Case {
            name: "ffn_up   [8960,1536] Q4K",
            dtype: GgmlDType::Q4K,
            n: 8960,
            k: 1536,
        },
        Case {
            name: "attn_q   [1536,1536] Q4K",
            dtype: GgmlDType::Q4K,
            n: 1536,
            k: 1536,
        },
        Case {
            name: "attn_k   [256,1536]  Q4K",
            dtype: GgmlDType::Q4K,
            n: 256,
            k: 1536,
        },
        Case {
            name: "ffn_down [1536,8960] Q6K",
            dtype: GgmlDType::Q6K,
            n: 1536,
            k: 8960,
        },
        Case {
            name: "output [151936,1536] Q6K",
            dtype: GgmlDType::Q6K,
            n: 151936,
            k: 1536,
        },
        Case {
            name: "q8_0     [8960,1536]    ",
            dtype: GgmlDType::Q8_0,
            n: 8960,
            k: 1536,
        },
    ];
    let reps: usize = if quick { 5 } else { 15 };
    println!(
        "threads: candle pool {}",
        candle_core::utils::barrier_pool().n_workers() + 1
    );
    println!(
        "{:<26} {:>3} {:>10} {:>9} {:>10} {:>9} {:>7}",
        "matrix", "m", "ours ms", "GB/s", "candle ms", "GB/s", "speedup"
    );
    for c in &cases {
        if let Some(o) = only {
            if !c.name.contains(o) {
                continue;
            }
        }
        let one = matrix_bytes(c.dtype, c.n, c.k, 1);
        let bytes = one.len();
        let copies = WORKING_SET.div_ceil(bytes).max(1);
        let qs: Vec<Arc<QTensor>> = (0..copies)
            .map(|i| {
                let mut b = one.clone();
                b[0] ^= i as u8; // distinct pages, same magnitudes
                Arc::new(qtensor_from_ggml(c.dtype, &b, vec![c.n, c.k], &Device::Cpu).unwrap())
            })
            .collect();
        drop(one);
        let ours: Vec<CompactQMatrix> = qs
            .iter()
            .map(|q| CompactQMatrix::from_qtensor(q.clone()).unwrap())
            .collect();
        let theirs: Vec<QMatMul> = qs
            .iter()
            .map(|q| QMatMul::from_arc(q.clone()).unwrap())
            .collect();
        for &m in &ms {
            let x: Vec<f32> = (0..m * c.k)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (m, c.k), &Device::Cpu).unwrap();
            let mut out = vec![0f32; m * c.n];
            // passes over all copies; one pass = `copies` matmuls
            let passes = (reps * 4).div_ceil(copies).max(reps.min(5));
            let mut t_ours = Vec::new();
            let mut t_candle = Vec::new();
            for p in 0..passes + 1 {
                let t0 = Instant::now();
                for q in &ours {
                    q.matmul(&x, m, &mut out);
                }
                let dt = t0.elapsed().as_secs_f64() / copies as f64;
                let t0 = Instant::now();
                if !skip_candle {
                    for q in &theirs {
                        std::hint::black_box(q.forward(&xt).unwrap());
                    }
                }
                let dt2 = t0.elapsed().as_secs_f64() / copies as f64;
                if p > 0 {
                    t_ours.push(dt);
                    t_candle.push(dt2);
                }
            }
            let (a, b) = (median(t_ours), median(t_candle));
            if skip_candle {
                println!(
                    "{:<26} {:>3} {:>10.3} {:>9.1}",
                    c.name,
                    m,
                    a * 1e3,
                    bytes as f64 / a / 1e9
                );
                continue;
            }
            println!(
                "{:<26} {:>3} {:>10.3} {:>9.1} {:>10.3} {:>9.1} {:>6.2}x",
                c.name,
                m,
                a * 1e3,
                bytes as f64 / a / 1e9,
                b * 1e3,
                bytes as f64 / b / 1e9,
                b / a
            );
        }
    }
}
