//! One teacher-forced pass of the reader model over request + output: the features probes read.
//!
//! The reader is the *unsteered, default-persona* model: the request is rendered by its own chat
//! template with no system prompt (so the template's default persona, if any), the output follows as
//! the assistant's turn, and one forward with no hooks that change anything reads:
//! - the residual stream averaged over the output's tokens, at every layer (what the model "thinks"
//!   the answer is doing: refusals and compliance separate linearly in the middle layers);
//! - the residual at the last prompt token, at every layer (whether the default persona would refuse
//!   this request: the runtime guard's question);
//! - each output token's loss under the reader (degenerate text is improbable text).
//!
//! Why teacher forcing and not generation: reading costs one batched prefill per row, and a
//! prefill runs several times faster per token than decoding.

use candle_core::{DType, Tensor, D};

use super::LabelInput;
use crate::generate::{encode_chat, ChatPrompt};
use crate::intervene::{HookCtx, ResidualHook, RowCtx};
use crate::model::{KvCache, LogitsAt, Model};
use crate::{Error, Result};

/// How a pass reads.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Output tokens read (the rest of a longer output is ignored).
    pub max_output_tokens: usize,
    /// Sequences per forward.
    pub batch_size: usize,
    /// Compute per-token losses (needs the LM head at every output position).
    pub losses: bool,
    /// Read residuals only up to this layer. Without losses the forward stops there: a probe whose
    /// heads read early layers and text measures pays for a fraction of the model.
    pub max_layer: Option<usize>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_output_tokens: 256,
            batch_size: 8,
            losses: true,
            max_layer: None,
        }
    }
}

/// What the reader saw in one row.
#[derive(Debug, Clone, Default)]
pub struct RowFeatures {
    /// `[layer][d]`: residual mean over the output tokens read.
    pub output_mean: Vec<Vec<f32>>,
    /// `[layer][d]`: residual at the last prompt token.
    pub prompt_last: Vec<Vec<f32>>,
    /// Loss (nats) of each output token read, given everything before it.
    pub losses: Vec<f32>,
    /// Output tokens read (0 for an empty output).
    pub n_output_tokens: usize,
    /// Output tokens in all (before the cut).
    pub n_output_total: usize,
}

/// Token ids of one row: the prompt (default persona) and the output.
fn encode_row(
    model: &Model,
    r: &LabelInput,
    max_out: usize,
) -> Result<(Vec<u32>, Vec<u32>, usize)> {
    let prompt = encode_chat(model, &ChatPrompt::new(r.prompt.clone()))?;
    let out = model.tokenizer.encode(&r.output)?;
    let total = out.len();
    let out = out.into_iter().take(max_out).collect();
    Ok((prompt, out, total))
}

/// Read every row. `progress(done, total)` after each forward.
pub fn read(
    model: &Model,
    rows: &[LabelInput],
    opts: &ReadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<RowFeatures>> {
    if rows.is_empty() {
        return Err(Error::Empty("no rows to read".into()));
    }
    let enc = rows
        .iter()
        .map(|r| encode_row(model, r, opts.max_output_tokens))
        .collect::<Result<Vec<_>>>()?;
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(enc[i].0.len() + enc[i].1.len()));
    let mut feats = vec![RowFeatures::default(); rows.len()];
    let mut done = 0;
    for chunk in order.chunks(opts.batch_size.max(1)) {
        let batch: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|&i| (&enc[i].0[..], &enc[i].1[..]))
            .collect();
        let got = read_batch(model, &batch, opts)?;
        for (&i, mut f) in chunk.iter().zip(got) {
            f.n_output_total = enc[i].2;
            feats[i] = f;
        }
        done += chunk.len();
        progress(done, rows.len());
    }
    Ok(feats)
}

/// One left-padded forward over `(prompt, output)` pairs.
fn read_batch(
    model: &Model,
    batch: &[(&[u32], &[u32])],
    opts: &ReadOptions,
) -> Result<Vec<RowFeatures>> {
    let losses = opts.losses;
    let dec = &model.decoder;
    let n_layers = dec.n_layers();
    let lens: Vec<usize> = batch.iter().map(|(p, o)| p.len() + o.len()).collect();
    let lmax = lens.iter().copied().max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * lmax);
    let mut rows = Vec::with_capacity(batch.len());
    for (i, (p, o)) in batch.iter().enumerate() {
        let pad = lmax - lens[i];
        ids.extend(std::iter::repeat_n(p[0], pad));
        ids.extend_from_slice(p);
        ids.extend_from_slice(o);
        rows.push(RowCtx {
            seq: i,
            chunk_pad: pad,
            start_pos: 0,
            prompt_len: p.len(),
        });
    }
    let tokens = Tensor::from_vec(ids.clone(), (batch.len(), lmax), dec.device())?;
    let mut hook = ReadHook {
        spans: batch
            .iter()
            .enumerate()
            .map(|(i, (p, o))| {
                let pad = lmax - lens[i];
                (pad + p.len() - 1, pad + p.len(), pad + p.len() + o.len())
            })
            .collect(),
        out_mean: vec![vec![Vec::new(); n_layers]; batch.len()],
        last: vec![vec![Vec::new(); n_layers]; batch.len()],
        max_layer: opts.max_layer.filter(|m| *m < n_layers),
        stop: !losses,
    };
    let mut cache = KvCache::new(n_layers);
    // The LM head runs only over the answers (plus the last prompt token, which predicts the first
    // answer token): they all end the left-padded chunk.
    let tail = batch.iter().map(|(_, o)| o.len() + 1).max().unwrap_or(1);
    let at = if losses {
        LogitsAt::Tail(tail)
    } else {
        LogitsAt::None
    };
    let logits = dec.forward(&tokens, &rows, &mut cache, Some(&mut hook), at)?;
    let mut out: Vec<RowFeatures> = (0..batch.len())
        .map(|i| RowFeatures {
            output_mean: std::mem::take(&mut hook.out_mean[i]),
            prompt_last: std::mem::take(&mut hook.last[i]),
            losses: Vec::new(),
            n_output_tokens: batch[i].1.len(),
            n_output_total: 0,
        })
        .collect();
    if let Some(logits) = logits {
        let off = lmax - tail.min(lmax);
        for (i, f) in out.iter_mut().enumerate() {
            let (last, a, e) = hook.spans[i];
            if e > a {
                let row = &ids[i * lmax..(i + 1) * lmax];
                f.losses = token_losses(&logits.get(i)?, &row[off..], last - off, e - off)?;
            }
        }
    }
    Ok(out)
}

/// Loss of tokens `last+1..e` of one row from the logits at positions `last..e-1`.
fn token_losses(logits: &Tensor, ids: &[u32], last: usize, e: usize) -> Result<Vec<f32>> {
    let l = logits.narrow(0, last, e - 1 - last)?.to_dtype(DType::F32)?;
    let lsm = candle_nn::ops::log_softmax(&l, D::Minus1)?;
    let targets = Tensor::from_vec(ids[last + 1..e].to_vec(), (e - 1 - last, 1), l.device())?;
    let picked = lsm.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    Ok(picked.into_iter().map(|x| -x).collect())
}

/// Reads means over each row's output span and the last prompt position, at every layer.
struct ReadHook {
    /// `(last prompt index, output start, output end)` in chunk coordinates.
    spans: Vec<(usize, usize, usize)>,
    out_mean: Vec<Vec<Vec<f32>>>,
    last: Vec<Vec<Vec<f32>>>,
    /// Layers above this one are not read (their entries stay empty).
    max_layer: Option<usize>,
    /// End the forward after `max_layer` (no logits are wanted).
    stop: bool,
}

impl ResidualHook for ReadHook {
    fn wants(&self, layer: usize) -> bool {
        self.max_layer.is_none_or(|m| layer <= m)
    }

    fn stop_after(&self) -> Option<usize> {
        self.max_layer.filter(|_| self.stop)
    }

    fn on_block_output(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        let hf = h.to_dtype(DType::F32)?;
        for (i, &(last, a, e)) in self.spans.iter().enumerate() {
            let row = hf.get(i)?;
            self.last[i][ctx.layer] = row.get(last)?.to_vec1::<f32>()?;
            if e > a {
                let m = row.narrow(0, a, e - a)?.mean(0)?;
                self.out_mean[i][ctx.layer] = m.to_vec1::<f32>()?;
            } else {
                self.out_mean[i][ctx.layer] = self.last[i][ctx.layer].clone();
            }
        }
        Ok(None)
    }
}
