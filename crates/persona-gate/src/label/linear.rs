//! Binary logistic regression with feature standardization and an L2 penalty, trained by Adam on
//! the full batch. Small and dependency-free: the probes have a few hundred rows and at most a few
//! thousand features, where this converges in well under a second.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A trained logistic model: `p = sigmoid(w . (x - mean) / std + b)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub w: Vec<f32>,
    pub b: f32,
    /// L2 penalty it was trained with (per row, on standardized features).
    pub l2: f32,
}

/// Training settings.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    pub l2: f32,
    pub iters: usize,
    pub lr: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            l2: 1e-2,
            iters: 400,
            lr: 0.05,
        }
    }
}

fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Logistic {
    /// Fit on rows `x` (all the same width) with 0/1 targets `y`; rows may be weighted to balance
    /// classes (each class gets half the total weight).
    pub fn fit(x: &[Vec<f32>], y: &[bool], opts: TrainOptions) -> Result<Logistic> {
        let n = x.len();
        if n == 0 || n != y.len() {
            return Err(Error::Empty(format!(
                "cannot train a probe on {n} rows with {} targets",
                y.len()
            )));
        }
        let npos = y.iter().filter(|v| **v).count();
        if npos == 0 || npos == n {
            return Err(Error::InvalidValue(format!(
                "cannot train a probe: all {n} training rows have the same target"
            )));
        }
        let d = x[0].len();
        if let Some(r) = x.iter().find(|r| r.len() != d) {
            return Err(Error::InvalidValue(format!(
                "feature rows of width {} and {d}",
                r.len()
            )));
        }
        let (mean, std) = standardization(x, d);
        let z: Vec<Vec<f32>> = x.iter().map(|r| standardize(r, &mean, &std)).collect();
        let wpos = 0.5 * n as f32 / npos as f32;
        let wneg = 0.5 * n as f32 / (n - npos) as f32;
        let (mut w, mut b) = (vec![0f32; d], 0f32);
        let (mut m, mut v) = (vec![0f32; d + 1], vec![0f32; d + 1]);
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        for t in 1..=opts.iters {
            let mut g = vec![0f32; d + 1];
            for (row, &yy) in z.iter().zip(y) {
                let p = sigmoid(dot(&w, row) + b);
                let err = (p - f32::from(u8::from(yy))) * if yy { wpos } else { wneg } / n as f32;
                for (gj, xj) in g.iter_mut().zip(row) {
                    *gj += err * xj;
                }
                g[d] += err;
            }
            for j in 0..d {
                g[j] += opts.l2 * w[j];
            }
            for j in 0..=d {
                m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                let mh = m[j] / (1.0 - b1.powi(t as i32));
                let vh = v[j] / (1.0 - b2.powi(t as i32));
                let step = opts.lr * mh / (vh.sqrt() + eps);
                if j < d {
                    w[j] -= step;
                } else {
                    b -= step;
                }
            }
        }
        Ok(Logistic {
            mean,
            std,
            w,
            b,
            l2: opts.l2,
        })
    }

    /// Probability of the positive class.
    pub fn prob(&self, x: &[f32]) -> Result<f32> {
        if x.len() != self.w.len() {
            return Err(Error::InvalidValue(format!(
                "probe expects {} features, got {}",
                self.w.len(),
                x.len()
            )));
        }
        let z = standardize(x, &self.mean, &self.std);
        Ok(sigmoid(dot(&self.w, &z) + self.b))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn standardization(x: &[Vec<f32>], d: usize) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() as f64;
    let mut mean = vec![0f64; d];
    for r in x {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += *v as f64 / n;
        }
    }
    let mut var = vec![0f64; d];
    for r in x {
        for ((s, v), m) in var.iter_mut().zip(r).zip(&mean) {
            *s += (*v as f64 - m).powi(2) / n;
        }
    }
    let std = var.iter().map(|s| (s.sqrt() as f32).max(1e-6)).collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

fn standardize(r: &[f32], mean: &[f32], std: &[f32]) -> Vec<f32> {
    r.iter()
        .zip(mean)
        .zip(std)
        .map(|((v, m), s)| (v - m) / s)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_a_linear_problem() {
        let x: Vec<Vec<f32>> = (0..100)
            .map(|i| vec![i as f32, ((i * 7) % 13) as f32])
            .collect();
        let y: Vec<bool> = (0..100).map(|i| i >= 50).collect();
        let m = Logistic::fit(&x, &y, TrainOptions::default()).unwrap();
        assert!(m.prob(&[90.0, 3.0]).unwrap() > 0.9);
        assert!(m.prob(&[5.0, 3.0]).unwrap() < 0.1);
        assert!(m.prob(&[1.0]).is_err());
        assert!(Logistic::fit(&x, &[true; 100], TrainOptions::default()).is_err());
    }
}
