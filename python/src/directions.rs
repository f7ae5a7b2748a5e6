//! Directions: refusal (Arditi et al. selection), persona traits, random controls, files
//! (safetensors direction sets, llama.cpp control vectors), geometry.
//!
//! A direction set crosses the boundary as `(vectors [n_layers, d] float32, meta JSON, pos_mean,
//! neg_mean)`; the Python `DirectionSet` holds those and does its arithmetic in numpy.

use std::path::Path;

use numpy::PyReadonlyArray1;
use persona_gate::directions::{
    export_control_vector, extract_trait, import_control_vector, random_directions, CaptureOptions,
    DirectionMeta, DirectionSet, ExportOptions, GeometryReport, Method, Position, RandomOptions,
    TraitOptions, TraitSpec,
};
use persona_gate::eval::PromptSet;
use persona_gate::intervene::LayerSet;
use persona_gate::refusal::{select_refusal_direction, SelectOptions};
use pyo3::prelude::*;

use crate::arrays::{from_numpy, to_numpy};
use crate::errors::{invalid, json_err, IntoPy};
use crate::model::PyModel;
use crate::watch::detached;

/// A direction set as it crosses into Python.
type SetParts<'py> = (
    Bound<'py, PyAny>,
    String,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

fn parts<'py>(py: Python<'py>, s: DirectionSet) -> PyResult<SetParts<'py>> {
    let (l, d) = (s.n_layers(), s.d_model());
    let meta = serde_json::to_string(&s.meta).map_err(json_err)?;
    let mean = |m: Option<Vec<f32>>| m.map(|v| to_numpy(py, v, &[l, d])).transpose();
    let pos = mean(s.pos_mean.clone())?;
    let neg = mean(s.neg_mean.clone())?;
    let vectors = to_numpy(py, s.as_flat().to_vec(), &[l, d])?;
    Ok((vectors, meta, pos, neg))
}

/// The library's set from the Python parts (flat vectors, meta JSON).
pub fn from_parts(
    flat: &PyReadonlyArray1<'_, f32>,
    n_layers: usize,
    d: usize,
    meta: &str,
) -> PyResult<DirectionSet> {
    let meta: DirectionMeta = serde_json::from_str(meta).map_err(json_err)?;
    DirectionSet::from_flat(meta, from_numpy(flat)?, n_layers, d).py_err()
}

/// Read a direction set (`.safetensors` of `pgate extract`, or a llama.cpp control-vector `.gguf`).
#[pyfunction]
#[pyo3(signature = (path, n_layers = None))]
pub fn directions_load<'py>(
    py: Python<'py>,
    path: &str,
    n_layers: Option<usize>,
) -> PyResult<SetParts<'py>> {
    let p = Path::new(path);
    let gguf = p
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let s = if gguf {
        import_control_vector(p, n_layers)
    } else {
        DirectionSet::load(p)
    }
    .py_err()?;
    parts(py, s)
}

/// Write a direction set as safetensors with its metadata (what `pgate` reads everywhere).
#[pyfunction]
pub fn directions_save(
    path: &str,
    flat: PyReadonlyArray1<'_, f32>,
    n_layers: usize,
    d: usize,
    meta: &str,
) -> PyResult<()> {
    from_parts(&flat, n_layers, d, meta)?
        .save(Path::new(path))
        .py_err()
}

/// Write a llama.cpp control-vector GGUF; returns the summary as JSON.
#[pyfunction]
#[pyo3(signature = (path, flat, n_layers, d, meta, coeff = 1.0, unit = false, layers = None))]
#[allow(clippy::too_many_arguments)]
pub fn directions_export_gguf(
    path: &str,
    flat: PyReadonlyArray1<'_, f32>,
    n_layers: usize,
    d: usize,
    meta: &str,
    coeff: f32,
    unit: bool,
    layers: Option<Vec<usize>>,
) -> PyResult<String> {
    let set = from_parts(&flat, n_layers, d, meta)?;
    let opts = ExportOptions {
        coeff,
        unit,
        layers: layers.map(LayerSet::from_layers).transpose().py_err()?,
    };
    let s = export_control_vector(&set, Path::new(path), &opts).py_err()?;
    Ok(format!("{s:?}"))
}

/// The first `n` prompts of a named or file prompt set (`harmful_train`, a JSONL, a CSV, ...).
#[pyfunction]
#[pyo3(signature = (spec, n = None))]
pub fn prompt_set(spec: &str, n: Option<usize>) -> PyResult<Vec<String>> {
    let s = PromptSet::load(spec).py_err()?;
    Ok(match n {
        Some(n) => s.take(n).texts(),
        None => s.texts(),
    })
}

/// The refusal direction by Arditi et al.'s selection: difference in means of harmful and harmless
/// prompts at each candidate layer and position, scored on validation prompts (bypass, induce,
/// KL). Returns the candidate set's parts and the selection (layer, scores) as JSON.
#[pyfunction]
#[pyo3(signature = (model, harmful, harmless, harmful_val, harmless_val, positions, kl_max = 0.1, discard_last_frac = 0.2, batch_size = 16, layer_stride = 1, progress = None))]
#[allow(clippy::too_many_arguments)]
pub fn refusal<'py>(
    py: Python<'py>,
    model: &PyModel,
    harmful: Vec<String>,
    harmless: Vec<String>,
    harmful_val: Vec<String>,
    harmless_val: Vec<String>,
    positions: Vec<String>,
    kl_max: f64,
    discard_last_frac: f64,
    batch_size: usize,
    layer_stride: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<(SetParts<'py>, String)> {
    let opts = SelectOptions {
        positions: positions
            .iter()
            .map(|p| Position::parse(p))
            .collect::<persona_gate::Result<_>>()
            .py_err()?,
        discard_last_frac,
        kl_max,
        batch_size,
        layer_stride,
        fallback_layer: None,
    };
    let m = &model.inner;
    let sel = detached(py, progress, |w| {
        select_refusal_direction(
            m,
            &harmful,
            &harmless,
            &harmful_val,
            &harmless_val,
            &opts,
            |msg| {
                w.event(&persona_gate::events::Event::Note(msg.to_string()));
                w.poll_or_unwind();
            },
        )
        .py_err()
    })?;
    let json = serde_json::to_string(&sel).map_err(json_err)?;
    Ok((parts(py, sel.direction)?, json))
}

/// A persona vector (Chen et al. 2025) for a built-in trait name or a trait file: each question
/// answered under the trait's positive and negative system prompts, residuals averaged at
/// `position`, the sides contrasted per layer.
#[pyfunction]
#[pyo3(signature = (model, spec, position = "response", method = "diff-in-means", max_questions = None, max_pairs = None, max_new_tokens = 64, batch_size = 8, progress = None))]
#[allow(clippy::too_many_arguments)]
pub fn trait_direction<'py>(
    py: Python<'py>,
    model: &PyModel,
    spec: &str,
    position: &str,
    method: &str,
    max_questions: Option<usize>,
    max_pairs: Option<usize>,
    max_new_tokens: usize,
    batch_size: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<SetParts<'py>> {
    let spec = TraitSpec::load(spec).py_err()?;
    let method = match method {
        "diff-in-means" | "mean" => Method::DiffInMeans,
        "pca-paired" | "pca" => Method::PcaPaired,
        other => {
            return Err(invalid(format!(
                "unknown method '{other}' (expected diff-in-means or pca-paired)"
            )))
        }
    };
    let opts = TraitOptions {
        position: Position::parse(position).py_err()?,
        method,
        max_questions,
        max_pairs,
        capture: CaptureOptions {
            batch_size,
            max_new_tokens,
            ..Default::default()
        },
        hash_model: false,
    };
    let m = &model.inner;
    let ex = detached(py, progress, |w| {
        extract_trait(m, &spec, &opts, |phase, d, t| {
            w.progress(phase, d, t);
            w.poll_or_unwind();
        })
        .py_err()
    })?;
    parts(py, ex.set)
}

/// Seeded random directions of the model's shape (unit norm, or the norms of `like`), optionally
/// orthogonal to `orthogonal_to` at each layer: the control every steering result needs.
#[pyfunction]
#[pyo3(signature = (n_layers, d, seed, like = None, orthogonal_to = None))]
pub fn random_set<'py>(
    py: Python<'py>,
    n_layers: usize,
    d: usize,
    seed: u64,
    like: Option<(PyReadonlyArray1<'py, f32>, String)>,
    orthogonal_to: Option<(PyReadonlyArray1<'py, f32>, String)>,
) -> PyResult<SetParts<'py>> {
    let like = like
        .map(|(a, m)| from_parts(&a, n_layers, d, &m))
        .transpose()?;
    let orth = orthogonal_to
        .map(|(a, m)| from_parts(&a, n_layers, d, &m))
        .transpose()?;
    let opts = RandomOptions {
        seed,
        orthogonal_to: orth.as_ref(),
        like: like.as_ref(),
    };
    parts(py, random_directions(n_layers, d, &opts).py_err()?)
}

/// Norms and cosines of direction sets (same shape), layer by layer, as JSON; `table` is the text
/// `pgate geometry` prints.
#[pyfunction]
#[pyo3(signature = (sets, all_layers = false))]
pub fn geometry(
    sets: Vec<(PyReadonlyArray1<'_, f32>, usize, usize, String)>,
    all_layers: bool,
) -> PyResult<(String, String)> {
    let sets = sets
        .iter()
        .map(|(a, l, d, m)| from_parts(a, *l, *d, m))
        .collect::<PyResult<Vec<_>>>()?;
    let refs: Vec<&DirectionSet> = sets.iter().collect();
    let r = GeometryReport::new(&refs, all_layers).py_err()?;
    Ok((serde_json::to_string(&r).map_err(json_err)?, r.to_table()))
}
