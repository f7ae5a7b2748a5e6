//! Rates and their intervals.

use serde::{Deserialize, Serialize};

/// A proportion with its Wilson 95% score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub k: usize,
    pub n: usize,
    pub p: f64,
    pub lo: f64,
    pub hi: f64,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:5.1}% [{:5.1}, {:5.1}]",
            100.0 * self.p,
            100.0 * self.lo,
            100.0 * self.hi
        )
    }
}

/// Wilson score interval at 95% (z = 1.96). Chosen over the normal approximation because label
/// rates near 0% and 100% (a refusal rate of 97%, a bypass rate of 2%) are exactly where the normal
/// interval leaves [0, 1] or collapses to a point.
pub fn wilson(k: usize, n: usize) -> Rate {
    if n == 0 {
        return Rate {
            k,
            n,
            p: 0.0,
            lo: 0.0,
            hi: 1.0,
        };
    }
    let z = 1.959_963_984_540_054_f64;
    let nf = n as f64;
    let p = k as f64 / nf;
    let denom = 1.0 + z * z / nf;
    let centre = (p + z * z / (2.0 * nf)) / denom;
    let half = z * ((p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt()) / denom;
    Rate {
        k,
        n,
        p,
        // At k = 0 or k = n the bound is exactly 0 or 1; say so instead of 1 - 1e-16.
        lo: if k == 0 {
            0.0
        } else {
            (centre - half).max(0.0)
        },
        hi: if k == n {
            1.0
        } else {
            (centre + half).min(1.0)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // 305 of 313 (97.4%, the paper's Llama baseline): interval about [95.0, 98.7].
        let r = wilson(305, 313);
        assert!((r.p - 0.9744).abs() < 1e-3);
        assert!((r.lo - 0.9502).abs() < 2e-3, "{r:?}");
        assert!((r.hi - 0.9870).abs() < 2e-3, "{r:?}");
        let z = wilson(0, 10);
        assert_eq!(z.lo, 0.0);
        assert!((z.hi - 0.2775).abs() < 1e-3, "{z:?}");
        assert_eq!(wilson(0, 0).hi, 1.0);
    }
}
