//! Portable kernels: the reference the SIMD paths are tested against, and the path on CPUs
//! without AVX2. Same integer arithmetic as the SIMD kernels (exact i32 per block, one f32
//! multiply-add per block), written for clarity rather than speed.

use std::ops::Range;

use super::act::ActView;
use super::WeightsView;

/// Read a little-endian f16 at `p`.
#[inline(always)]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
}

/// Unpack Q4_K's 12 bytes of 6-bit fields into (8 scales, 8 mins), one per 32 values, as two
/// little-endian u64 of bytes. Layout (ggml): for j < 4 the scale is `s[j] & 63` and the min
/// `s[j + 4] & 63`; for j >= 4 the low 4 bits come from `s[j + 4]` (scale: low nibble, min: high
/// nibble) and the top 2 bits from the spare high bits of `s[j - 4]` (scale) and `s[j]` (min).
/// Done on 32-bit words, four sub-blocks at a time.
#[inline(always)]
pub(crate) fn q4k_scales_mins(s: &[u8; 12]) -> (u64, u64) {
    let w0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let w1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let w2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = w0 & 0x3f3f_3f3f;
    let mn_lo = w1 & 0x3f3f_3f3f;
    let sc_hi = (w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4);
    (
        sc_lo as u64 | ((sc_hi as u64) << 32),
        mn_lo as u64 | ((mn_hi as u64) << 32),
    )
}

/// Q4_K rows against activations in [`super::act::ActLayout::K4Natural`].
///
/// # Safety
/// See [`super::run_kernel`].
pub(crate) unsafe fn q4k(
    m: usize,
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 256;
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        for i in 0..m {
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = row.add(b * 144);
                let d = f16_at(blk);
                let dmin = f16_at(blk.add(2));
                let (sc, mn) = q4k_scales_mins(&*(blk.add(4) as *const [u8; 12]));
                let qs = std::slice::from_raw_parts(blk.add(16), 128);
                let aq = std::slice::from_raw_parts(a.qs.add(i * a.k + b * 256), 256);
                let bs = std::slice::from_raw_parts(a.bsums.add((i * a.nb + b) * a.bsum_stride), 8);
                let mut sumi = 0i32;
                let mut summ = 0i32;
                for j in 0..8 {
                    // sub-block j: chunk j / 2 of 32 bytes, low nibbles for even j, high for odd
                    let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                    let shift = 4 * (j % 2);
                    let dot: i32 = chunk
                        .iter()
                        .zip(&aq[j * 32..j * 32 + 32])
                        .map(|(&q, &x)| ((q >> shift) & 0xF) as i32 * x as i32)
                        .sum();
                    sumi += ((sc >> (8 * j)) & 0xFF) as i32 * dot;
                    summ += ((mn >> (8 * j)) & 0xFF) as i32 * bs[j] as i32;
                }
                let da = *a.d.add(i * a.nb + b);
                acc += da * (d * sumi as f32 - dmin * summ as f32);
            }
            *out.add(i * n + r) = acc;
        }
    }
}

/// Q6_K rows against activations in [`super::act::ActLayout::K6`].
///
/// # Safety
/// See [`super::run_kernel`].
pub(crate) unsafe fn q6k(
    m: usize,
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 256;
    let mut q = [0i8; 256];
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        for b in 0..nb {
            let blk = row.add(b * 210);
            // ggml layout: per 128-value half h, value l (+32, +64, +96) takes the low/high nibble
            // of ql[64h + l] (or ql[64h + 32 + l]) and bit pair 0/1/2/3 of qh[32h + l].
            for h in 0..2 {
                let ql = std::slice::from_raw_parts(blk.add(64 * h), 64);
                let qh = std::slice::from_raw_parts(blk.add(128 + 32 * h), 32);
                for l in 0..32 {
                    let base = 128 * h + l;
                    q[base] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    q[base + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    q[base + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    q[base + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                }
            }
            let scales = std::slice::from_raw_parts(blk.add(192) as *const i8, 16);
            let d = f16_at(blk.add(208));
            for i in 0..m {
                let aq = std::slice::from_raw_parts(a.qs.add(i * a.k + b * 256), 256);
                let mut sumi = 0i32;
                for (j, &s) in scales.iter().enumerate() {
                    let dot: i32 = q[j * 16..j * 16 + 16]
                        .iter()
                        .zip(&aq[j * 16..j * 16 + 16])
                        .map(|(&w, &x)| w as i32 * x as i32)
                        .sum();
                    sumi += s as i32 * dot;
                }
                let da = *a.d.add(i * a.nb + b);
                let o = out.add(i * n + r);
                if b == 0 {
                    *o = 0.0;
                }
                *o += da * d * sumi as f32;
            }
        }
    }
}

/// Q8_0 rows against activations in [`super::act::ActLayout::Q8_0`].
///
/// # Safety
/// See [`super::run_kernel`].
pub(crate) unsafe fn q8_0(
    m: usize,
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 32;
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        for i in 0..m {
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = row.add(b * 34);
                let d = f16_at(blk);
                let qs = std::slice::from_raw_parts(blk.add(2) as *const i8, 32);
                let aq = std::slice::from_raw_parts(a.qs.add(i * a.k + b * 32), 32);
                let dot: i32 = qs.iter().zip(aq).map(|(&w, &x)| w as i32 * x as i32).sum();
                acc += *a.d.add(i * a.nb + b) * d * dot as f32;
            }
            *out.add(i * n + r) = acc;
        }
    }
}
