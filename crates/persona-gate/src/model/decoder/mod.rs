//! The one decoder shared by every family: pre-norm blocks with grouped-query attention, RoPE and a
//! gated MLP, and a hook point after each block. Family differences come from [`ModelConfig`].

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, ModelConfig};
use super::kv_cache::KvCache;
use super::weights::{Embedding, Linear, WeightLoader};
use crate::intervene::hook::{HookCtx, ResidualHook, RowCtx};
use crate::{Error, Result};

mod attention;
mod gpu;

use attention::{HostMasks, MaskShape};

/// RMSNorm with the weight as stored (gemma's `1 + w` is folded in at load time).
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// cos/sin tables for one RoPE base.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl Rope {
    fn new(
        cfg: &ModelConfig,
        theta: f32,
        linear: Option<f32>,
        freq_factors: Option<&[f32]>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let mut inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        if let Some(ff) = freq_factors {
            for (f, d) in inv.iter_mut().zip(ff) {
                *f /= d;
            }
        } else if let Some(l3) = &cfg.rope_llama3 {
            let low_wl = l3.original_max_position as f32 / l3.low_freq_factor;
            let high_wl = l3.original_max_position as f32 / l3.high_freq_factor;
            for f in inv.iter_mut() {
                let wl = 2.0 * std::f32::consts::PI / *f;
                if wl > low_wl {
                    *f /= l3.factor;
                } else if wl >= high_wl {
                    let smooth = (l3.original_max_position as f32 / wl - l3.low_freq_factor)
                        / (l3.high_freq_factor - l3.low_freq_factor);
                    *f = (1.0 - smooth) * *f / l3.factor + smooth * *f;
                }
            }
        }
        let scale = linear.unwrap_or(1.0);
        let n = cfg.max_position.min(32768);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                let a = (p as f32 / scale) * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), dev)?.to_dtype(dtype)?,
            interleaved: cfg.rope_interleaved,
        })
    }

    /// cos/sin rows (`[b, l, d/2]`) at `positions` (`[b*l]` u32): gathered once per forward and
    /// shared by every block (two launches per forward instead of four per block on a GPU).
    fn gather(&self, positions: &Tensor, b: usize, l: usize) -> Result<(Tensor, Tensor)> {
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(positions, 0)?.reshape((b, l, half))?;
        let sin = self.sin.index_select(positions, 0)?.reshape((b, l, half))?;
        Ok((cos, sin))
    }

    /// Rotate `x` (`[b, h, l, d]`) by gathered `cs` ([`Rope::gather`]).
    fn apply(&self, x: &Tensor, cs: &(Tensor, Tensor)) -> Result<Tensor> {
        let (cos, sin) = cs;
        let x = x.contiguous()?;
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        })
    }

    /// [`Self::apply`] on `[b, l, heads, d]` (the projections' own order, no transpose); halves
    /// layout only (the caller checks `interleaved`).
    #[cfg(feature = "cuda")]
    fn apply_thd(&self, x: &Tensor, cs: &(Tensor, Tensor)) -> Result<Tensor> {
        let (cos, sin) = cs;
        Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?)
    }
}

/// Q, K and V projections: three layers, or one fused layer for dense weights ([`Linear::fuse`]).
#[derive(Debug, Clone)]
enum QkvProj {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// Gate and up projections of the MLP, split or fused like [`QkvProj`].
#[derive(Debug, Clone)]
enum GateUpProj {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    qkv: QkvProj,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    post_ffw_norm: Option<RmsNorm>,
    gate_up: GateUpProj,
    down: Linear,
    sliding: bool,
    /// A bias added to the block's output (`blk.N.resid_add.bias`): what a model baked by
    /// [`super::bake`] carries instead of a run-time `add` (absent in ordinary models).
    resid_add: Option<Tensor>,
}

/// Per-forward inputs shared by all blocks.
struct StepInputs<'a> {
    /// cos/sin at this chunk's positions, for global and (gemma) sliding-window layers.
    rope_global: (Tensor, Tensor),
    rope_local: Option<(Tensor, Tensor)>,
    mask_global: Option<Tensor>,
    mask_local: Option<Tensor>,
    /// The same masks as host values, read once per step for batch-invariant attention (which
    /// runs on the CPU); `None` in the default mode.
    host_masks: Option<HostMasks>,
    b: usize,
    l: usize,
    /// The most leading padding slots of any row (masked columns `[0, max_pad)`).
    max_pad: usize,
    /// Each row's leading padding slots as a `[b]` u32 tensor on the device, when the prefill
    /// runs the flash kernel ([`Decoder::flash_pads`]); `None` otherwise.
    pads_dev: Option<Tensor>,
    cfg: &'a ModelConfig,
    /// How K/V of this chunk enter the cache.
    kv: KvWrite<'a>,
}

impl<'a> StepInputs<'a> {
    /// The same inputs with their tensors on `dev`: what the blocks of a later device segment of a
    /// split model read (prefill and plain decode only; the fixed-slot step never runs split).
    fn on_device(&self, dev: &Device) -> Result<StepInputs<'a>> {
        let mv = |t: &Tensor| t.to_device(dev);
        let pair = |(c, s): &(Tensor, Tensor)| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((mv(c)?, mv(s)?))
        };
        Ok(StepInputs {
            rope_global: pair(&self.rope_global)?,
            rope_local: self.rope_local.as_ref().map(pair).transpose()?,
            mask_global: self.mask_global.as_ref().map(mv).transpose()?,
            mask_local: self.mask_local.as_ref().map(mv).transpose()?,
            host_masks: self.host_masks.clone(),
            b: self.b,
            l: self.l,
            max_pad: self.max_pad,
            pads_dev: self.pads_dev.as_ref().map(mv).transpose()?,
            cfg: self.cfg,
            kv: self.kv,
        })
    }
}

/// How a forward writes K/V into the cache.
#[derive(Clone, Copy)]
enum KvWrite<'a> {
    /// Append at the host-known length (prefill and ordinary decode).
    Append,
    /// One token per row at a device-held slot, attending over the first `view_len` slots
    /// (the CUDA-graph decode step; see [`FixedSlotInputs`]).
    Fixed {
        slot_idx: &'a Tensor,
        view_len: usize,
    },
}

/// Device-resident inputs of a decode step whose kernels must not depend on host values, so that
/// one captured CUDA graph can replay it at every step: the caller rewrites these buffers between
/// replays.
pub struct FixedSlotInputs<'a> {
    /// `[b]` u32: RoPE position of each row's new token.
    pub positions: &'a Tensor,
    /// `[b, 1, 1, 1, view_len]` additive mask (0 or -inf) in the activation dtype.
    pub mask: &'a Tensor,
    /// `[b, n_kv_heads, 1, head_dim]` u32, every entry the cache slot being written.
    pub slot_idx: &'a Tensor,
    /// Cache slots attended over (>= the slot written + 1; the mask hides the rest).
    pub view_len: usize,
}

/// Which positions' logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// `[batch, vocab]` at each row's last position.
    Last,
    /// `[batch, chunk_len, vocab]`.
    All,
    /// `[batch, n, vocab]` at the chunk's last `n` positions (clamped to the chunk): a
    /// teacher-forced read of left-padded (prompt, answer) rows needs the LM head only over the
    /// answers, which all end the chunk.
    Tail(usize),
    /// No logits (activation capture only).
    None,
}

/// A block's baked residual bias when the file has one, checked to be `[d_model]`.
fn opt_resid_add(w: &WeightLoader, name: &str, d_model: usize) -> Result<Option<Tensor>> {
    if !w.has(name) {
        return Ok(None);
    }
    let t = w.dense(name)?;
    if t.dims() != [d_model] {
        return Err(Error::InvalidValue(format!(
            "tensor '{name}' has shape {:?}, expected [{d_model}]",
            t.dims()
        )));
    }
    Ok(Some(t))
}

/// The shared decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    lm_head: Linear,
    rope_global: Rope,
    rope_local: Option<Rope>,
    dtype: DType,
    device: Device,
    /// The device of each block when the layers are split over several devices (empty when the
    /// whole model is on `device`): see [`Decoder::load`].
    block_devices: Vec<Device>,
    /// Compute every row the same way whatever else is in the batch (see
    /// [`Decoder::set_batch_invariant`]).
    batch_invariant: bool,
}

impl Decoder {
    /// Build the decoder from `w`'s tensors. With `more_devices`, the layers are split in
    /// contiguous, equal runs over `w.device` and then each of `more_devices` (the way
    /// `device_map="auto"` places a model too large for one GPU): the embedding sits on the first
    /// device, the final norm and LM head on the last, and the residual stream moves to the next
    /// device between runs. Hooks, plans and captures see every layer as before.
    pub fn load(cfg: ModelConfig, w: &mut WeightLoader, more_devices: &[Device]) -> Result<Self> {
        cfg.validate()?;
        let first = w.device.clone();
        let block_devices = split_layers(&first, more_devices, cfg.n_layers)?;
        let dtype = w.mode.activation_dtype();
        let eps = cfg.rms_eps as f32;
        let norm = |w: &WeightLoader, name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.norm(name)?,
                eps,
            })
        };
        let opt_norm = |w: &WeightLoader, name: &str| -> Result<Option<RmsNorm>> {
            if w.has(name) {
                Ok(Some(norm(w, name)?))
            } else {
                Ok(None)
            }
        };
        let embed = w.embedding("token_embd.weight")?;
        if embed.d != cfg.d_model {
            return Err(Error::InvalidValue(format!(
                "token embedding width {} differs from d_model {}",
                embed.d, cfg.d_model
            )));
        }
        let (fuse_qkv, fuse_gate_up) = fusion_from_env();
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            if let Some(d) = block_devices.get(i) {
                w.device = d.clone();
            }
            let p = |s: &str| format!("blk.{i}.{s}");
            let bias = |s: &str| cfg.qkv_bias.then(|| p(s));
            let q = w.linear(&p("attn_q.weight"), bias("attn_q.bias").as_deref())?;
            let k = w.linear(&p("attn_k.weight"), bias("attn_k.bias").as_deref())?;
            let v = w.linear(&p("attn_v.weight"), bias("attn_v.bias").as_deref())?;
            let qkv = match fuse_qkv
                .then(|| Linear::fuse(&[&q, &k, &v]))
                .transpose()?
                .flatten()
            {
                Some(f) => QkvProj::Fused(f),
                None => QkvProj::Split { q, k, v },
            };
            let gate = w.linear(&p("ffn_gate.weight"), None)?;
            let up = w.linear(&p("ffn_up.weight"), None)?;
            let gate_up = match fuse_gate_up
                .then(|| Linear::fuse(&[&gate, &up]))
                .transpose()?
                .flatten()
            {
                Some(f) => GateUpProj::Fused(f),
                None => GateUpProj::Split { gate, up },
            };
            blocks.push(Block {
                attn_norm: norm(w, &p("attn_norm.weight"))?,
                qkv,
                o: w.linear(&p("attn_output.weight"), None)?,
                q_norm: if cfg.qk_norm {
                    opt_norm(w, &p("attn_q_norm.weight"))?
                } else {
                    None
                },
                k_norm: if cfg.qk_norm {
                    opt_norm(w, &p("attn_k_norm.weight"))?
                } else {
                    None
                },
                post_attn_norm: if cfg.sandwich_norms {
                    Some(norm(w, &p("post_attention_norm.weight"))?)
                } else {
                    None
                },
                ffn_norm: norm(w, &p("ffn_norm.weight"))?,
                post_ffw_norm: if cfg.sandwich_norms {
                    Some(norm(w, &p("post_ffw_norm.weight"))?)
                } else {
                    None
                },
                gate_up,
                down: w.linear(&p("ffn_down.weight"), None)?,
                sliding: cfg.is_sliding(i),
                resid_add: opt_resid_add(w, &p(super::bake::RESID_ADD), cfg.d_model)?,
            });
        }
        let final_norm = norm(w, "output_norm.weight")?;
        let lm_head = if !cfg.tied_embeddings && w.has("output.weight") {
            w.linear("output.weight", None)?
        } else if block_devices.is_empty() {
            embed.as_linear()?
        } else {
            // A tied head on a split model reads its own copy on the last device.
            w.embedding("token_embd.weight")?.as_linear()?
        };
        w.device = first;
        let freq_factors = if w.has("rope_freqs.weight") {
            Some(
                w.dense("rope_freqs.weight")?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        let dev = w.device.clone();
        // RoPE tables in f32 except in half modes, where the kernels want matching dtypes.
        let rope_global = Rope::new(
            &cfg,
            cfg.rope_theta,
            cfg.rope_linear_factor,
            freq_factors.as_deref(),
            dtype,
            &dev,
        )?;
        let rope_local = match cfg.rope_local_theta {
            Some(t) => Some(Rope::new(&cfg, t, None, None, dtype, &dev)?),
            None => None,
        };
        Ok(Self {
            cfg,
            embed,
            blocks,
            final_norm,
            lm_head,
            rope_global,
            rope_local,
            dtype,
            device: dev,
            block_devices,
            batch_invariant: false,
        })
    }

    /// Make a row's numbers independent of the batch it runs in: the same prompt alone, left-padded
    /// in a study batch or in a server's continuous batch gives bit-identical logits, so greedy
    /// outputs match exactly (candle's tiled kernels round differently per batch shape, which flips
    /// 1-2% of greedy labels in a local-vs-served audit). Projections use kernels whose per-row sums
    /// ignore the other rows ([`Linear::forward_batch_invariant`]) and attention reads only the keys
    /// a row may see, in cache order ([`crate::kernels::attention`]). CPU only: cuBLAS picks its
    /// kernels by shape.
    pub fn set_batch_invariant(&mut self, on: bool) -> Result<()> {
        if on && !self.device.is_cpu() {
            return Err(Error::InvalidValue(
                "batch-invariant kernels run on the CPU only (GPU GEMMs pick kernels by batch shape)"
                    .into(),
            ));
        }
        self.batch_invariant = on;
        Ok(())
    }

    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    /// A projection, batch-invariant when the decoder is.
    fn linear(&self, l: &Linear, x: &Tensor) -> Result<Tensor> {
        if self.batch_invariant {
            l.forward_batch_invariant(x)
        } else {
            l.forward(x)
        }
    }

    /// The device of the embedding: where token ids go in.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn n_layers(&self) -> usize {
        self.cfg.n_layers
    }

    /// Run one chunk of tokens through the model.
    ///
    /// `tokens` is `[batch, chunk_len]`. For a fresh cache, rows may carry leading padding
    /// (`rows[b].chunk_pad`); an existing cache is extended by `chunk_len` slots for every row.
    pub fn forward(
        &self,
        tokens: &Tensor,
        rows: &[RowCtx],
        cache: &mut KvCache,
        hook: Option<&mut dyn ResidualHook>,
        logits_at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        let (b, l) = tokens.dims2()?;
        if rows.len() != b {
            return Err(Error::InvalidValue(format!(
                "{} row contexts for a batch of {b}",
                rows.len()
            )));
        }
        if cache.is_empty() && cache.batch() == 0 {
            cache.start(&rows.iter().map(|r| r.chunk_pad).collect::<Vec<_>>());
        }
        let t0 = cache.len();
        // A chunk's padding is what is left of each row's declared padding (chunked prefill).
        let pads_match = cache
            .pads()
            .iter()
            .zip(rows)
            .all(|(&p, r)| r.chunk_pad == p.saturating_sub(t0).min(l));
        if cache.batch() != b || !pads_match {
            return Err(Error::InvalidValue(
                "extending a cache needs the same rows, padded as the cache declares".into(),
            ));
        }
        let total = t0 + l;
        let pads = cache.pads().to_vec();

        // Positions and masks on the host: O(b * l * total) bytes, small next to the matmuls.
        let mut pos = Vec::with_capacity(b * l);
        for &p in pads.iter() {
            for i in 0..l {
                pos.push((t0 + i).saturating_sub(p) as u32);
            }
        }
        let positions = Tensor::from_vec(pos, b * l, &self.device)?;
        let window = self.cfg.sliding_window;
        let any_local = self.blocks.iter().any(|bl| bl.sliding);
        // The flash kernel masks from positions: no `b x l x total` mask to build and upload.
        let pads_dev = self.flash_pads(&pads, l)?;
        let (mask_global, mask_local) = if pads_dev.is_some() {
            (None, None)
        } else {
            let global = self.build_mask(&pads, t0, l, None)?;
            let local = if any_local && window.is_some_and(|w| total > w) {
                self.build_mask(&pads, t0, l, window)?
            } else {
                global.clone()
            };
            (global, local)
        };
        let rope_local = match &self.rope_local {
            Some(r) if any_local => Some(r.gather(&positions, b, l)?),
            _ => None,
        };
        let host_masks = self.host_masks(&mask_global, &mask_local)?;
        let step = StepInputs {
            rope_global: self.rope_global.gather(&positions, b, l)?,
            rope_local,
            mask_global,
            mask_local,
            host_masks,
            b,
            l,
            max_pad: pads.iter().copied().max().unwrap_or(0),
            pads_dev,
            cfg: &self.cfg,
            kv: KvWrite::Append,
        };
        let out = self.run_blocks(tokens, rows, cache, hook, logits_at, &step)?;
        cache.advance(l);
        Ok(out)
    }

    /// True when [`Decoder::forward_fixed_slot`] can run this model (no sliding-window layers,
    /// whose masks differ per layer).
    pub fn supports_fixed_slot(&self) -> bool {
        // A split model runs without CUDA graphs: one graph cannot span two devices' streams.
        !self.blocks.iter().any(|b| b.sliding) && self.block_devices.is_empty()
    }

    /// One decode token per row (`tokens`: `[b, 1]`) with every host-dependent value taken from
    /// device buffers (`inp`), so the whole call can be captured once as a CUDA graph and replayed.
    /// Returns last-position logits `[b, vocab]` (f32). Does not advance the cache length: the
    /// caller does, once per replay.
    pub fn forward_fixed_slot(
        &self,
        tokens: &Tensor,
        rows: &[RowCtx],
        cache: &mut KvCache,
        hook: Option<&mut dyn ResidualHook>,
        inp: &FixedSlotInputs<'_>,
    ) -> Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        if l != 1 || rows.len() != b || cache.batch() != b || !self.supports_fixed_slot() {
            return Err(Error::InvalidValue(format!(
                "fixed-slot decode needs one token for each of the cache's {} rows and no sliding window",
                cache.batch()
            )));
        }
        let mask_global = Some(inp.mask.clone());
        let host_masks = self.host_masks(&mask_global, &None)?;
        let step = StepInputs {
            rope_global: self.rope_global.gather(inp.positions, b, 1)?,
            rope_local: None,
            mask_global,
            mask_local: None,
            host_masks,
            b,
            l: 1,
            max_pad: 0,
            pads_dev: None,
            cfg: &self.cfg,
            kv: KvWrite::Fixed {
                slot_idx: inp.slot_idx,
                view_len: inp.view_len,
            },
        };
        self.run_blocks(tokens, rows, cache, hook, LogitsAt::Last, &step)?
            .ok_or_else(|| Error::InvalidValue("model returned no logits".into()))
    }

    /// Embedding, blocks with hooks, final norm and head: shared by both forwards.
    fn run_blocks(
        &self,
        tokens: &Tensor,
        rows: &[RowCtx],
        cache: &mut KvCache,
        mut hook: Option<&mut dyn ResidualHook>,
        logits_at: LogitsAt,
        step: &StepInputs<'_>,
    ) -> Result<Option<Tensor>> {
        let l = step.l;
        let mut h = self.embed.forward(tokens, self.dtype)?;
        if let Some(s) = self.cfg.embed_scale {
            h = (h * s as f64)?;
        }
        if let Some(hk) = hook.as_deref_mut() {
            if hk.wants_embedding() {
                let ctx = HookCtx {
                    layer: crate::intervene::hook::EMBEDDING_LAYER,
                    rows,
                    chunk_len: l,
                    batch_invariant: self.batch_invariant,
                };
                if let Some(new) = hk.on_embedding(&h, &ctx)? {
                    h = new;
                }
            }
        }
        // Inputs moved to the current device segment of a split model (None on the first).
        let mut moved: Option<StepInputs<'_>> = None;
        for (li, block) in self.blocks.iter().enumerate() {
            if let Some(dev) = self.block_devices.get(li) {
                if !h.device().same_device(dev) {
                    h = h.to_device(dev)?;
                    moved = Some(step.on_device(dev)?);
                }
            }
            h = self.block_forward(
                li,
                block,
                &h,
                moved.as_ref().unwrap_or(step),
                cache,
                crate::intervene::hook::reborrow(&mut hook),
                rows,
            )?;
            if let Some(b) = &block.resid_add {
                h = h.broadcast_add(b)?;
            }
            if let Some(hk) = hook.as_deref_mut() {
                if hk.wants(li) {
                    let ctx = HookCtx {
                        layer: li,
                        rows,
                        chunk_len: l,
                        batch_invariant: self.batch_invariant,
                    };
                    if let Some(new) = hk.on_block_output(&h, &ctx)? {
                        if new.dims() != h.dims() {
                            return Err(Error::InvalidValue(format!(
                                "hook at layer {li} returned shape {:?}, expected {:?}",
                                new.dims(),
                                h.dims()
                            )));
                        }
                        h = new;
                    }
                }
                // A capture that needs no logits and nothing past this layer ends the forward
                // here (the later blocks and the LM head would be computed for nothing).
                if logits_at == LogitsAt::None && hk.stop_after() == Some(li) {
                    return Ok(None);
                }
            }
        }
        let out = match logits_at {
            LogitsAt::None => return Ok(None),
            LogitsAt::Last => h.narrow(1, l - 1, 1)?,
            LogitsAt::All => h,
            LogitsAt::Tail(n) => {
                let n = n.clamp(1, l);
                h.narrow(1, l - n, n)?
            }
        };
        let out = self.final_norm.forward(&out)?;
        let mut logits = self.linear(&self.lm_head, &out)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.cfg.final_logit_softcap {
            logits = ((logits / cap as f64)?.tanh()? * cap as f64)?;
        }
        Ok(Some(match logits_at {
            LogitsAt::Last => logits.squeeze(1)?,
            _ => logits,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        li: usize,
        bl: &Block,
        x: &Tensor,
        s: &StepInputs,
        cache: &mut KvCache,
        hook: Option<&mut dyn ResidualHook>,
        rows: &[RowCtx],
    ) -> Result<Tensor> {
        let cfg = s.cfg;
        let (b, l) = (s.b, s.l);
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let xn = bl.attn_norm.forward(x)?;
        #[cfg(feature = "cuda")]
        if let Some(attn) = self.flash_from_fused(li, bl, &xn, s, cache)? {
            return self.block_tail(li, bl, x, &attn, s, hook, rows);
        }
        #[cfg(feature = "cuda")]
        if let Some((q, k_all, v_all)) = self.decode_from_fused(li, bl, &xn, s, cache)? {
            let attn = self.attend(bl, &q, &k_all, &v_all, s)?;
            return self.block_tail(li, bl, x, &attn, s, hook, rows);
        }
        let (q, k, v) = match &bl.qkv {
            QkvProj::Split { q, k, v } => (
                self.linear(q, &xn)?,
                self.linear(k, &xn)?,
                self.linear(v, &xn)?,
            ),
            QkvProj::Fused(f) => {
                let y = self.linear(f, &xn)?;
                (
                    y.narrow(2, 0, nh * hd)?,
                    y.narrow(2, nh * hd, nkv * hd)?,
                    y.narrow(2, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let q = q.contiguous()?.reshape((b, l, nh, hd))?;
        let k = k.contiguous()?.reshape((b, l, nkv, hd))?;
        let v = v.contiguous()?.reshape((b, l, nkv, hd))?;
        let (q, k) = match (&bl.q_norm, &bl.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        let (rope, cs) = self.rope_for(bl, s);
        #[cfg(feature = "cuda")]
        if let Some(pads) = &s.pads_dev {
            let attn = self.flash_attention(li, bl, &q, &k, &v, rope, cs, pads, cache)?;
            return self.block_tail(li, bl, x, &attn.reshape((b, l, nh * hd))?, s, hook, rows);
        }
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let q = rope.apply(&q, cs)?;
        let k = rope.apply(&k, cs)?;
        let (k_all, v_all) = match s.kv {
            KvWrite::Append => cache.append(li, &k, &v)?,
            KvWrite::Fixed { slot_idx, view_len } => {
                cache.write_at(li, &k, &v, slot_idx, view_len)?
            }
        };
        let attn = self.attend(bl, &q, &k_all, &v_all, s)?;
        self.block_tail(li, bl, x, &attn, s, hook, rows)
    }

    /// Attention of the chunk's rotated queries `q` (`[b, nh, l, hd]`) over the cache views
    /// `k_all`/`v_all` (`[b, nkv, slots, hd]`): the decode kernel where it applies, else grouped
    /// matmuls with the step's masks. Returns `[b, l, nh * hd]`.
    fn attend(
        &self,
        bl: &Block,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        s: &StepInputs,
    ) -> Result<Tensor> {
        let (b, l) = (s.b, s.l);
        let (nh, nkv, hd) = (s.cfg.n_heads, s.cfg.n_kv_heads, s.cfg.head_dim);
        #[cfg(feature = "cuda")]
        if let Some(attn) = self.decode_attention(bl, q, k_all, v_all, s)? {
            return Ok(attn);
        }
        // Grouped-query attention without copying K/V per head: the n_rep query heads of one KV
        // head become extra rows of one matmul.
        let n_rep = nh / nkv;
        let q = q.reshape((b, nkv, n_rep * l, hd))?;
        let attn = match &s.host_masks {
            Some(hm) => {
                let mask = if bl.sliding { &hm.local } else { &hm.global };
                self.invariant_attention(&q, k_all, v_all, mask.clone(), l)?
            }
            None => {
                let mask = if bl.sliding {
                    &s.mask_local
                } else {
                    &s.mask_global
                };
                // Which key columns the mask can touch, when the chunk is the cache's tail and the
                // mask is padding + causality only (not a sliding window's).
                let shape = matches!(s.kv, KvWrite::Append).then_some(MaskShape {
                    max_pad: (!bl.sliding).then_some(s.max_pad),
                });
                self.blocked_attention(&q, k_all, v_all, mask.as_ref(), b, l, shape)?
            }
        };
        Ok(attn
            .reshape((b, nh, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))?)
    }

    /// The rest of a block once attention has run (`attn`: `[b, l, nh * hd]`): output
    /// projection, residual, the mid-block hook and the MLP.
    #[allow(clippy::too_many_arguments)]
    fn block_tail(
        &self,
        li: usize,
        bl: &Block,
        x: &Tensor,
        attn: &Tensor,
        s: &StepInputs,
        hook: Option<&mut dyn ResidualHook>,
        rows: &[RowCtx],
    ) -> Result<Tensor> {
        let cfg = s.cfg;
        let mut a = self.linear(&bl.o, attn)?;
        if let Some(n) = &bl.post_attn_norm {
            a = n.forward(&a)?;
        }
        let mut h = (x + a)?;
        if let Some(hk) = hook {
            if hk.wants_mid(li) {
                let ctx = HookCtx {
                    layer: li,
                    rows,
                    chunk_len: s.l,
                    batch_invariant: self.batch_invariant,
                };
                if let Some(new) = hk.on_mid(&h, &ctx)? {
                    h = new;
                }
            }
        }

        let hn = bl.ffn_norm.forward(&h)?;
        let gated = self.gated_activation(bl, &hn, cfg.activation)?;
        let mut m = self.linear(&bl.down, &gated)?;
        if let Some(n) = &bl.post_ffw_norm {
            m = n.forward(&m)?;
        }
        Ok((h + m)?)
    }

    /// `act(gate(x)) * up(x)`: one fused kernel over the fused projection's output on CUDA bf16
    /// (`kernels/cuda_glu.rs`), else the activation and product as separate tensor ops.
    fn gated_activation(&self, bl: &Block, hn: &Tensor, act: Activation) -> Result<Tensor> {
        let (g, u) = match &bl.gate_up {
            GateUpProj::Split { gate, up } => (self.linear(gate, hn)?, self.linear(up, hn)?),
            GateUpProj::Fused(f) => {
                let y = self.linear(f, hn)?;
                let ffn = f.out_features / 2;
                (y.narrow(2, 0, ffn)?, y.narrow(2, ffn, ffn)?)
            }
        };
        #[cfg(feature = "cuda")]
        if let Some(out) =
            crate::kernels::cuda_glu::gated(&g, &u, matches!(act, Activation::GeluTanh))?
        {
            return Ok(out);
        }
        let g = match act {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
        };
        Ok((g * u)?)
    }

    /// The rotary tables a block uses: the local ones on a sliding-window layer of a model that
    /// has them, else the global ones.
    fn rope_for<'s>(&'s self, bl: &Block, s: &'s StepInputs) -> (&'s Rope, &'s (Tensor, Tensor)) {
        match (bl.sliding, &self.rope_local, &s.rope_local) {
            (true, Some(r), Some(cs)) => (r, cs),
            _ => (&self.rope_global, &s.rope_global),
        }
    }
}

/// The device of each block for a split over `first` and `more` (empty: no split): contiguous
/// runs of `n_layers / devices` layers (as even as the count allows).
fn split_layers(first: &Device, more: &[Device], n_layers: usize) -> Result<Vec<Device>> {
    if more.is_empty() {
        return Ok(Vec::new());
    }
    let devs: Vec<Device> = std::iter::once(first.clone())
        .chain(more.iter().cloned())
        .collect();
    if devs.len() > n_layers {
        return Err(Error::InvalidValue(format!(
            "cannot split {n_layers} layers over {} devices",
            devs.len()
        )));
    }
    if devs.iter().any(|d| d.is_cpu() != first.is_cpu()) {
        return Err(Error::InvalidValue(
            "a layer split needs devices of one kind (all cuda:N, or cpu for testing)".into(),
        ));
    }
    Ok((0..n_layers)
        .map(|i| devs[i * devs.len() / n_layers].clone())
        .collect())
}

/// Which dense projections are fused into one GEMM: `PGATE_FUSE=qkv` (default), `all`, `gateup` or
/// `none`. Measured on an H100 (BENCHMARKS.md): fusing Q/K/V helps at every batch size (the K and V
/// projections are too small to reach full bandwidth alone), fusing gate/up *slows* batch 16 and 64
/// by ~6% (cuBLAS picks a worse kernel for the 2x wider GEMM), hence the default. Outputs are the same
/// either way.
fn fusion_from_env() -> (bool, bool) {
    match std::env::var("PGATE_FUSE").as_deref() {
        Ok("none") => (false, false),
        Ok("all") => (true, true),
        Ok("gateup") => (false, true),
        _ => (true, false),
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Decoder>();
    let _ = D::Minus1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_split_in_contiguous_even_runs() {
        let cpu = Device::Cpu;
        assert!(split_layers(&cpu, &[], 30).unwrap().is_empty());
        assert_eq!(
            split_layers(&cpu, std::slice::from_ref(&cpu), 30)
                .unwrap()
                .len(),
            30
        );
        let err = split_layers(&cpu, &vec![cpu.clone(); 4], 4).unwrap_err();
        assert!(err
            .to_string()
            .contains("cannot split 4 layers over 5 devices"));
    }
}
