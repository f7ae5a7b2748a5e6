//! `persona_gate.Model`: load, inspect, tokenize, capture, generate, logits.

use std::collections::HashMap;
use std::sync::Arc;

use persona_gate::directions::{capture_prompts, capture_spans, CaptureOptions, Position};
use persona_gate::events::Event;
use persona_gate::generate::{
    encode_chat, ChatPrompt, Engine, EngineConfig, EngineEvent, GenOutput, GenStats, Sampling,
    SeqSpec,
};
use persona_gate::intervene::CompiledPlan;
use persona_gate::model::{DTypeMode, Model};
use pyo3::prelude::*;

use crate::arrays::to_numpy;
use crate::errors::{invalid, json_err, IntoPy};
use crate::watch::{detached, Watch};

/// A loaded chat model (weights, tokenizer, chat template). Thread-safe: several Python threads
/// may use one model at once.
#[pyclass(frozen, name = "Model", module = "persona_gate._native")]
pub struct PyModel {
    pub inner: Arc<Model>,
}

/// One finished generation: (text, token ids, finish reason, prompt token count).
type GenRow = (String, Vec<u32>, String, usize);

#[pymethods]
impl PyModel {
    /// Load a model: a short name of the cache (`q05`, `q15`), a `.gguf` file, an HF directory or
    /// a hub repo id; `dtype` is `q` (quantized matmuls), `f32`, `bf16` or `f16`; `device` is `cpu`,
    /// `cuda` or `cuda:N`, or a comma-separated list (`cuda:0,cuda:1`) to split the layers over those
    /// devices; `threads` sets the CPU kernels' thread count.
    #[staticmethod]
    #[pyo3(signature = (spec, dtype = "q", device = "cpu", threads = None))]
    fn load(
        py: Python<'_>,
        spec: String,
        dtype: &str,
        device: &str,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        // The CLI's model group, so a device list splits the layers the same way here.
        let args = persona_gate::model::ModelArgs {
            model: spec,
            dtype: dtype.into(),
            device: Some(device.into()),
            ..Default::default()
        };
        DTypeMode::parse(dtype).py_err()?;
        args.devices().py_err()?;
        if let Some(n) = threads {
            persona_gate::kernels::set_threads(n).py_err()?;
        }
        let m = detached(py, None, move |_| args.load().py_err())?;
        Ok(PyModel { inner: Arc::new(m) })
    }

    /// What `pgate inspect --json` prints, as JSON text.
    fn info_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.info).map_err(json_err)
    }

    #[getter]
    fn n_layers(&self) -> usize {
        self.inner.config().n_layers
    }

    #[getter]
    fn d_model(&self) -> usize {
        self.inner.config().d_model
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config().vocab_size
    }

    /// Token ids of a chat prompt rendered with the model's template (generation prompt included).
    #[pyo3(signature = (user, system = None))]
    fn encode(&self, user: String, system: Option<String>) -> PyResult<Vec<u32>> {
        encode_chat(&self.inner, &ChatPrompt::new(user).with_system(system)).py_err()
    }

    /// Text of token ids (special tokens skipped unless `skip_special` is false).
    #[pyo3(signature = (ids, skip_special = true))]
    fn decode(&self, ids: Vec<u32>, skip_special: bool) -> PyResult<String> {
        self.inner.tokenizer.decode(&ids, skip_special).py_err()
    }

    /// Token ids that end a turn.
    fn stop_ids(&self) -> Vec<u32> {
        self.inner.tokenizer.stop_token_ids().to_vec()
    }

    /// Residuals of chat prompts at every layer: float32 `[n_layers, n, d_model]` and the number of
    /// tokens averaged per prompt. The array owns the library's buffer (no copy).
    #[pyo3(signature = (users, systems, position = "last", batch_size = 8, max_new_tokens = 64, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn capture<'py>(
        &self,
        py: Python<'py>,
        users: Vec<String>,
        systems: Vec<Option<String>>,
        position: &str,
        batch_size: usize,
        max_new_tokens: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(Bound<'py, PyAny>, Vec<usize>)> {
        if systems.len() != users.len() {
            return Err(invalid(format!(
                "{} system prompts for {} prompts",
                systems.len(),
                users.len()
            )));
        }
        let pos = Position::parse(position).py_err()?;
        let prompts: Vec<ChatPrompt> = users
            .into_iter()
            .zip(systems)
            .map(|(u, s)| ChatPrompt::new(u).with_system(s))
            .collect();
        let opts = CaptureOptions {
            batch_size,
            max_new_tokens,
            ..Default::default()
        };
        let model = &self.inner;
        let mut acts = detached(py, progress, |w| {
            capture_prompts(model, &prompts, &[pos], &opts, |phase, d, t| {
                w.progress(phase, d, t);
                w.poll_or_unwind();
            })
            .py_err()
        })?;
        let a = acts.pop().ok_or_else(|| invalid("nothing captured"))?;
        let shape = [a.n_layers, a.n, a.d];
        Ok((to_numpy(py, a.data, &shape)?, a.counts))
    }

    /// Residuals of token-id sequences at every layer, at the `from_end`-th token from the end
    /// (1 = the last): float32 `[n_layers, n, d_model]`, no copy.
    #[pyo3(signature = (ids, from_end = 1, batch_size = 8, progress = None))]
    fn capture_ids<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<Vec<u32>>,
        from_end: usize,
        batch_size: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut spans = Vec::with_capacity(ids.len());
        for (i, s) in ids.iter().enumerate() {
            if from_end == 0 || from_end > s.len() {
                return Err(invalid(format!(
                    "sequence {i} has {} tokens: no token at position -{from_end}",
                    s.len()
                )));
            }
            spans.push((s.len() - from_end, s.len() - from_end + 1));
        }
        let dec = &self.inner.decoder;
        let pos = Position::FromEnd(from_end);
        let mut acts = detached(py, progress, |w| {
            capture_spans(dec, &ids, &[spans], &[pos], batch_size, |d, t| {
                w.progress("prompts", d, t);
                w.poll_or_unwind();
            })
            .py_err()
        })?;
        let a = acts.pop().ok_or_else(|| invalid("nothing captured"))?;
        let shape = [a.n_layers, a.n, a.d];
        to_numpy(py, a.data, &shape)
    }

    /// Generate answers. `plans` are plan JSON texts (the `Plan` form), `plan_of[i]` the index of
    /// prompt i's plan (None: unsteered). Returns one `(text, tokens, finish, prompt_tokens)` per
    /// prompt and the run's counters as JSON.
    #[pyo3(signature = (users, systems, plans, plan_of, max_tokens = 128, batch_size = 16, temperature = 0.0, top_p = 1.0, seed = 0, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        users: Vec<String>,
        systems: Vec<Option<String>>,
        plans: Vec<String>,
        plan_of: Vec<Option<usize>>,
        max_tokens: usize,
        batch_size: usize,
        temperature: f32,
        top_p: f32,
        seed: u64,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(Vec<GenRow>, String)> {
        if systems.len() != users.len() || plan_of.len() != users.len() {
            return Err(invalid(format!(
                "{} prompts, {} system prompts, {} plan choices: give one of each per prompt",
                users.len(),
                systems.len(),
                plan_of.len()
            )));
        }
        if users.is_empty() {
            return Err(crate::errors::to_py(persona_gate::Error::Empty(
                "no prompts given".into(),
            )));
        }
        let model = &self.inner;
        let compiled = plans
            .iter()
            .map(|j| crate::plans::compile(j, model))
            .collect::<persona_gate::Result<Vec<Arc<CompiledPlan>>>>()
            .py_err()?;
        let stop = model.tokenizer.stop_token_ids().to_vec();
        // One seed for every prompt, as `pgate generate --seed` does.
        let sampling = Sampling {
            temperature,
            top_p,
            seed,
        };
        sampling.validate().py_err()?;
        let mut seqs = Vec::with_capacity(users.len());
        for (i, (u, s)) in users.into_iter().zip(systems).enumerate() {
            let plan = match plan_of[i] {
                None => None,
                Some(k) => Some(compiled.get(k).cloned().ok_or_else(|| {
                    invalid(format!("prompt {i}: plan index {k} of {}", compiled.len()))
                })?),
            };
            let prompt = encode_chat(model, &ChatPrompt::new(u).with_system(s)).py_err()?;
            seqs.push(SeqSpec {
                plan,
                sampling,
                stop: stop.clone(),
                ..SeqSpec::new(prompt, max_tokens)
            });
        }
        let (outs, stats) = detached(py, progress, |w| run_engine(model, seqs, batch_size, w))?;
        let mut rows = Vec::with_capacity(outs.len());
        for o in outs {
            let text = model.tokenizer.decode(&o.tokens, true).py_err()?;
            let finish = serde_json::to_value(o.finish)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            rows.push((text, o.tokens, finish, o.prompt_tokens));
        }
        let stats: HashMap<&str, f64> = HashMap::from([
            ("prefill_tokens", stats.prefill_tokens as f64),
            ("prefill_secs", stats.prefill_secs),
            ("decode_tokens", stats.decode_tokens as f64),
            ("decode_secs", stats.decode_secs),
            ("decode_steps", stats.decode_steps as f64),
        ]);
        Ok((rows, serde_json::to_string(&stats).map_err(json_err)?))
    }

    /// Next-token logits after each token-id sequence, float32 `[n, vocab]`, under an optional
    /// plan (JSON).
    #[pyo3(signature = (ids, plan = None, batch_size = 8))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<Vec<u32>>,
        plan: Option<String>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        if ids.is_empty() || ids.iter().any(|s| s.is_empty()) {
            return Err(crate::errors::to_py(persona_gate::Error::Empty(
                "logits need at least one non-empty token sequence".into(),
            )));
        }
        let model = &self.inner;
        let vocab = model.config().vocab_size;
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(invalid(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let plan = plan
            .map(|j| crate::plans::compile(&j, model))
            .transpose()
            .py_err()?;
        let n = ids.len();
        let data = detached(py, None, |_| {
            let t = persona_gate::refusal::last_logits(model, &ids, plan.as_ref(), batch_size)
                .py_err()?;
            let t = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| crate::errors::to_py(e.into()))?;
            Ok(t)
        })?;
        let v = data.len() / n.max(1);
        to_numpy(py, data, &[n, v])
    }

    fn __repr__(&self) -> String {
        let i = &self.inner.info;
        format!(
            "Model({:?}, {} layers, d_model {}, {})",
            i.name, i.n_layers, i.d_model, i.dtype
        )
    }
}

/// Generate every sequence on the stepping engine (whole-prompt prefill, batches refilled as
/// sequences finish: what `Generator::run` and `pgate generate` do), looking for Ctrl-C between
/// steps. Outputs in submission order.
fn run_engine(
    model: &Model,
    seqs: Vec<SeqSpec>,
    batch_size: usize,
    w: &mut Watch,
) -> PyResult<(Vec<GenOutput>, GenStats)> {
    let total = seqs.len();
    w.event(&Event::Phase {
        name: "generate".into(),
        unit: "prompts".into(),
        total,
    });
    let prompt_lens: Vec<usize> = seqs.iter().map(|s| s.prompt.len()).collect();
    let mut engine = Engine::new(&model.decoder, EngineConfig::batch(batch_size));
    for s in seqs {
        engine.submit(s);
    }
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); total];
    let mut results: Vec<Option<GenOutput>> = vec![None; total];
    let mut done = 0;
    while !engine.is_idle() {
        for ev in engine.step(None) {
            match ev {
                EngineEvent::Token { id, token } => tokens[id].push(token),
                EngineEvent::Finished { id, finish, .. } => {
                    results[id] = Some(GenOutput {
                        tokens: std::mem::take(&mut tokens[id]),
                        finish,
                        prompt_tokens: prompt_lens[id],
                    });
                    done += 1;
                    w.event(&Event::Progress { done, total });
                }
                EngineEvent::Failed { id, error } => {
                    return Err(crate::errors::to_py(persona_gate::Error::Generation(
                        format!("request {id}: {error}"),
                    )))
                }
                _ => {}
            }
        }
        if w.poll() {
            // `detached` raises the KeyboardInterrupt it stored.
            return Err(invalid("interrupted"));
        }
    }
    let stats = engine.finish_stats().clone();
    let outs = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| invalid(format!("request {i} produced no output"))))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((outs, stats))
}

/// Check a plan (JSON, or TOML when `toml`; relative direction files read from `base`) against a
/// model and return it in its normalized JSON form (every direction inline): what
/// `pgate generate --plan` reads.
#[pyfunction]
#[pyo3(signature = (model, text, base = ".", toml = false))]
pub fn plan_check(model: &PyModel, text: &str, base: &str, toml: bool) -> PyResult<String> {
    let plan = crate::plans::load(text, toml, std::path::Path::new(base), &model.inner).py_err()?;
    persona_gate::directions::compile_for(&plan, &model.inner).py_err()?;
    serde_json::to_string(&plan).map_err(json_err)
}
