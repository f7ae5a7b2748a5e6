//! Decode steps with device-held inputs, replayed as CUDA graphs.
//!
//! A decode step of an 8B model issues ~750 small kernels; at ~13 us of host work each (tensor
//! bookkeeping, allocation, launch) the host, not the GPU, sets the pace (BENCHMARKS.md). A CUDA
//! graph records the step's kernels once and replays them with one launch. For one recording to
//! serve every step, nothing the kernels read may be baked in from the host: the token ids, RoPE
//! positions, the attention mask and the cache slot being written all live in device buffers that
//! are rewritten between replays ([`Decoder::forward_fixed_slot`]), and attention runs over a fixed
//! view of the cache (the length rounded up to 64 slots, the mask hiding the tail), so one graph is
//! recorded per 64 slots of length.
//!
//! The same code runs eagerly on the CPU (no graph), which is how its equivalence to the ordinary
//! decode path is tested without a GPU.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use candle_core::Device;
use candle_core::{DType, Tensor, D};

use crate::intervene::{CompiledPlan, PlanHook, ResidualHook, RowCtx};
use crate::model::{Decoder, FixedSlotInputs, KvCache};
use crate::{Error, Result};

/// View lengths are multiples of this many slots: one graph per bucket.
const VIEW_BUCKET: usize = 64;

/// Whether CUDA graphs are used for decode (`PGATE_CUDA_GRAPHS=0` turns them off).
pub fn graphs_enabled() -> bool {
    std::env::var("PGATE_CUDA_GRAPHS").map_or(true, |v| v != "0" && !v.is_empty())
}

/// One recorded step for one view length.
struct Recorded {
    view_len: usize,
    mask: Tensor,
    /// Steps run eagerly at this length so far (the first one warms candle's host-to-device caches
    /// so that recording makes no uploads).
    eager_runs: usize,
    #[cfg(feature = "cuda")]
    graph: Option<candle_core::cuda_backend::cudarc::driver::CudaGraph>,
}

/// Greedy decode steps for one fixed batch over one cache generation.
pub(crate) struct FixedStepper {
    b: usize,
    generation: u64,
    /// Each row's plan when the stepper was made: a recorded graph applies these, so a row that
    /// changes hands to a sequence with another plan needs a new stepper.
    plans: Vec<Option<Arc<CompiledPlan>>>,
    /// `[b, 1]` u32: the tokens fed in; each step overwrites them with its argmax.
    ids: Tensor,
    /// `[b]` f32: each row's logit sum of the last step (non-finite when a logit is), so a row
    /// whose steering blew up is caught on the graph path too.
    sums: Tensor,
    positions: Tensor,
    /// `[1]` u32: the slot written this step.
    slot: Tensor,
    n_kv: usize,
    head_dim: usize,
    recorded: Vec<Recorded>,
    /// Record graphs (CUDA only; on the CPU every step runs eagerly).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    use_graphs: bool,
    /// Number of steps replayed from a graph (for `pgate bench`).
    pub replays: usize,
    pub captures: usize,
}

impl FixedStepper {
    /// Start stepping a batch whose next input tokens are `next` (one per cache row) under `plans`
    /// (one per row). Reserves cache storage for `max_more` more tokens per row so the storage
    /// never moves while graphs hold it.
    pub fn new(
        model: &Decoder,
        cache: &mut KvCache,
        next: &[u32],
        plans: &[Option<Arc<CompiledPlan>>],
        max_more: usize,
    ) -> Result<Self> {
        let b = cache.batch();
        if next.len() != b || b == 0 {
            return Err(Error::InvalidValue(format!(
                "{} next tokens for a cache of {b} rows",
                next.len()
            )));
        }
        cache.reserve(cache.len() + max_more + 1)?;
        let dev = model.device();
        let ids = Tensor::from_vec(next.to_vec(), (b, 1), dev)?;
        let positions = Tensor::zeros(b, DType::U32, dev)?;
        let slot = Tensor::zeros(1, DType::U32, dev)?;
        Ok(Self {
            b,
            generation: cache.generation(),
            plans: plans.to_vec(),
            ids,
            sums: Tensor::zeros(b, DType::F32, dev)?,
            positions,
            slot,
            n_kv: model.cfg.n_kv_heads,
            head_dim: model.cfg.head_dim,
            recorded: Vec::new(),
            use_graphs: dev.is_cuda() && graphs_enabled(),
            replays: 0,
            captures: 0,
        })
    }

    /// Still valid for this cache (same rows, same storage) and these plans (the same ones, by
    /// identity: a plan is compiled once per preset or request and shared)?
    pub fn matches(&self, cache: &KvCache, plans: &[Option<Arc<CompiledPlan>>]) -> bool {
        cache.generation() == self.generation
            && cache.batch() == self.b
            && plans.len() == self.plans.len()
            && plans.iter().zip(&self.plans).all(|(a, b)| same_plan(a, b))
    }

    /// Feed `token` to `row` at the next step (a sequence placed into the row in place of one
    /// that ended).
    pub fn set_next(&mut self, row: usize, token: u32) -> Result<()> {
        let dev = self.ids.device().clone();
        self.ids
            .slice_set(&Tensor::from_vec(vec![token], (1, 1), &dev)?, 0, row)?;
        Ok(())
    }

    /// Run one step: feed the current tokens, return each row's argmax and whether its logits
    /// were finite, advance the cache.
    pub fn step(
        &mut self,
        model: &Decoder,
        cache: &mut KvCache,
        rows: &[RowCtx],
        plans: &[Option<Arc<CompiledPlan>>],
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        if !self.matches(cache, plans) {
            return Err(Error::InvalidValue(
                "fixed-slot stepper used after the batch or cache storage changed".into(),
            ));
        }
        let slot = cache.len();
        let cap = cache.capacity();
        if slot >= cap {
            return Err(Error::InvalidValue(format!(
                "cache slot {slot} beyond the reserved {cap}"
            )));
        }
        let view_len = (slot + 1).next_multiple_of(VIEW_BUCKET).min(cap);
        let dev = model.device().clone();

        // Host-side values of this step, written into the device buffers.
        let pads = cache.pads().to_vec();
        let pos: Vec<u32> = pads.iter().map(|&p| (slot - p) as u32).collect();
        let mut mask = vec![0f32; self.b * view_len];
        for (bi, &p) in pads.iter().enumerate() {
            for (k, m) in mask[bi * view_len..(bi + 1) * view_len]
                .iter_mut()
                .enumerate()
            {
                if k < p || k > slot {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        self.positions
            .slice_set(&Tensor::from_vec(pos, self.b, &dev)?, 0, 0)?;
        self.slot
            .slice_set(&Tensor::from_vec(vec![slot as u32], 1, &dev)?, 0, 0)?;
        let ri = match self.recorded.iter().position(|r| r.view_len == view_len) {
            Some(i) => i,
            None => {
                self.recorded.push(Recorded {
                    view_len,
                    mask: Tensor::zeros((self.b, 1, 1, 1, view_len), model.dtype(), &dev)?,
                    eager_runs: 0,
                    #[cfg(feature = "cuda")]
                    graph: None,
                });
                self.recorded.len() - 1
            }
        };
        let mask =
            Tensor::from_vec(mask, (self.b, 1, 1, 1, view_len), &dev)?.to_dtype(model.dtype())?;
        self.recorded[ri].mask.slice_set(&mask, 0, 0)?;
        drop(mask);

        self.run_recorded(model, cache, rows, plans, ri)?;
        let out = self.ids.flatten_all()?.to_vec1::<u32>()?;
        let finite = self
            .sums
            .to_vec1::<f32>()?
            .iter()
            .map(|s| s.is_finite())
            .collect();
        cache.advance(1);
        Ok((out, finite))
    }

    /// The step's device work: forward on the buffers, argmax written back into `ids`.
    fn body(
        &self,
        model: &Decoder,
        cache: &mut KvCache,
        rows: &[RowCtx],
        plans: &[Option<Arc<CompiledPlan>>],
        mask: &Tensor,
        view_len: usize,
    ) -> Result<()> {
        let slot_idx = self
            .slot
            .reshape((1, 1, 1, 1))?
            .broadcast_as((self.b, self.n_kv, 1, self.head_dim))?
            .contiguous()?;
        let inp = FixedSlotInputs {
            positions: &self.positions,
            mask,
            slot_idx: &slot_idx,
            view_len,
        };
        let mut hook = PlanHook::by_row(plans, model.n_layers());
        let hook: Option<&mut dyn ResidualHook> = if hook.is_active() {
            Some(&mut hook)
        } else {
            None
        };
        let logits = model.forward_fixed_slot(&self.ids, rows, cache, hook, &inp)?;
        #[cfg(feature = "cuda")]
        if let Some(both) = crate::kernels::cuda_argmax::argmax_and_sum(&logits)? {
            let next = both.narrow(0, 0, 1)?.to_dtype(DType::U32)?;
            self.ids.slice_set(&next.reshape((self.b, 1))?, 0, 0)?;
            self.sums
                .slice_set(&both.narrow(0, 1, 1)?.reshape(self.b)?, 0, 0)?;
            return Ok(());
        }
        let next = logits.argmax(D::Minus1)?.reshape((self.b, 1))?;
        self.ids.slice_set(&next, 0, 0)?;
        let sums = logits.to_dtype(DType::F32)?.sum(D::Minus1)?;
        self.sums.slice_set(&sums, 0, 0)?;
        Ok(())
    }

    /// Run step `ri`'s work: replay its graph, or run it eagerly (warming up or recording a graph
    /// on CUDA).
    fn run_recorded(
        &mut self,
        model: &Decoder,
        cache: &mut KvCache,
        rows: &[RowCtx],
        plans: &[Option<Arc<CompiledPlan>>],
        ri: usize,
    ) -> Result<()> {
        let (mask, view_len) = (self.recorded[ri].mask.clone(), self.recorded[ri].view_len);
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cd) = model.device() {
            return self.run_on_cuda(cd, model, cache, rows, plans, ri, &mask, view_len);
        }
        self.body(model, cache, rows, plans, &mask, view_len)?;
        self.recorded[ri].eager_runs += 1;
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn run_on_cuda(
        &mut self,
        cd: &candle_core::CudaDevice,
        model: &Decoder,
        cache: &mut KvCache,
        rows: &[RowCtx],
        plans: &[Option<Arc<CompiledPlan>>],
        ri: usize,
        mask: &Tensor,
        view_len: usize,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        if let Some(g) = &self.recorded[ri].graph {
            g.launch().map_err(cuda_err)?;
            self.replays += 1;
            return Ok(());
        }
        // Kernel-parameter and small-upload caches on: the eager run fills them, recording then
        // finds every upload there (no host copies are allowed while recording).
        let _cache_guard = cd.enable_cuda_graph_htod_cache();
        if !self.use_graphs || self.recorded[ri].eager_runs == 0 {
            self.body(model, cache, rows, plans, mask, view_len)?;
            self.recorded[ri].eager_runs += 1;
            return Ok(());
        }
        let stream = cd.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(cuda_err)?;
        let recorded = self.body(model, cache, rows, plans, mask, view_len);
        // Always end the capture, even after an error, so the stream leaves capture mode.
        let graph = stream.end_capture(
            sys::CUgraphInstantiate_flags_enum::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let graph = match (recorded, graph) {
            (Ok(()), Ok(Some(g))) => g,
            (rec, g) => {
                // Recording failed: stay eager from now on (the step itself has not run yet).
                self.use_graphs = false;
                if let Err(e) = rec {
                    eprintln!("[pgate] CUDA graph recording failed ({e}); decoding without graphs");
                } else if let Err(e) = g {
                    eprintln!(
                        "[pgate] CUDA graph instantiation failed ({e:?}); decoding without graphs"
                    );
                }
                return self.body(model, cache, rows, plans, mask, view_len);
            }
        };
        self.captures += 1;
        graph.launch().map_err(cuda_err)?;
        self.replays += 1;
        self.recorded[ri].graph = Some(graph);
        Ok(())
    }
}

/// Whether two rows run the same plan (the same compiled plan, or none).
pub(crate) fn same_plan(a: &Option<Arc<CompiledPlan>>, b: &Option<Arc<CompiledPlan>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

#[cfg(feature = "cuda")]
fn cuda_err(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::InvalidValue(format!("CUDA graph: {e:?}"))
}
