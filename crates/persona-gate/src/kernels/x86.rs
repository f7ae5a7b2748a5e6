//! x86-64 kernels: AVX512-VNNI (512-bit) and AVX2 (256-bit).
//!
//! Shape of every kernel: for each weight row, for each 256-value block (32 for Q8_0), unpack the
//! block's quants and scales into registers once, then for each of the `M` activation rows do the
//! integer dot products and one f32 multiply-add into that row's accumulator. `M` is a const
//! generic so the accumulators live in registers and the activation loop fully unrolls; weights
//! are read once per call however many activation rows there are.
//!
//! Integer dot products: weights are unsigned (Q4_K nibbles 0..15, Q6_K `q + 32` in 0..63) and
//! activations are i8 in [-127, 127], so `maddubs` (u8 x i8 pairs into i16) cannot saturate. The
//! per-sub-block scale multiply is folded into the i16 -> i32 widening: `madd_epi16` (AVX2) or
//! `dpwssd` (VNNI, which also accumulates) against a vector holding each lane's sub-block scale.
//! Q4_K's mins and Q6_K's `-32` offset use the activations' per-sub-block sums.

// `i` indexes the accumulators and also addresses activation row `i` through raw pointers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::ActView;
use super::WeightsView;

#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    (
        _mm_cvtss_f32(v),
        _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(v, v)),
    )
}

#[inline(always)]
unsafe fn f16_one(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// `pshufb` selector that copies i16 element `e` of a 128-bit lane to all of that lane.
#[inline(always)]
fn sel16(e: usize) -> i16 {
    (((2 * e + 1) << 8) | (2 * e)) as i16
}

#[inline(always)]
unsafe fn hsum128(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    hsum128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps::<1>(v),
    ))
}

#[inline(always)]
unsafe fn load512(p: *const i8) -> __m512i {
    _mm512_loadu_si512(p as *const __m512i)
}

#[inline(always)]
unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// A 512-bit vector whose 128-bit lane `l` repeats selector `sel16(e[l])`.
#[inline(always)]
unsafe fn lane_selectors(e: [usize; 4]) -> __m512i {
    let mut v = [0i16; 32];
    for (l, &el) in e.iter().enumerate() {
        v[l * 8..l * 8 + 8].fill(sel16(el));
    }
    _mm512_loadu_si512(v.as_ptr() as *const __m512i)
}

/// Q4_K x activations in `K4Interleaved` layout, 512-bit.
///
/// # Safety
/// Needs AVX512 F/BW/VL/VNNI, AVX2, FMA, F16C; pointers as in [`super::run_kernel`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q4k_512<const M: usize>(
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 256;
    let m4 = _mm512_set1_epi8(0x0F);
    // One 64-byte load covers sub-blocks (0, 2) in its low nibbles and (1, 3) in its high
    // nibbles (the next one: (4, 6) and (5, 7)); each 256-bit half takes one sub-block's scale.
    let c02 = lane_selectors([0, 0, 2, 2]);
    let c13 = lane_selectors([1, 1, 3, 3]);
    let c46 = lane_selectors([4, 4, 6, 6]);
    let c57 = lane_selectors([5, 5, 7, 7]);
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        let mut facc = [_mm512_setzero_ps(); M];
        let mut macc = [_mm_setzero_ps(); M];
        for b in 0..nb {
            let blk = row.add(b * 144);
            let (d, dmin) = f16_pair(blk);
            let (sc, mn) = super::scalar::q4k_scales_mins(&*(blk.add(4) as *const [u8; 12]));
            let sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
            let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
            let scb = _mm512_broadcast_i32x4(sc16);
            let s02 = _mm512_shuffle_epi8(scb, c02);
            let s13 = _mm512_shuffle_epi8(scb, c13);
            let s46 = _mm512_shuffle_epi8(scb, c46);
            let s57 = _mm512_shuffle_epi8(scb, c57);
            let q0 = load512(blk.add(16) as *const i8);
            let q1 = load512(blk.add(80) as *const i8);
            let w0 = _mm512_and_si512(q0, m4);
            let w1 = _mm512_and_si512(_mm512_srli_epi16::<4>(q0), m4);
            let w2 = _mm512_and_si512(q1, m4);
            let w3 = _mm512_and_si512(_mm512_srli_epi16::<4>(q1), m4);
            for i in 0..M {
                let aq = a.qs.add(i * a.k + b * 256);
                let p0 = _mm512_maddubs_epi16(w0, load512(aq));
                let p1 = _mm512_maddubs_epi16(w1, load512(aq.add(64)));
                let p2 = _mm512_maddubs_epi16(w2, load512(aq.add(128)));
                let p3 = _mm512_maddubs_epi16(w3, load512(aq.add(192)));
                let zero = _mm512_setzero_si512();
                let s = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, p0, s02), p2, s46);
                let t = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, p1, s13), p3, s57);
                let da = *a.d.add(i * a.nb + b);
                facc[i] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(s, t)),
                    _mm512_set1_ps(d * da),
                    facc[i],
                );
                let bs = _mm_loadu_si128(a.bsums.add((i * a.nb + b) * 8) as *const __m128i);
                macc[i] = _mm_fmadd_ps(
                    _mm_cvtepi32_ps(_mm_madd_epi16(mn16, bs)),
                    _mm_set1_ps(dmin * da),
                    macc[i],
                );
            }
        }
        for i in 0..M {
            *out.add(i * n + r) = _mm512_reduce_add_ps(facc[i]) - hsum128(macc[i]);
        }
    }
}

/// Q6_K x activations in `K6` layout, 512-bit.
///
/// # Safety
/// Needs AVX512 F/BW/VL/VNNI, AVX2, FMA, F16C; pointers as in [`super::run_kernel`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q6k_512<const M: usize>(
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 256;
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    // Each 64-value register spans four 16-value sub-blocks, one per 128-bit lane.
    let c0123 = lane_selectors([0, 1, 2, 3]);
    let c4567 = lane_selectors([4, 5, 6, 7]);
    // qh bit pair p of a byte must land on bits 4..5: shift left by 4 - 2p (right for p = 3). The
    // 256-bit halves of one register need pairs (0, 1) for the low nibbles and (2, 3) for the high.
    let sh_lo = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4);
    let sh_hi = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        let mut facc = [_mm512_setzero_ps(); M];
        for b in 0..nb {
            let blk = row.add(b * 210);
            let d = f16_one(blk.add(208));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
            let neg32 = _mm512_zextsi256_si512(_mm256_sub_epi16(
                _mm256_setzero_si256(),
                _mm256_slli_epi16::<5>(sc16),
            ));
            let sca = _mm512_broadcast_i32x4(_mm256_castsi256_si128(sc16));
            let scb = _mm512_broadcast_i32x4(_mm256_extracti128_si256::<1>(sc16));
            let s = [
                _mm512_shuffle_epi8(sca, c0123),
                _mm512_shuffle_epi8(sca, c4567),
                _mm512_shuffle_epi8(scb, c0123),
                _mm512_shuffle_epi8(scb, c4567),
            ];
            let mut wq = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let l = load512(blk.add(64 * h) as *const i8);
                let hh = _mm512_broadcast_i64x4(load256(blk.add(128 + 32 * h)));
                let hb_lo = _mm512_and_si512(_mm512_sllv_epi64(hh, sh_lo), m30);
                let hb_hi = _mm512_and_si512(_mm512_srlv_epi64(hh, sh_hi), m30);
                wq[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m4), hb_lo);
                wq[2 * h + 1] =
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(l), m4), hb_hi);
            }
            for i in 0..M {
                let aq = a.qs.add(i * a.k + b * 256);
                let bs = _mm512_zextsi256_si512(_mm256_loadu_si256(
                    a.bsums.add((i * a.nb + b) * 16) as *const __m256i,
                ));
                let p0 = _mm512_maddubs_epi16(wq[0], load512(aq));
                let p1 = _mm512_maddubs_epi16(wq[1], load512(aq.add(64)));
                let p2 = _mm512_maddubs_epi16(wq[2], load512(aq.add(128)));
                let p3 = _mm512_maddubs_epi16(wq[3], load512(aq.add(192)));
                let u = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(bs_zero(), p0, s[0]), p2, s[2]);
                let v = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(bs_zero(), p1, s[1]), p3, s[3]);
                let v = _mm512_dpwssd_epi32(v, bs, neg32);
                let da = *a.d.add(i * a.nb + b);
                facc[i] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(u, v)),
                    _mm512_set1_ps(d * da),
                    facc[i],
                );
            }
        }
        for i in 0..M {
            *out.add(i * n + r) = _mm512_reduce_add_ps(facc[i]);
        }
    }
}

#[inline(always)]
unsafe fn bs_zero() -> __m512i {
    _mm512_setzero_si512()
}

/// Q8_0 x activations in `Q8_0` layout, 256-bit VNNI.
///
/// Signed x signed through `dpbusd` (u8 x i8): |w| against sign(w) * a. |-128| wraps to 0x80,
/// which as u8 is the right 128; activations never reach -128, so flipping their sign is safe.
///
/// # Safety
/// Needs AVX512 VL/VNNI, AVX2, FMA, F16C; pointers as in [`super::run_kernel`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q8_0_512<const M: usize>(
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 32;
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        let mut facc = [_mm256_setzero_ps(); M];
        for b in 0..nb {
            let blk = row.add(b * 34);
            let d = f16_one(blk);
            let wv = load256(blk.add(2));
            let aw = _mm256_abs_epi8(wv);
            for i in 0..M {
                let av = load256(a.qs.add(i * a.k + b * 32) as *const u8);
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(av, wv));
                facc[i] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dot),
                    _mm256_set1_ps(d * *a.d.add(i * a.nb + b)),
                    facc[i],
                );
            }
        }
        for i in 0..M {
            *out.add(i * n + r) = hsum256(facc[i]);
        }
    }
}

/// Q4_K x activations in `K4Natural` layout, AVX2.
///
/// # Safety
/// Needs AVX2, FMA, F16C; pointers as in [`super::run_kernel`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4k_256<const M: usize>(
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 256;
    let m4 = _mm256_set1_epi8(0x0F);
    let ctrl: [__m256i; 8] = std::array::from_fn(|e| _mm256_set1_epi16(sel16(e)));
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        let mut facc = [_mm256_setzero_ps(); M];
        let mut macc = [_mm_setzero_ps(); M];
        for b in 0..nb {
            let blk = row.add(b * 144);
            let (d, dmin) = f16_pair(blk);
            let (sc, mn) = super::scalar::q4k_scales_mins(&*(blk.add(4) as *const [u8; 12]));
            let scb = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
            let mut iacc = [_mm256_setzero_si256(); M];
            // 32 bytes of nibbles: sub-block 2c in the low nibbles, 2c + 1 in the high.
            for c in 0..4 {
                let q = load256(blk.add(16 + 32 * c));
                let wlo = _mm256_and_si256(q, m4);
                let whi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                let slo = _mm256_shuffle_epi8(scb, ctrl[2 * c]);
                let shi = _mm256_shuffle_epi8(scb, ctrl[2 * c + 1]);
                for i in 0..M {
                    let aq = a.qs.add(i * a.k + b * 256 + 64 * c) as *const u8;
                    let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(wlo, load256(aq)), slo);
                    let phi =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(whi, load256(aq.add(32))), shi);
                    iacc[i] = _mm256_add_epi32(iacc[i], _mm256_add_epi32(plo, phi));
                }
            }
            for i in 0..M {
                let da = *a.d.add(i * a.nb + b);
                facc[i] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i]), _mm256_set1_ps(d * da), facc[i]);
                let bs = _mm_loadu_si128(a.bsums.add((i * a.nb + b) * 8) as *const __m128i);
                macc[i] = _mm_fmadd_ps(
                    _mm_cvtepi32_ps(_mm_madd_epi16(mn16, bs)),
                    _mm_set1_ps(dmin * da),
                    macc[i],
                );
            }
        }
        for i in 0..M {
            *out.add(i * n + r) = hsum256(facc[i]) - hsum128(macc[i]);
        }
    }
}

/// Q6_K x activations in `K6` layout, AVX2.
///
/// # Safety
/// Needs AVX2, FMA, F16C; pointers as in [`super::run_kernel`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q6k_256<const M: usize>(
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 256;
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    // 32 values span two 16-value sub-blocks, one per 128-bit lane.
    let ctrl: [__m256i; 4] = std::array::from_fn(|p| {
        _mm256_set_m128i(
            _mm_set1_epi16(sel16(2 * p + 1)),
            _mm_set1_epi16(sel16(2 * p)),
        )
    });
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        let mut facc = [_mm256_setzero_ps(); M];
        for b in 0..nb {
            let blk = row.add(b * 210);
            let d = f16_one(blk.add(208));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
            let neg32 = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16::<5>(sc16));
            let mut iacc: [__m256i; M] = std::array::from_fn(|i| {
                let bs = load256(a.bsums.add((i * a.nb + b) * 16) as *const u8);
                _mm256_madd_epi16(bs, neg32)
            });
            for h in 0..2 {
                let sch = _mm256_broadcastsi128_si256(if h == 0 {
                    _mm256_castsi256_si128(sc16)
                } else {
                    _mm256_extracti128_si256::<1>(sc16)
                });
                let l0 = load256(blk.add(64 * h));
                let l1 = load256(blk.add(64 * h + 32));
                let hh = load256(blk.add(128 + 32 * h));
                let wq = [
                    _mm256_or_si256(
                        _mm256_and_si256(l0, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(hh), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(hh), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                        _mm256_and_si256(hh, m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(hh), m30),
                    ),
                ];
                let s: [__m256i; 4] = std::array::from_fn(|p| _mm256_shuffle_epi8(sch, ctrl[p]));
                for i in 0..M {
                    let aq = a.qs.add(i * a.k + b * 256 + 128 * h) as *const u8;
                    let mut acc = iacc[i];
                    for p in 0..4 {
                        let prod = _mm256_maddubs_epi16(wq[p], load256(aq.add(32 * p)));
                        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, s[p]));
                    }
                    iacc[i] = acc;
                }
            }
            for i in 0..M {
                facc[i] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(iacc[i]),
                    _mm256_set1_ps(d * *a.d.add(i * a.nb + b)),
                    facc[i],
                );
            }
        }
        for i in 0..M {
            *out.add(i * n + r) = hsum256(facc[i]);
        }
    }
}

/// Q8_0 x activations in `Q8_0` layout, AVX2 (`maddubs` + `madd` instead of `dpbusd`; the pair
/// sums stay below 2 * 128 * 127 and fit i16).
///
/// # Safety
/// Needs AVX2, FMA, F16C; pointers as in [`super::run_kernel`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8_0_256<const M: usize>(
    w: &WeightsView,
    rows: Range<usize>,
    a: &ActView,
    out: *mut f32,
    n: usize,
) {
    let nb = w.k / 32;
    let ones = _mm256_set1_epi16(1);
    for r in rows {
        let row = w.ptr.add(r * w.row_bytes);
        let mut facc = [_mm256_setzero_ps(); M];
        for b in 0..nb {
            let blk = row.add(b * 34);
            let d = f16_one(blk);
            let wv = load256(blk.add(2));
            let aw = _mm256_abs_epi8(wv);
            for i in 0..M {
                let av = load256(a.qs.add(i * a.k + b * 32) as *const u8);
                let dot =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, wv)), ones);
                facc[i] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dot),
                    _mm256_set1_ps(d * *a.d.add(i * a.nb + b)),
                    facc[i],
                );
            }
        }
        for i in 0..M {
            *out.add(i * n + r) = hsum256(facc[i]);
        }
    }
}
