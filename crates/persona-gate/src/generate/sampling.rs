//! Token choice: greedy, or temperature + nucleus (top-p) sampling from a per-sequence seeded RNG,
//! so a sequence's sample does not depend on what else shares its batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    pub fn validate(&self) -> crate::Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(crate::Error::InvalidValue(format!(
                "temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(crate::Error::InvalidValue(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Per-sequence sampler state.
pub struct Sampler {
    cfg: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Self {
        Self {
            cfg,
            rng: StdRng::seed_from_u64(cfg.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.is_greedy() {
            return argmax(logits);
        }
        let t = self.cfg.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x - max) / t).exp()))
            .collect();
        let z: f32 = probs.iter().map(|p| p.1).sum();
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut keep = probs.len();
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p.1 / z;
                if acc >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &probs[..keep];
        let total: f32 = kept.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for p in kept {
            r -= p.1;
            if r <= 0.0 {
                return p.0;
            }
        }
        kept[kept.len() - 1].0
    }
}

/// Index of the largest logit (first one on ties, like torch.argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(Sampling::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats() {
        let cfg = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_keeps_the_head() {
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
        });
        let logits = [10.0, 0.0, 0.0, 0.0];
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 0);
        }
    }
}
