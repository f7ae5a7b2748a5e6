//! llama.cpp control vectors (the GGUF files repeng exports and `llama-cli --control-vector` reads).
//!
//! Format: GGUF with `general.architecture = "controlvector"`, `controlvector.model_hint` (the
//! model's architecture) and `controlvector.layer_count` (how many direction tensors), and one 1-D
//! f32 tensor `direction.N` per steered layer.
//!
//! Layer convention, from llama.cpp's source: `common_control_vector_load` stores `direction.N` at
//! offset `(N - 1) * n_embd` of one buffer (N = 0 is rejected), `llama_adapter_cvec::apply` gives
//! layer tensor `il` the data at offset `(il - 1) * n_embd` (for `il` in `1..n_layer`; layer 0 never
//! has one), and each model graph calls `build_cvec(cur, il)` (`cur + tensors[il]`) on the output of
//! block `il`. So `direction.N` is added, at every position, to the output of block N (0-based):
//! exactly pgate's `resid[N]`, and `direction.N` <-> layer N here with no shift. The output of
//! block 0 cannot be steered by llama.cpp; exporting skips that layer and says so.
//!
//! Applying a control vector with strength `s` therefore equals the pgate plan `add` with
//! `raw: true`, `coeff: s`, at layers `1..n_layers`, positions `all`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::set::{DirectionMeta, DirectionSet};
use crate::intervene::LayerSet;
use crate::{Error, Result};

/// What to write.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Multiply every vector by this (llama.cpp's strength can scale further at load time).
    pub coeff: f32,
    /// Write unit vectors (times `coeff`) instead of the raw ones.
    pub unit: bool,
    /// Only these layers (all that llama.cpp can steer when `None`).
    pub layers: Option<LayerSet>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            coeff: 1.0,
            unit: false,
            layers: None,
        }
    }
}

/// The flags of `pgate directions export-gguf`: the direction file, the control vector file, and
/// [`ExportOptions`] (layers as text, parsed by [`ExportFlags::options`]).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ExportFlags {
    pub input: PathBuf,
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
    /// Multiply the vectors by this.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub coeff: f32,
    /// Export unit vectors (times --coeff) instead of the raw ones.
    #[cfg_attr(feature = "cli", arg(long))]
    pub unit: bool,
    /// Only these layers (e.g. 10-16); llama.cpp never steers layer 0.
    #[cfg_attr(feature = "cli", arg(long))]
    pub layers: Option<String>,
}

impl ExportFlags {
    pub fn options(&self) -> Result<ExportOptions> {
        Ok(ExportOptions {
            coeff: self.coeff,
            unit: self.unit,
            layers: self.layers.as_deref().map(LayerSet::parse).transpose()?,
        })
    }
}

/// `pgate directions import-gguf`: a control vector read into a direction file.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ImportFlags {
    pub input: PathBuf,
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
    /// Number of model layers (default: from the file, else the highest direction.N + 1).
    #[cfg_attr(feature = "cli", arg(long))]
    pub n_layers: Option<usize>,
}

impl ImportFlags {
    /// Read the control vector, save it as a direction file, and say what was written.
    pub fn run(&self) -> Result<String> {
        let set = import_control_vector(&self.input, self.n_layers)?;
        set.save(&self.out)?;
        Ok(import_summary(&set, &self.out))
    }
}

/// What [`import_control_vector`] read, in one line, once saved to `out`.
pub fn import_summary(set: &DirectionSet, out: &Path) -> String {
    let present = set.meta.extra.get("layers_present");
    format!(
        "wrote {}: '{}', {} layers x {} (layers present: {})",
        out.display(),
        set.name(),
        set.n_layers(),
        set.d_model(),
        present.map(String::as_str).unwrap_or("?")
    )
}

/// What [`export_control_vector`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub layers: Vec<usize>,
    /// Layer 0 had a nonzero vector that llama.cpp cannot apply, so it was left out.
    pub skipped_layer0: bool,
    /// Layers left out because their vector is zero.
    pub skipped_zero: Vec<usize>,
}

/// Write `set` as a llama.cpp control vector. pgate's provenance goes along under `pgate.*` keys
/// (llama.cpp ignores them; [`import_control_vector`] reads them back).
pub fn export_control_vector(
    set: &DirectionSet,
    path: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary> {
    if !opts.coeff.is_finite() {
        return Err(Error::InvalidValue(format!(
            "coefficient {} is not finite",
            opts.coeff
        )));
    }
    let n = set.n_layers();
    if let Some(ls) = &opts.layers {
        if let Some(&l) = ls.0.iter().find(|&&l| l >= n) {
            return Err(Error::LayerOutOfRange {
                layer: l,
                n_layers: n,
            });
        }
    }
    let src = if opts.unit { set.unit() } else { set.clone() };
    let mut layers = Vec::new();
    let mut skipped_layer0 = false;
    let mut skipped_zero = Vec::new();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for l in 0..n {
        if opts.layers.as_ref().is_some_and(|ls| !ls.contains(l)) {
            continue;
        }
        let v = src.layer(l)?;
        let zero = v.iter().all(|x| *x == 0.0);
        if l == 0 {
            skipped_layer0 = !zero;
            continue;
        }
        if zero {
            skipped_zero.push(l);
            continue;
        }
        let scaled: Vec<f32> = v.iter().map(|x| x * opts.coeff).collect();
        let t = Tensor::from_vec(scaled, v.len(), &Device::Cpu)?;
        tensors.push((
            format!("direction.{l}"),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
        layers.push(l);
    }
    if tensors.is_empty() {
        return Err(Error::Empty(
            "no layer to export (llama.cpp cannot steer layer 0; the others are zero or not selected)".into(),
        ));
    }
    let hint = if set.meta.architecture.is_empty() {
        "unknown".to_string()
    } else {
        set.meta.architecture.clone()
    };
    let mut md: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String("controlvector".into()),
        ),
        ("controlvector.model_hint".into(), Value::String(hint)),
        (
            "controlvector.layer_count".into(),
            Value::U32(tensors.len() as u32),
        ),
        ("pgate.coeff".into(), Value::F32(opts.coeff)),
        ("pgate.unit".into(), Value::Bool(opts.unit)),
        ("pgate.n_layers".into(), Value::U32(n as u32)),
    ];
    let mut header = BTreeMap::new();
    header.insert("name", set.meta.name.clone());
    header.insert("model", set.meta.model.clone());
    header.insert("method", set.meta.method.clone());
    header.insert("position", set.meta.position.clone());
    header.insert("tool_version", set.meta.tool_version.clone());
    header.insert("created", set.meta.created.clone());
    if let Some(h) = &set.meta.model_sha256 {
        header.insert("model_sha256", h.clone());
    }
    if let Some(h) = &set.meta.prompt_set_sha256 {
        header.insert("prompt_set_sha256", h.clone());
    }
    if let Some(s) = set.meta.seed {
        header.insert("seed", s.to_string());
    }
    for (k, v) in header {
        md.push((format!("pgate.{k}"), Value::String(v)));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    use std::io::Write;
    f.flush().map_err(|e| Error::io(path, e))?;
    Ok(ExportSummary {
        layers,
        skipped_layer0,
        skipped_zero,
    })
}

/// Read a llama.cpp control vector into a [`DirectionSet`] of `n_layers` rows (the model's layer
/// count; by default the file's `pgate.n_layers`, else the highest `direction.N` + 1). Layers the
/// file does not steer are zero rows. Directions given twice for one layer add up, as llama.cpp
/// does. The vectors are kept as stored (including any coefficient baked in at export).
pub fn import_control_vector(path: &Path, n_layers: Option<usize>) -> Result<DirectionSet> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::InvalidValue(format!("{}: {m}", path.display()));
    let content =
        gguf_file::Content::read(&mut f).map_err(|e| bad(format!("not a GGUF file ({e})")))?;
    let md = &content.metadata;
    let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    if let Some(a) = s("general.architecture") {
        if a != "controlvector" {
            return Err(bad(format!(
                "general.architecture is '{a}', not 'controlvector' (a model file, not a control vector?)"
            )));
        }
    }
    let mut by_layer: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut d = None;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let idx = name
            .strip_prefix("direction.")
            .and_then(|x| x.parse::<usize>().ok())
            .ok_or_else(|| bad(format!("tensor '{name}' is not named direction.<layer>")))?;
        if idx == 0 {
            return Err(bad(
                "direction.0 is invalid (llama.cpp layers start at 1)".into()
            ));
        }
        let q = content.tensor(&mut f, name, &Device::Cpu)?;
        if q.shape().rank() != 1 {
            return Err(bad(format!(
                "{name} has shape {:?}; control vectors are 1-D",
                q.shape().dims()
            )));
        }
        let v = q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
        match d {
            None => d = Some(v.len()),
            Some(w) if w != v.len() => {
                return Err(bad(format!(
                    "{name} has width {}, other directions {w}",
                    v.len()
                )))
            }
            _ => {}
        }
        let slot = by_layer.entry(idx).or_insert_with(|| vec![0.0; v.len()]);
        slot.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
    }
    let d = d.ok_or_else(|| bad("no direction tensors".into()))?;
    let max = *by_layer.keys().last().unwrap_or(&0);
    let file_layers = md
        .get("pgate.n_layers")
        .and_then(crate::model::meta::value_as_u64)
        .map(|x| x as usize);
    let n = n_layers.or(file_layers).unwrap_or(max + 1);
    if max >= n {
        return Err(bad(format!(
            "direction.{max} does not fit a model of {n} layers (0..={})",
            n.saturating_sub(1)
        )));
    }
    let mut data = vec![0f32; n * d];
    for (l, v) in &by_layer {
        data[l * d..(l + 1) * d].copy_from_slice(v);
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "control-vector".into());
    let mut meta = DirectionMeta::new(s("pgate.name").unwrap_or(stem), "gguf-import", n, d);
    meta.model = s("pgate.model").unwrap_or_default();
    meta.model_sha256 = s("pgate.model_sha256");
    meta.architecture = s("controlvector.model_hint").unwrap_or_default();
    meta.position = s("pgate.position").unwrap_or_default();
    meta.prompt_set_sha256 = s("pgate.prompt_set_sha256");
    meta.seed = s("pgate.seed").and_then(|x| x.parse().ok());
    if let Some(m) = s("pgate.method") {
        meta.extra.insert("exported_method".into(), m);
    }
    if let Some(c) = md.get("pgate.coeff").and_then(|v| v.to_f32().ok()) {
        meta.extra.insert("exported_coeff".into(), c.to_string());
    }
    meta.extra.insert(
        "layers_present".into(),
        by_layer
            .keys()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    meta.extra
        .insert("imported_from".into(), path.display().to_string());
    DirectionSet::from_flat(meta, data, n, d)
}
