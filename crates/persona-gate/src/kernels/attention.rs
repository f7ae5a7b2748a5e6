//! Attention whose result for one query row does not depend on what else is in the batch.
//!
//! Why this exists: candle's batched matmul and softmax are accurate, but their summation order
//! depends on a row's padded length and alignment (GEMM blocking over the key axis, SIMD lanes of
//! the softmax sum). The same prompt decoded alone, left-padded in a study batch, or in a server's
//! continuous batch therefore rounds differently, and greedy decoding parts at a near-tie. An audit
//! that compares a served model with the same model run locally then shows 1-2% label flips that say
//! nothing about the server. Here each query row is one sequential loop over the keys it may see, in
//! cache order, skipping masked keys entirely: padding and the cache's spare slots change neither
//! which keys a row reads nor the order it adds them in, so the result is bit-identical.
//!
//! The cost is a plain loop instead of tiled GEMMs: attention is a small part of a decode step at
//! the context lengths studies use (BENCHMARKS.md measures the whole batch-invariant mode).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

/// `softmax(q k^T * scale + mask) v` for `q: [b, g, r, hd]` (g KV heads, r = n_rep * l query rows
/// per KV head, row `i` at chunk position `i % l`), `k, v: [b, g, total, hd]` (any strides with a
/// unit last stride, e.g. a view into a larger cache) and an additive mask `[b, l, total]` of 0 and
/// -inf (`None`: every key visible). Output `[b, g, r, hd]`, f32.
#[derive(Debug, Clone)]
pub struct InvariantAttention {
    pub scale: f32,
    /// Query positions per chunk (rows per head).
    pub l: usize,
    pub mask: Option<Arc<Vec<f32>>>,
}

/// A 4-D f32 view: data, element offset and strides of the first three dims.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 3],
}

impl<'a> View<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("invariant attention: {what} must be f32");
        };
        let st = l.stride();
        if st.len() != 4 || st[3] != 1 {
            candle_core::bail!("invariant attention: {what} must be 4-D with a unit last stride");
        }
        Ok(Self {
            data,
            offset: l.start_offset(),
            strides: [st[0], st[1], st[2]],
        })
    }

    fn row(&self, a: usize, b: usize, c: usize, len: usize) -> &'a [f32] {
        let o = self.offset + a * self.strides[0] + b * self.strides[1] + c * self.strides[2];
        &self.data[o..o + len]
    }
}

/// Dot product in one fixed order (8 partial sums, then a fixed tree), whatever the caller.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[i] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

impl InvariantAttention {
    /// One query row: `out = sum_j softmax_j * v_j` over the visible keys, in key order.
    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        q: &[f32],
        k: &View,
        v: &View,
        (bi, g): (usize, usize),
        mask: Option<&[f32]>,
        total: usize,
        scratch: &mut Vec<(usize, f32)>,
        out: &mut [f32],
    ) {
        let hd = q.len();
        scratch.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..total {
            let m = mask.map_or(0.0, |m| m[j]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let s = dot(q, k.row(bi, g, j, hd)) * self.scale + m;
            max = max.max(s);
            scratch.push((j, s));
        }
        out.fill(0.0);
        if scratch.is_empty() {
            return;
        }
        let mut sum = 0f32;
        for (_, s) in scratch.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for &(j, e) in scratch.iter() {
            let p = e / sum;
            for (o, x) in out.iter_mut().zip(v.row(bi, g, j, hd)) {
                *o += p * x;
            }
        }
    }
}

impl CustomOp3 for InvariantAttention {
    fn name(&self) -> &'static str {
        "invariant-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g, r, hd) = ql.shape().dims4()?;
        let (kb, kg, total, khd) = kl.shape().dims4()?;
        if (kb, kg, khd) != (b, g, hd) || vl.shape() != kl.shape() {
            candle_core::bail!(
                "invariant attention: q {:?}, k {:?}, v {:?} do not fit",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if self.l == 0 || r % self.l != 0 {
            candle_core::bail!(
                "invariant attention: {r} query rows are not a multiple of l = {}",
                self.l
            );
        }
        if let Some(m) = &self.mask {
            if m.len() != b * self.l * total {
                candle_core::bail!(
                    "invariant attention: mask of {} values for [{b}, {}, {total}]",
                    m.len(),
                    self.l
                );
            }
        }
        let (q, k, v) = (
            View::new(qs, ql, "q")?,
            View::new(ks, kl, "k")?,
            View::new(vs, vl, "v")?,
        );
        let units = b * g * r;
        let mut out = vec![0f32; units * hd];
        let outp = OutPtr(out.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            let outp = &outp;
            let mut scratch = Vec::with_capacity(total);
            for u in range {
                let (bi, g_i, ri) = (u / (g * r), (u / r) % g, u % r);
                let mask = self.mask.as_ref().map(|m| {
                    let o = (bi * self.l + ri % self.l) * total;
                    &m[o..o + total]
                });
                // SAFETY: unit `u` owns out[u*hd .. (u+1)*hd]; units are disjoint across threads
                // and `out` outlives the parallel region.
                let o = unsafe { std::slice::from_raw_parts_mut(outp.0.add(u * hd), hd) };
                self.row(
                    q.row(bi, g_i, ri, hd),
                    &k,
                    &v,
                    (bi, g_i),
                    mask,
                    total,
                    &mut scratch,
                    o,
                );
            }
        };
        // Each unit is one query row computed by one `row` call, so the split does not change any
        // result; the kernels' pool sleeps instead of spinning while it waits (see `pool`).
        let pool = super::pool::global();
        let threads = pool.threads();
        if threads == 1 || units < 2 * threads {
            run(0..units);
        } else {
            let chunks = (threads * 4).min(units);
            let per = units.div_ceil(chunks);
            // No governor key: the work grows with the context, so no two sections compare.
            pool.run(units.div_ceil(per), 0, |c| {
                run(c * per..((c + 1) * per).min(units))
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, g, r, hd))))
    }
}

/// Raw pointer to the output, shared by the threads that fill disjoint rows of it.
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint rows (see `cpu_fwd`).
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// One sequence's attention equals the softmax formula, and is bit-identical when the same
    /// keys sit behind left padding in a longer cache (a batch of two with different lengths).
    #[test]
    fn padding_changes_no_bit() {
        let dev = Device::Cpu;
        let (g, n_rep, hd, len, pad) = (2, 3, 20, 13, 7);
        let total = len + pad;
        let q = rand(g * n_rep * hd, 1);
        let kk = rand(g * len * hd, 2);
        let vv = rand(g * len * hd, 3);
        let attend = |qs: &[f32], ks: &[f32], vs: &[f32], b: usize, t: usize, mask: Vec<f32>| {
            let q = Tensor::from_slice(qs, (b, g, n_rep, hd), &dev).unwrap();
            let k = Tensor::from_slice(ks, (b, g, t, hd), &dev).unwrap();
            let v = Tensor::from_slice(vs, (b, g, t, hd), &dev).unwrap();
            let op = InvariantAttention {
                scale: 0.3,
                l: 1,
                mask: Some(Arc::new(mask)),
            };
            q.apply_op3_no_bwd(&k, &v, &op)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let alone = attend(&q, &kk, &vv, 1, len, vec![0.0; len]);

        // Batch of two: row 0 = some other sequence (full length), row 1 = ours behind `pad` slots
        // of garbage that the mask hides.
        let other_q = rand(g * n_rep * hd, 4);
        let mut qb = other_q.clone();
        qb.extend_from_slice(&q);
        let mut kb = rand(g * total * hd, 5);
        let mut vb = rand(g * total * hd, 6);
        let mut k1 = vec![f32::NAN; g * total * hd];
        let mut v1 = vec![f32::NAN; g * total * hd];
        for gi in 0..g {
            for j in 0..len {
                let src = (gi * len + j) * hd;
                let dst = (gi * total + pad + j) * hd;
                k1[dst..dst + hd].copy_from_slice(&kk[src..src + hd]);
                v1[dst..dst + hd].copy_from_slice(&vv[src..src + hd]);
            }
        }
        kb.extend_from_slice(&k1);
        vb.extend_from_slice(&v1);
        let mut mask = vec![0.0; total];
        mask.extend((0..total).map(|j| if j < pad { f32::NEG_INFINITY } else { 0.0 }));
        let batched = attend(&qb, &kb, &vb, 2, total, mask);
        let ours = &batched[g * n_rep * hd..];
        assert_eq!(alone.len(), ours.len());
        for (a, b) in alone.iter().zip(ours) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
        }

        // And it is attention: compare with the formula in f64.
        for gi in 0..g {
            for r in 0..n_rep {
                let qr = &q[(gi * n_rep + r) * hd..][..hd];
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        let kr = &kk[(gi * len + j) * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            * 0.3
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = (0..len)
                        .map(|j| e[j] / z * vv[(gi * len + j) * hd + d] as f64)
                        .sum();
                    let got = alone[(gi * n_rep + r) * hd + d] as f64;
                    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                }
            }
        }
    }
}
