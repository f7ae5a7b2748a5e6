//! Residual activations over a prompt set, at every layer, at three kinds of position:
//!
//! - **last** (or the k-th token from the end): the last prompt token, after the generation prompt,
//!   where Arditi et al. (2024) read the refusal direction;
//! - **post-instruction mean**: the mean over the template tokens that follow the user's message
//!   (`<|im_end|>\n<|im_start|>assistant\n` for ChatML), the "post-instruction" positions Arditi et
//!   al. search over;
//! - **response mean**: generate an answer, then average the residual over its tokens, as persona
//!   vectors do (Chen et al. 2025: mean over response tokens under a positive vs a negative system
//!   prompt).
//!
//! Prompt positions are read in left-padded batches with one forward each (no logits). Response
//! means are accumulated by a hook during batched generation, so answers cost no second pass.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use crate::intervene::{HookCtx, PositionKind, ResidualHook, RowCtx};
use crate::model::{Decoder, KvCache, LogitsAt, Model};
use crate::{Error, Result};

/// Where activations are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Position {
    /// The k-th prompt token from the end (1 = the last token).
    FromEnd(usize),
    /// Mean over the template tokens after the user message, through the generation prompt.
    PostInstruction,
    /// Mean over generated response tokens.
    Response,
}

impl Position {
    pub const LAST: Position = Position::FromEnd(1);

    /// `last`, `-k` (k-th from the end), `post-instruction` (or `post-instruction-mean`, `eoi`),
    /// `response` (or `response-mean`).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "last" | "-1" => return Ok(Position::LAST),
            "post-instruction" | "post-instruction-mean" | "postinstruction" | "eoi" => {
                return Ok(Position::PostInstruction)
            }
            "response" | "response-mean" => return Ok(Position::Response),
            _ => {}
        }
        if let Some(k) = t.strip_prefix('-').and_then(|k| k.parse::<usize>().ok()) {
            if k > 0 {
                return Ok(Position::FromEnd(k));
            }
        }
        Err(Error::InvalidSpec {
            spec: s.into(),
            reason: "position must be last, -K (K-th prompt token from the end), post-instruction or response".into(),
        })
    }

    pub fn name(&self) -> String {
        match self {
            Position::FromEnd(1) => "last".into(),
            Position::FromEnd(k) => format!("-{k}"),
            Position::PostInstruction => "post-instruction".into(),
            Position::Response => "response".into(),
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// How to run a capture.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Sequences per forward (prompt positions) or running sequences (response).
    pub batch_size: usize,
    /// New tokens per answer (response position only).
    pub max_new_tokens: usize,
    /// Sampling of answers (response position only); greedy by default so runs repeat exactly.
    pub sampling: Sampling,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            batch_size: 8,
            max_new_tokens: 64,
            sampling: Sampling::greedy(),
        }
    }
}

/// Activations of `n` prompts at every layer, `[n_layers, n, d]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    pub n_layers: usize,
    pub n: usize,
    pub d: usize,
    /// Layer-major `[n_layers, n, d]`.
    pub data: Vec<f32>,
    /// Tokens averaged for each prompt. 0 means nothing was read (an answer that stopped at once);
    /// such prompts are left out of means.
    pub counts: Vec<usize>,
    pub position: Position,
    /// The generated answers (response position).
    pub responses: Option<Vec<String>>,
}

impl Activations {
    /// Activation of prompt `i` at `layer`.
    pub fn row(&self, layer: usize, i: usize) -> &[f32] {
        let o = (layer * self.n + i) * self.d;
        &self.data[o..o + self.d]
    }

    pub fn valid(&self, i: usize) -> bool {
        self.counts[i] > 0
    }

    pub fn n_valid(&self) -> usize {
        self.counts.iter().filter(|c| **c > 0).count()
    }

    /// Mean over valid prompts at every layer, `[n_layers, d]` (f64 accumulation).
    pub fn mean(&self) -> Result<Vec<f32>> {
        let nv = self.n_valid();
        if nv == 0 {
            return Err(Error::Empty(format!(
                "no activations to average ({} prompts, none with a token at position {})",
                self.n, self.position
            )));
        }
        let mut out = vec![0f32; self.n_layers * self.d];
        let mut acc = vec![0f64; self.d];
        for l in 0..self.n_layers {
            acc.iter_mut().for_each(|x| *x = 0.0);
            for i in (0..self.n).filter(|&i| self.valid(i)) {
                for (a, x) in acc.iter_mut().zip(self.row(l, i)) {
                    *a += *x as f64;
                }
            }
            for (o, a) in out[l * self.d..(l + 1) * self.d].iter_mut().zip(&acc) {
                *o = (*a / nv as f64) as f32;
            }
        }
        Ok(out)
    }

    /// Save as safetensors: `activations` `[n_layers, n, d]` f32 and `counts` `[n]` (as f32), with
    /// the position in the header.
    pub fn save(&self, path: &Path) -> Result<()> {
        let acts = super::set::f32_bytes(&self.data);
        let counts: Vec<f32> = self.counts.iter().map(|c| *c as f32).collect();
        let counts = super::set::f32_bytes(&counts);
        let st = |e: safetensors::SafeTensorError| Error::InvalidValue(format!("safetensors: {e}"));
        let views = vec![
            (
                "activations",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![self.n_layers, self.n, self.d],
                    &acts,
                )
                .map_err(st)?,
            ),
            (
                "counts",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![self.n],
                    &counts,
                )
                .map_err(st)?,
            ),
        ];
        let mut meta = std::collections::HashMap::new();
        meta.insert("position".to_string(), self.position.name());
        meta.insert(
            "tool_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        );
        safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
            other => Error::InvalidValue(format!("{}: {other}", path.display())),
        })
    }
}

impl Activations {
    /// Read what [`Activations::save`] wrote.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |m: String| Error::InvalidValue(format!("{}: {m}", path.display()));
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let acts = t
            .get("activations")
            .ok_or_else(|| bad("no 'activations' tensor".into()))?;
        let (n_layers, n, d) = acts.dims3().map_err(|_| {
            bad(format!(
                "'activations' has shape {:?}, expected [layers, n, d]",
                acts.dims()
            ))
        })?;
        let data = acts.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let counts = match t.get("counts") {
            Some(c) => c
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|x| x.max(0.0) as usize)
                .collect(),
            None => vec![1; n],
        };
        if counts.len() != n {
            return Err(bad(format!(
                "'counts' has {} entries for {n} prompts",
                counts.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let position = safetensors::SafeTensors::read_metadata(&bytes)
            .ok()
            .and_then(|(_, m)| {
                m.metadata()
                    .as_ref()
                    .and_then(|h| h.get("position").cloned())
            })
            .map(|p| Position::parse(&p))
            .transpose()?
            .unwrap_or(Position::LAST);
        Ok(Self {
            n_layers,
            n,
            d,
            data,
            counts,
            position,
            responses: None,
        })
    }
}

/// Which positions of each sequence a [`SpanMeanHook`] sums.
enum Rule<'a> {
    /// `spans[slot][seq] = (a, b)`: absolute positions `a..b`.
    Spans(&'a [Vec<(usize, usize)>]),
    /// Generated tokens fed back to the model.
    Generated,
}

/// Sums the residual over chosen positions per (slot, layer, sequence) with one batched matmul per
/// layer, accumulating on the host in f64 across forwards (prefill, then each decode step).
struct SpanMeanHook<'a> {
    n_layers: usize,
    n_seq: usize,
    d: usize,
    rule: Rule<'a>,
    slots: usize,
    /// `[slot][layer][seq][d]`
    sums: Vec<f64>,
    /// `[slot][layer][seq]`
    counts: Vec<usize>,
}

impl<'a> SpanMeanHook<'a> {
    fn new(n_layers: usize, n_seq: usize, d: usize, rule: Rule<'a>) -> Self {
        let slots = match &rule {
            Rule::Spans(s) => s.len(),
            Rule::Generated => 1,
        };
        Self {
            n_layers,
            n_seq,
            d,
            rule,
            slots,
            sums: vec![0.0; slots * n_layers * n_seq * d],
            counts: vec![0; slots * n_layers * n_seq],
        }
    }

    fn into_activations(self, position: &[Position]) -> Vec<Activations> {
        let (nl, n, d) = (self.n_layers, self.n_seq, self.d);
        (0..self.slots)
            .map(|k| {
                let mut data = vec![0f32; nl * n * d];
                for l in 0..nl {
                    for i in 0..n {
                        let c = self.counts[(k * nl + l) * n + i];
                        if c == 0 {
                            continue;
                        }
                        let src = ((k * nl + l) * n + i) * d;
                        let dst = (l * n + i) * d;
                        for j in 0..d {
                            data[dst + j] = (self.sums[src + j] / c as f64) as f32;
                        }
                    }
                }
                // A prompt counts when every layer saw it (all layers see the same positions).
                let counts = (0..n).map(|i| self.counts[(k * nl) * n + i]).collect();
                Activations {
                    n_layers: nl,
                    n,
                    d,
                    data,
                    counts,
                    position: position[k],
                    responses: None,
                }
            })
            .collect()
    }
}

impl ResidualHook for SpanMeanHook<'_> {
    fn wants(&self, layer: usize) -> bool {
        layer < self.n_layers
    }

    fn on_block_output(&mut self, h: &Tensor, ctx: &HookCtx<'_>) -> Result<Option<Tensor>> {
        let (b, l, d) = h.dims3()?;
        let k = self.slots;
        // Weights [b, k, l]: 1 where slot k of row b reads position l.
        let mut w = vec![0f32; b * k * l];
        let mut per_row = vec![0usize; b * k];
        for (ri, r) in ctx.rows.iter().enumerate() {
            for i in 0..l {
                for s in 0..k {
                    let on = match &self.rule {
                        Rule::Generated => ctx.kind(ri, i) == PositionKind::Generated,
                        Rule::Spans(spans) => match ctx.position(ri, i) {
                            None => false,
                            Some(p) => {
                                let (a, e) = spans[s][r.seq];
                                p >= a && p < e
                            }
                        },
                    };
                    if on {
                        w[(ri * k + s) * l + i] = 1.0;
                        per_row[ri * k + s] += 1;
                    }
                }
            }
        }
        if per_row.iter().all(|c| *c == 0) {
            return Ok(None);
        }
        let w = Tensor::from_vec(w, (b, k, l), h.device())?;
        let hf = h.to_dtype(DType::F32)?;
        let sums = w.matmul(&hf.contiguous()?)?.to_vec3::<f32>()?; // [b, k, d]
        let (nl, n) = (self.n_layers, self.n_seq);
        for (ri, r) in ctx.rows.iter().enumerate() {
            for (s, row) in sums[ri].iter().enumerate() {
                let c = per_row[ri * k + s];
                if c == 0 {
                    continue;
                }
                let base = (s * nl + ctx.layer) * n + r.seq;
                self.counts[base] += c;
                let acc = &mut self.sums[base * self.d..(base + 1) * self.d];
                for (a, x) in acc.iter_mut().zip(row.iter().take(d)) {
                    *a += *x as f64;
                }
            }
        }
        Ok(None)
    }
}

/// Run token sequences through the decoder in left-padded batches and average the residual at
/// every layer over `spans[slot][i]` (absolute positions `a..b` of sequence `i`), for every slot at
/// once: several positions (e.g. each of the last 5 tokens) cost one forward.
///
/// `batch_size` sequences per forward, grouped by length to keep padding small; `on_batch(done,
/// total)` after each forward.
pub fn capture_spans(
    decoder: &Decoder,
    seqs: &[Vec<u32>],
    spans: &[Vec<(usize, usize)>],
    positions: &[Position],
    batch_size: usize,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<Vec<Activations>> {
    if seqs.is_empty() {
        return Err(Error::Empty("no prompts to capture".into()));
    }
    if spans.len() != positions.len() {
        return Err(Error::InvalidValue(format!(
            "{} span lists for {} positions",
            spans.len(),
            positions.len()
        )));
    }
    for (k, s) in spans.iter().enumerate() {
        if s.len() != seqs.len() {
            return Err(Error::InvalidValue(format!(
                "span list {k} has {} entries for {} sequences",
                s.len(),
                seqs.len()
            )));
        }
        for (i, &(a, b)) in s.iter().enumerate() {
            if a >= b || b > seqs[i].len() {
                return Err(Error::InvalidValue(format!(
                    "sequence {i} ({} tokens) has no tokens at span {a}..{b} ({})",
                    seqs[i].len(),
                    positions[k]
                )));
            }
        }
    }
    let vocab = decoder.cfg.vocab_size;
    for (i, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            return Err(Error::Empty(format!("prompt {i} has no tokens")));
        }
        if let Some(&t) = s.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidValue(format!(
                "prompt {i} has token id {t} outside the vocabulary ({vocab})"
            )));
        }
    }
    let n_layers = decoder.n_layers();
    let mut hook = SpanMeanHook::new(
        n_layers,
        seqs.len(),
        decoder.cfg.d_model,
        Rule::Spans(spans),
    );
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let bs = batch_size.max(1);
    let mut done = 0;
    for chunk in order.chunks(bs) {
        let lmax = chunk.iter().map(|&i| seqs[i].len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(chunk.len() * lmax);
        let mut rows = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let s = &seqs[i];
            let pad = lmax - s.len();
            ids.extend(std::iter::repeat_n(s[0], pad));
            ids.extend_from_slice(s);
            rows.push(RowCtx {
                seq: i,
                chunk_pad: pad,
                start_pos: 0,
                prompt_len: s.len(),
            });
        }
        let tokens = Tensor::from_vec(ids, (chunk.len(), lmax), decoder.device())?;
        let mut cache = KvCache::new(n_layers);
        decoder.forward(&tokens, &rows, &mut cache, Some(&mut hook), LogitsAt::None)?;
        done += chunk.len();
        on_batch(done, seqs.len());
    }
    Ok(hook.into_activations(positions))
}

/// Number of template tokens after the user's message through the end of the generation prompt,
/// for a rendered prompt `text` with ids `ids` (see [`post_instruction_len`]).
fn post_instruction_tokens(model: &Model, p: &ChatPrompt, ids: &[u32]) -> Result<usize> {
    let text = model
        .tokenizer
        .format_prompt(p.system.as_deref(), &p.user)?;
    let user = p.user.trim();
    let end = text.rfind(user).map(|i| i + user.len()).ok_or_else(|| {
        Error::ChatTemplate(format!(
            "cannot find the user message in the rendered prompt (template rewrites it?): {:?}",
            p.user
        ))
    })?;
    let prefix = model.tokenizer.encode(&text[..end])?;
    let common = prefix.iter().zip(ids).take_while(|(a, b)| a == b).count();
    // A token merged across the boundary counts as post-instruction; a base model without a
    // template has nothing after the message, and then the last token stands in.
    Ok((ids.len() - common).max(1))
}

/// Tokens of the chat template that follow the user message in `p` (`<|im_end|>`, `\n`,
/// `<|im_start|>`, `assistant`, `\n` for ChatML = 5), found by tokenizing the rendered prompt up to
/// the end of the user text and comparing with the full prompt's ids. At least 1 (the last token)
/// for models without a chat template.
pub fn post_instruction_len(model: &Model, p: &ChatPrompt) -> Result<usize> {
    let ids = encode_chat(model, p)?;
    post_instruction_tokens(model, p, &ids)
}

/// Activations of chat prompts at every layer for each of `positions`.
///
/// Prompt positions (`last`, `-k`, `post-instruction`) share one batched pass. `Response`
/// generates each answer (with `opts.max_new_tokens`, `opts.sampling`) and averages the residual
/// over the answer's tokens as they are fed back: every generated token but the last (the stop
/// token when the answer ended, which persona vectors also leave out). Answers of one token give no
/// activation and are left out of means (`counts` 0).
pub fn capture_prompts(
    model: &Model,
    prompts: &[ChatPrompt],
    positions: &[Position],
    opts: &CaptureOptions,
    mut on_progress: impl FnMut(&str, usize, usize),
) -> Result<Vec<Activations>> {
    if prompts.is_empty() {
        return Err(Error::Empty("no prompts to capture".into()));
    }
    if positions.is_empty() {
        return Err(Error::Empty("no positions to capture".into()));
    }
    let ids = prompts
        .iter()
        .map(|p| encode_chat(model, p))
        .collect::<Result<Vec<_>>>()?;
    let prompt_pos: Vec<Position> = positions
        .iter()
        .copied()
        .filter(|p| *p != Position::Response)
        .collect();
    let mut by_pos: Vec<Option<Activations>> = vec![None; positions.len()];
    if !prompt_pos.is_empty() {
        let mut spans = Vec::with_capacity(prompt_pos.len());
        for pos in &prompt_pos {
            let mut s = Vec::with_capacity(prompts.len());
            for (i, (p, t)) in prompts.iter().zip(&ids).enumerate() {
                let n = t.len();
                s.push(match *pos {
                    Position::FromEnd(k) => {
                        if k == 0 || k > n {
                            return Err(Error::InvalidValue(format!(
                                "prompt {i} has {n} tokens: no token at position -{k}"
                            )));
                        }
                        (n - k, n - k + 1)
                    }
                    Position::PostInstruction => (n - post_instruction_tokens(model, p, t)?, n),
                    Position::Response => unreachable!("filtered above"),
                });
            }
            spans.push(s);
        }
        let acts = capture_spans(
            &model.decoder,
            &ids,
            &spans,
            &prompt_pos,
            opts.batch_size,
            |d, t| on_progress("prompts", d, t),
        )?;
        let mut it = acts.into_iter();
        for (slot, pos) in positions.iter().enumerate() {
            if *pos != Position::Response {
                by_pos[slot] = it.next();
            }
        }
    }
    if positions.contains(&Position::Response) {
        let acts = capture_responses(model, &ids, opts, |d, t| on_progress("answers", d, t))?;
        for (slot, pos) in positions.iter().enumerate() {
            if *pos == Position::Response {
                by_pos[slot] = Some(acts.clone());
            }
        }
    }
    by_pos
        .into_iter()
        .map(|a| a.ok_or_else(|| Error::InvalidValue("internal: position not captured".into())))
        .collect()
}

/// Generate answers for tokenized prompts and average the residual over the answer tokens.
fn capture_responses(
    model: &Model,
    ids: &[Vec<u32>],
    opts: &CaptureOptions,
    mut on_done: impl FnMut(usize, usize),
) -> Result<Activations> {
    if opts.max_new_tokens < 2 {
        return Err(Error::InvalidValue(
            "response activations need at least 2 new tokens (the last one is never fed back)"
                .into(),
        ));
    }
    let stop = model.tokenizer.stop_token_ids().to_vec();
    let reqs: Vec<GenRequest> = ids
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest {
            prompt: p.clone(),
            max_new_tokens: opts.max_new_tokens,
            sampling: Sampling {
                // Distinct but reproducible streams per prompt when sampling.
                seed: opts.sampling.seed.wrapping_add(i as u64),
                ..opts.sampling
            },
            stop: stop.clone(),
            plan: None,
        })
        .collect();
    let n_layers = model.decoder.n_layers();
    let mut hook = SpanMeanHook::new(n_layers, ids.len(), model.config().d_model, Rule::Generated);
    let mut gen = Generator::new(&model.decoder, opts.batch_size);
    let total = reqs.len();
    let mut done = 0;
    let outs = gen.run(&reqs, Some(&mut hook), |_, _| {
        done += 1;
        on_done(done, total);
        Ok(())
    })?;
    let mut acts = hook
        .into_activations(&[Position::Response])
        .pop()
        .ok_or_else(|| Error::InvalidValue("internal: no response slot".into()))?;
    acts.responses = Some(
        outs.iter()
            .map(|o| model.tokenizer.decode(&o.tokens, true))
            .collect::<Result<Vec<_>>>()?,
    );
    Ok(acts)
}
