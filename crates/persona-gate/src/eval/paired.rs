//! Paired comparisons of two conditions over the same prompts.
//!
//! Two conditions answer the same prompts, so their refusal indicators are paired: an unpaired test
//! (two Wilson intervals, a two-proportion z-test) throws away that most prompts are refused or
//! answered under both, and is needlessly weak. Only the discordant prompts carry information:
//! - **McNemar's exact test**: with `b` prompts refused only under A and `c` only under B, under
//!   the null each discordant prompt is a fair coin, so `min(b, c) ~ Binomial(b + c, 1/2)`; the
//!   two-sided p-value is `min(1, 2 P(X <= min(b, c)))`. The **mid-p** variant subtracts
//!   `P(X = min(b, c))` (half of each tail's point mass), which is less conservative and has close
//!   to nominal size (Fagerland, Lydersen and Laake 2013 recommend it).
//! - **Paired bootstrap** of the rate difference `mean(B) - mean(A)`: resample prompts (pairs)
//!   with replacement, take the 2.5% and 97.5% percentiles. Seeded, so a table is reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// McNemar's test on paired binary outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// Pairs with the outcome under A only.
    pub b: usize,
    /// Pairs with the outcome under B only.
    pub c: usize,
    /// Exact two-sided p-value.
    pub p_exact: f64,
    /// Mid-p two-sided p-value.
    pub p_mid: f64,
}

/// `ln(n!)` for the binomial terms (exact sums of logs; n is at most a few thousand here).
fn ln_factorials(n: usize) -> Vec<f64> {
    let mut v = vec![0.0f64; n + 1];
    for i in 1..=n {
        v[i] = v[i - 1] + (i as f64).ln();
    }
    v
}

/// McNemar's exact and mid-p tests from the discordant counts.
pub fn mcnemar(b: usize, c: usize) -> McNemar {
    let n = b + c;
    if n == 0 {
        return McNemar {
            b,
            c,
            p_exact: 1.0,
            p_mid: 1.0,
        };
    }
    let k = b.min(c);
    let lf = ln_factorials(n);
    let ln2n = n as f64 * std::f64::consts::LN_2;
    let pmf = |i: usize| (lf[n] - lf[i] - lf[n - i] - ln2n).exp();
    let cdf: f64 = (0..=k).map(pmf).sum();
    let p_exact = (2.0 * cdf).min(1.0);
    let p_mid = (2.0 * cdf - pmf(k)).min(1.0);
    McNemar {
        b,
        c,
        p_exact,
        p_mid,
    }
}

/// McNemar's test from paired outcomes `(a_i, b_i)`.
pub fn mcnemar_pairs(pairs: &[(bool, bool)]) -> McNemar {
    let b = pairs.iter().filter(|(a, b)| *a && !*b).count();
    let c = pairs.iter().filter(|(a, b)| !*a && *b).count();
    mcnemar(b, c)
}

/// A paired difference of rates with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    pub n: usize,
    /// `mean(B) - mean(A)`.
    pub diff: f64,
    pub lo: f64,
    pub hi: f64,
    pub reps: usize,
    pub seed: u64,
}

/// Paired bootstrap (percentile) 95% interval of `mean(B) - mean(A)` over `pairs`.
pub fn paired_bootstrap(pairs: &[(f64, f64)], reps: usize, seed: u64) -> PairedDiff {
    let n = pairs.len();
    if n == 0 {
        return PairedDiff {
            n,
            diff: 0.0,
            lo: 0.0,
            hi: 0.0,
            reps,
            seed,
        };
    }
    let d: Vec<f64> = pairs.iter().map(|(a, b)| b - a).collect();
    let diff = d.iter().sum::<f64>() / n as f64;
    let reps = reps.max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats: Vec<f64> = (0..reps)
        .map(|_| (0..n).map(|_| d[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    stats.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| -> f64 {
        // Linear interpolation between order statistics (type 7, numpy's default).
        let h = (reps - 1) as f64 * p;
        let lo = h.floor() as usize;
        let hi = h.ceil() as usize;
        stats[lo] + (h - lo as f64) * (stats[hi] - stats[lo])
    };
    PairedDiff {
        n,
        diff,
        lo: q(0.025),
        hi: q(0.975),
        reps,
        seed,
    }
}

/// [`paired_bootstrap`] on binary outcomes.
pub fn paired_bootstrap_bool(pairs: &[(bool, bool)], reps: usize, seed: u64) -> PairedDiff {
    let v: Vec<(f64, f64)> = pairs
        .iter()
        .map(|(a, b)| (*a as u8 as f64, *b as u8 as f64))
        .collect();
    paired_bootstrap(&v, reps, seed)
}
