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
}

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
}
