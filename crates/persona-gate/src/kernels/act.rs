//! Activation quantization: f32 rows to 8-bit blocks the weight kernels can dot in integers.
//!
//! Values are `round_ties_even(x * 127 / amax)`, so they lie in [-127, 127]: that keeps
//! `maddubs` (u8 x i8 pair sums into i16) and the sign trick for Q8_0 free of saturation. The
//! rounding is bit-identical whether the compiler vectorizes the loop or not, which lets the tests
//! compare the SIMD kernels against the scalar ones on the same quantized input.

use super::{BlockType, Isa};

/// How quantized activations are laid out for one weight type and instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActLayout {
    /// Q4_K weights, values in natural order; per block one f32 scale and 8 sums of 32 values
    /// (the mins term of Q4_K is per 32 values).
    K4Natural,
    /// Q4_K weights for 512-bit kernels: within each 128 values the 32-value quarters are stored in
    /// the order 0, 2, 1, 3. One 64-byte load of Q4_K nibbles holds values [0, 32) and [64, 96) in
    /// its low nibbles and [32, 64), [96, 128) in its high nibbles, so with this order each nibble
    /// half meets its activations in a single aligned register without any in-loop shuffles.
    K4Interleaved,
    /// Q6_K weights, natural order; per block one f32 scale and 16 sums of 16 values (Q6_K stores
    /// `q + 32` unsigned, and the `-32` offset is applied through these sums).
    K6,
    /// Q8_0 weights: natural order, one f32 scale per 32 values, no sums.
    Q8_0,
}

impl ActLayout {
    pub(crate) fn for_weights(ty: BlockType, isa: Isa) -> Self {
        match ty {
            BlockType::Q4K if isa == Isa::Avx512Vnni => Self::K4Interleaved,
            BlockType::Q4K => Self::K4Natural,
            BlockType::Q6K => Self::K6,
            BlockType::Q8_0 => Self::Q8_0,
        }
    }

    fn block(self) -> usize {
        match self {
            Self::Q8_0 => 32,
            _ => 256,
        }
    }

    /// i16 sums stored per block.
    fn bsum_stride(self) -> usize {
        match self {
            Self::K4Natural | Self::K4Interleaved => 8,
            Self::K6 => 16,
            Self::Q8_0 => 0,
        }
    }
}

/// `m` quantized activation rows of width `k`.
pub(crate) struct QuantActs {
    qs: Vec<i8>,
    d: Vec<f32>,
    bsums: Vec<i16>,
    k: usize,
    nb: usize,
    bsum_stride: usize,
}

/// Raw view of quantized rows starting at some row, for the kernels: row `i`, block `b` has its
/// values at `qs + i * k + b * block`, its scale at `d[i * nb + b]` and its sums at
/// `bsums + (i * nb + b) * bsum_stride`.
pub(crate) struct ActView {
    pub qs: *const i8,
    pub d: *const f32,
    pub bsums: *const i16,
    pub k: usize,
    pub nb: usize,
    pub bsum_stride: usize,
}

impl QuantActs {
    pub(crate) fn quantize(x: &[f32], m: usize, k: usize, layout: ActLayout, isa: Isa) -> Self {
        let block = layout.block();
        debug_assert_eq!(k % block, 0);
        let nb = k / block;
        let stride = layout.bsum_stride();
        let mut acts = Self {
            qs: vec![0; m * k],
            d: vec![0.0; m * nb],
            bsums: vec![0; m * nb * stride],
            k,
            nb,
            bsum_stride: stride,
        };
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            // SAFETY: a non-scalar Isa is only used where AVX2 was detected.
            unsafe { quantize_avx2(x, layout, &mut acts) };
            return acts;
        }
        let _ = isa;
        quantize_rows(x, layout, &mut acts);
        acts
    }

    /// The values these blocks stand for (`d * q`), in natural order: what the kernels multiply
    /// the weights by, for exact-reference tests.
    #[cfg(test)]
    pub(crate) fn dequantize(&self, layout: ActLayout) -> Vec<f32> {
        let block = layout.block();
        let mut out = Vec::with_capacity(self.qs.len());
        for (qb, d) in self.qs.chunks_exact(block).zip(&self.d) {
            let start = out.len();
            out.extend(qb.iter().map(|&q| q as f32 * d));
            if layout == ActLayout::K4Interleaved {
                let mut nat = out[start..].to_vec();
                for (h, c) in nat.chunks_exact_mut(128).enumerate() {
                    let src = &out[start + h * 128..start + (h + 1) * 128];
                    c[32..64].copy_from_slice(&src[64..96]);
                    c[64..96].copy_from_slice(&src[32..64]);
                }
                out[start..].copy_from_slice(&nat);
            }
        }
        out
    }

    /// View starting at row `i0`.
    pub(crate) fn view(&self, i0: usize) -> ActView {
        ActView {
            qs: self.qs[i0 * self.k..].as_ptr(),
            d: self.d[i0 * self.nb..].as_ptr(),
            bsums: self.bsums[(i0 * self.nb * self.bsum_stride).min(self.bsums.len())..].as_ptr(),
            k: self.k,
            nb: self.nb,
            bsum_stride: self.bsum_stride,
        }
    }
}

/// Same code as [`quantize_rows`], compiled with AVX2 so the rounding loop vectorizes
/// (`vroundps` instead of a libm call per value at the x86-64 baseline).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], layout: ActLayout, acts: &mut QuantActs) {
    quantize_rows(x, layout, acts)
}

#[inline(always)]
fn quantize_rows(x: &[f32], layout: ActLayout, acts: &mut QuantActs) {
    let block = layout.block();
    let stride = layout.bsum_stride();
    let mut tmp = [0i8; 256];
    for (bi, ((xb, qb), d)) in x
        .chunks_exact(block)
        .zip(acts.qs.chunks_exact_mut(block))
        .zip(acts.d.iter_mut())
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        *d = amax / 127.0;
        let t = &mut tmp[..block];
        for (q, v) in t.iter_mut().zip(xb) {
            // |v * id| <= 127 up to rounding, and NaN casts to 0.
            *q = (v * id).round_ties_even() as i8;
        }
        if stride > 0 {
            let sums = &mut acts.bsums[bi * stride..(bi + 1) * stride];
            let span = block / stride;
            for (s, c) in sums.iter_mut().zip(t.chunks_exact(span)) {
                *s = c.iter().map(|&q| q as i16).sum();
            }
        }
        if layout == ActLayout::K4Interleaved {
            for (h, dst) in qb.chunks_exact_mut(128).enumerate() {
                let src = &t[h * 128..(h + 1) * 128];
                dst[0..32].copy_from_slice(&src[0..32]);
                dst[32..64].copy_from_slice(&src[64..96]);
                dst[64..96].copy_from_slice(&src[32..64]);
                dst[96..128].copy_from_slice(&src[96..128]);
            }
        } else {
            qb.copy_from_slice(t);
        }
    }
}
