//! The hook point at the output of every decoder block.
//!
//! `resid[l]` is the output of block `l` (0-based), before the final norm: the convention of the
//! fixtures and of most steering work. A hook sees the residual stream of a whole batch chunk
//! (`[batch, chunk_len, d_model]`) with enough context to tell, for every row and position, which
//! sequence it belongs to, its absolute position, and whether it is padding, a prompt token or a
//! generated token. It may return a replacement.

use candle_core::Tensor;

use crate::Result;

/// What a hook knows about one row of the current chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCtx {
    /// Caller's index of the sequence (stable across batch reshuffles).
    pub seq: usize,
    /// Leading padding positions of this row within the chunk.
    pub chunk_pad: usize,
    /// Absolute position of this row's first real token in the chunk.
    pub start_pos: usize,
    /// Length of the sequence's prompt: positions `< prompt_len` are prompt tokens.
    pub prompt_len: usize,
}

/// Where a position of the chunk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    Pad,
    Prompt,
    Generated,
}

/// Context passed to [`ResidualHook::on_block_output`].
#[derive(Debug, Clone, Copy)]
pub struct HookCtx<'a> {
    pub layer: usize,
    pub rows: &'a [RowCtx],
    pub chunk_len: usize,
    /// The decoder runs in batch-invariant mode: hooks that reduce over the residual must compute
    /// each row the same way whatever the batch (a per-row sum, not a batched matmul).
    pub batch_invariant: bool,
}

impl HookCtx<'_> {
    /// Absolute position of chunk index `i` in row `row`, `None` for padding.
    pub fn position(&self, row: usize, i: usize) -> Option<usize> {
        let r = &self.rows[row];
        (i >= r.chunk_pad).then(|| r.start_pos + (i - r.chunk_pad))
    }

    pub fn kind(&self, row: usize, i: usize) -> PositionKind {
        match self.position(row, i) {
            None => PositionKind::Pad,
            Some(p) if p < self.rows[row].prompt_len => PositionKind::Prompt,
            Some(_) => PositionKind::Generated,
        }
    }
}

/// Reads and optionally replaces the residual stream after decoder blocks.
///
/// `wants` is asked first so that an unused hook costs one branch per layer and no tensor work.
pub trait ResidualHook {
    fn wants(&self, layer: usize) -> bool;

    /// `h` is `[batch, chunk_len, d_model]`. Return `Some(new_h)` to replace it.
    fn on_block_output(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>>;

    /// The last layer this hook needs: a forward that returns no logits may stop after it. `None`
    /// (the default) runs every block.
    fn stop_after(&self) -> Option<usize> {
        None
    }

    /// Whether to see the embedding output (the input of block 0). Ablating a direction there as
    /// well as after every block is what weight orthogonalization does permanently.
    fn wants_embedding(&self) -> bool {
        false
    }

    /// Called with the (scaled) token embeddings, `ctx.layer == EMBEDDING_LAYER`.
    fn on_embedding(&mut self, _h: &Tensor, _ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether to see `resid_mid` of block `layer`: the stream after the attention residual add,
    /// before the MLP.
    fn wants_mid(&self, _layer: usize) -> bool {
        false
    }

    fn on_mid(&mut self, _h: &Tensor, _ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// `HookCtx::layer` value for the embedding output.
pub const EMBEDDING_LAYER: usize = usize::MAX;

/// Runs several hooks in order at each layer (e.g. an intervention, then a capture).
pub struct HookChain<'a>(pub Vec<&'a mut dyn ResidualHook>);

impl ResidualHook for HookChain<'_> {
    fn wants(&self, layer: usize) -> bool {
        self.0.iter().any(|h| h.wants(layer))
    }

    fn on_block_output(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for hook in self.0.iter_mut() {
            if hook.wants(ctx.layer) {
                let input = cur.as_ref().unwrap_or(h);
                if let Some(new) = hook.on_block_output(input, ctx)? {
                    cur = Some(new);
                }
            }
        }
        Ok(cur)
    }

    fn wants_embedding(&self) -> bool {
        self.0.iter().any(|h| h.wants_embedding())
    }

    fn on_embedding(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for hook in self.0.iter_mut() {
            if hook.wants_embedding() {
                let input = cur.as_ref().unwrap_or(h);
                if let Some(new) = hook.on_embedding(input, ctx)? {
                    cur = Some(new);
                }
            }
        }
        Ok(cur)
    }

    fn wants_mid(&self, layer: usize) -> bool {
        self.0.iter().any(|h| h.wants_mid(layer))
    }

    fn on_mid(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for hook in self.0.iter_mut() {
            if hook.wants_mid(ctx.layer) {
                let input = cur.as_ref().unwrap_or(h);
                if let Some(new) = hook.on_mid(input, ctx)? {
                    cur = Some(new);
                }
            }
        }
        Ok(cur)
    }
}

/// Reborrow an optional hook for one call. `Option::as_deref_mut` would tie the trait object's
/// lifetime to the whole loop it is called in.
pub fn reborrow<'a>(h: &'a mut Option<&mut dyn ResidualHook>) -> Option<&'a mut dyn ResidualHook> {
    match h {
        Some(h) => Some(&mut **h),
        None => None,
    }
}
