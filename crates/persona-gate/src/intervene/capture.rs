//! Reading the residual stream: capture hooks used by direction extraction and the fixture tests.

use candle_core::{DType, Tensor};

use super::hook::{HookCtx, PositionKind, ResidualHook};
use crate::Result;

/// Captures, at the chosen layers, the residual of each row's last chunk position (the last prompt
/// token after a left-padded prefill: "difference in means at the last token" as in Arditi et al.).
/// Keeps the result per layer as `[rows, d_model]` f32 on the host side of the device (one tensor
/// per forward; call [`LastTokenCapture::take`] between forwards).
pub struct LastTokenCapture {
    layers: Vec<bool>,
    captured: Vec<Option<Tensor>>,
}

impl LastTokenCapture {
    pub fn new(n_layers: usize, layers: impl IntoIterator<Item = usize>) -> Self {
        let mut want = vec![false; n_layers];
        for l in layers {
            if l < n_layers {
                want[l] = true;
            }
        }
        Self {
            layers: want,
            captured: vec![None; n_layers],
        }
    }

    pub fn all(n_layers: usize) -> Self {
        Self::new(n_layers, 0..n_layers)
    }

    /// Per layer, `[rows, d_model]` f32 (None for layers not captured).
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        let n = self.captured.len();
        std::mem::replace(&mut self.captured, vec![None; n])
    }
}

impl ResidualHook for LastTokenCapture {
    fn wants(&self, layer: usize) -> bool {
        self.layers.get(layer).copied().unwrap_or(false)
    }

    fn on_block_output(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        let l = ctx.chunk_len;
        let last = h.narrow(1, l - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
        self.captured[ctx.layer] = Some(last);
        Ok(None)
    }
}

/// Captures the mean residual over positions of one kind (prompt or generated) per sequence and
/// layer, accumulated across forwards (prefill, then each decode step). Used for persona vectors
/// averaged over response tokens.
pub struct MeanCapture {
    layers: Vec<bool>,
    kind: PositionKind,
    /// sums[seq][layer] = (sum of residuals as f32 [d], count)
    pub sums: std::collections::HashMap<usize, Vec<Option<(Tensor, usize)>>>,
}

impl MeanCapture {
    pub fn new(
        n_layers: usize,
        layers: impl IntoIterator<Item = usize>,
        kind: PositionKind,
    ) -> Self {
        let mut want = vec![false; n_layers];
        for l in layers {
            if l < n_layers {
                want[l] = true;
            }
        }
        Self {
            layers: want,
            kind,
            sums: Default::default(),
        }
    }

    /// Mean residual of `seq` at `layer`, if any position was seen.
    pub fn mean(&self, seq: usize, layer: usize) -> Result<Option<Tensor>> {
        match self
            .sums
            .get(&seq)
            .and_then(|v| v.get(layer))
            .and_then(|x| x.as_ref())
        {
            Some((s, n)) if *n > 0 => Ok(Some((s / *n as f64)?)),
            _ => Ok(None),
        }
    }
}

impl ResidualHook for MeanCapture {
    fn wants(&self, layer: usize) -> bool {
        self.layers.get(layer).copied().unwrap_or(false)
    }

    fn on_block_output(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        let n_layers = self.layers.len();
        for (ri, r) in ctx.rows.iter().enumerate() {
            let idx: Vec<u32> = (0..ctx.chunk_len)
                .filter(|&i| ctx.kind(ri, i) == self.kind)
                .map(|i| i as u32)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let n = idx.len();
            let ids = Tensor::from_vec(idx, n, h.device())?;
            let sum = h
                .get(ri)?
                .index_select(&ids, 0)?
                .to_dtype(DType::F32)?
                .sum(0)?;
            let slot = &mut self
                .sums
                .entry(r.seq)
                .or_insert_with(|| vec![None; n_layers])[ctx.layer];
            *slot = Some(match slot.take() {
                Some((s, c)) => ((s + sum)?, c + n),
                None => (sum, n),
            });
        }
        Ok(None)
    }
}
