//! What activation capture costs: prefill with the residual of the last token read at every layer
//! (the direction-extraction path, [`capture_spans`]) against plain batched prefill of the same
//! batches (last-token logits, as generation computes them). `pgate bench --capture`.

use candle_core::Tensor;
use serde::Serialize;

use crate::bench::DEFAULT_PROMPT;
use crate::directions::capture::{capture_spans, Position};
use crate::generate::{encode_chat, ChatPrompt};
use crate::intervene::RowCtx;
use crate::model::{KvCache, LogitsAt, Model};
use crate::{Error, Result};

/// Prefill throughput with and without an all-layer last-token capture.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureRow {
    pub batch: usize,
    pub prompts: usize,
    pub prompt_tokens: usize,
    /// Plain batched prefill, tokens/s.
    pub prefill_tok_s: f64,
    /// Prefill with the last token's residual read at every layer, tokens/s.
    pub capture_tok_s: f64,
    /// capture / prefill throughput.
    pub ratio: f64,
}

/// The sizes of a capture benchmark (the flags of `pgate bench-capture`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CaptureBench {
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub batch: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub prompts: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 2))]
    pub reps: usize,
}

impl CaptureBench {
    /// [`capture`] with these sizes.
    pub fn run(&self, model: &Model) -> Result<CaptureRow> {
        capture(model, self.batch, self.prompts, self.reps)
    }
}

impl CaptureRow {
    /// Two lines: what was measured on `model` (in numeric mode `dtype` as named), and the rates.
    pub fn to_text(&self, model: &Model, dtype: &str) -> String {
        format!(
            "model {} (dtype {dtype}): {} prompts x {} tokens in batches of {}\n\
             plain prefill {:.1} tok/s, all-layer last-token capture {:.1} tok/s: {:.1}%\n",
            model.info.name,
            self.prompts,
            self.prompt_tokens,
            self.batch,
            self.prefill_tok_s,
            self.capture_tok_s,
            100.0 * self.ratio
        )
    }
}

/// Time `prompts` copies of the benchmark prompt read in batches of `batch`: plain prefill, then
/// [`capture_spans`] at the last token of every layer; after one warm-up of each, the best of
/// `reps`, the two alternating so a noisy neighbour hits both alike.
pub fn capture(model: &Model, batch: usize, prompts: usize, reps: usize) -> Result<CaptureRow> {
    if batch == 0 || prompts == 0 {
        return Err(Error::InvalidValue(
            "capture bench: batch size and prompt count must be >= 1".into(),
        ));
    }
    let ids = encode_chat(model, &ChatPrompt::new(DEFAULT_PROMPT))?;
    let len = ids.len();
    let seqs = vec![ids.clone(); prompts];
    let spans = vec![vec![(len - 1, len); prompts]];
    let dec = &model.decoder;
    let n_layers = dec.n_layers();
    let plain = || -> Result<f64> {
        let t = std::time::Instant::now();
        for chunk in seqs.chunks(batch) {
            let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
            let tokens = Tensor::from_vec(flat, (chunk.len(), len), dec.device())?;
            let rows: Vec<RowCtx> = (0..chunk.len())
                .map(|i| RowCtx {
                    seq: i,
                    chunk_pad: 0,
                    start_pos: 0,
                    prompt_len: len,
                })
                .collect();
            let mut cache = KvCache::new(n_layers);
            dec.forward(&tokens, &rows, &mut cache, None, LogitsAt::Last)?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let captured = || -> Result<f64> {
        let t = std::time::Instant::now();
        capture_spans(dec, &seqs, &spans, &[Position::LAST], batch, |_, _| {})?;
        Ok(t.elapsed().as_secs_f64())
    };
    let (mut best_plain, mut best_cap) = (f64::INFINITY, f64::INFINITY);
    for rep in 0..reps.max(1) + 1 {
        let (p, c) = (plain()?, captured()?);
        if rep > 0 {
            best_plain = best_plain.min(p);
            best_cap = best_cap.min(c);
        }
    }
    let tokens = (prompts * len) as f64;
    Ok(CaptureRow {
        batch,
        prompts,
        prompt_tokens: len,
        prefill_tok_s: tokens / best_plain,
        capture_tok_s: tokens / best_cap,
        ratio: best_plain / best_cap,
    })
}
