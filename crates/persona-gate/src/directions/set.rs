//! [`DirectionSet`]: one vector per layer plus where it came from, as a value.
//!
//! Following repeng's `ControlVector`, a direction set adds, subtracts and scales like a number
//! (`0.5 * happy - sad`), and travels in an interchange format: a safetensors file whose header
//! (`__metadata__`) records the model, method, position, prompt-set hash, seed, tool version and
//! time, so any vector can be traced to the run that made it. llama.cpp's control-vector GGUF is in
//! [`super::gguf`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::util::{cosine, dot, norm, now_utc};
use crate::{Error, Result};

/// Tag written under `pgate.format` so readers know the layout below.
pub const FORMAT: &str = "pgate-direction-set/1";

/// Provenance of a direction set. Every field is written to the safetensors header as a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionMeta {
    /// Short name used in tables and messages (`refusal`, `compliant`, `random-7`).
    pub name: String,
    /// The model's name (GGUF `general.name` or directory name).
    pub model: String,
    pub model_sha256: Option<String>,
    pub architecture: String,
    pub d_model: usize,
    /// Layers of the model the set was read from (rows of the set; 1 for a single vector).
    pub n_layers: usize,
    /// How the vectors were made: `diff-in-means`, `pca-paired`, `random-gaussian`, `gguf-import`,
    /// `arithmetic`.
    pub method: String,
    /// Where in the sequence activations were read: `last`, `-2`, `post-instruction`, `response`.
    pub position: String,
    /// sha256 of the prompts (see [`super::prompt_set_sha256`]).
    pub prompt_set_sha256: Option<String>,
    /// Prompts on the positive / negative side that entered the means.
    pub n_pos: usize,
    pub n_neg: usize,
    pub seed: Option<u64>,
    pub tool_version: String,
    /// RFC 3339 UTC.
    pub created: String,
    /// Anything else worth keeping (trait name, sampling, what a control is orthogonal to, ...).
    pub extra: BTreeMap<String, String>,
}

impl DirectionMeta {
    /// Metadata for a set made now by this build, fields not known yet left empty.
    pub fn new(
        name: impl Into<String>,
        method: impl Into<String>,
        n_layers: usize,
        d: usize,
    ) -> Self {
        Self {
            name: name.into(),
            model: String::new(),
            model_sha256: None,
            architecture: String::new(),
            d_model: d,
            n_layers,
            method: method.into(),
            position: String::new(),
            prompt_set_sha256: None,
            n_pos: 0,
            n_neg: 0,
            seed: None,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            created: now_utc(),
            extra: BTreeMap::new(),
        }
    }

    /// Fill model identity from a loaded model (sha256 from the setup sidecar, or hashed when
    /// `hash` is set).
    pub fn with_model(mut self, model: &crate::model::Model, hash: bool) -> Self {
        self.model = model.info.name.clone();
        self.architecture = model.info.architecture.clone();
        self.model_sha256 = super::util::model_sha256(model, hash);
        self.extra
            .insert("model_source".into(), model.info.source.clone());
        self.extra.insert("dtype".into(), model.info.dtype.clone());
        self
    }

    fn to_header(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("pgate.format".into(), FORMAT.into());
        m.insert("name".into(), self.name.clone());
        m.insert("model".into(), self.model.clone());
        if let Some(h) = &self.model_sha256 {
            m.insert("model_sha256".into(), h.clone());
        }
        m.insert("architecture".into(), self.architecture.clone());
        m.insert("d_model".into(), self.d_model.to_string());
        m.insert("n_layers".into(), self.n_layers.to_string());
        m.insert("method".into(), self.method.clone());
        m.insert("position".into(), self.position.clone());
        if let Some(h) = &self.prompt_set_sha256 {
            m.insert("prompt_set_sha256".into(), h.clone());
        }
        m.insert("n_pos".into(), self.n_pos.to_string());
        m.insert("n_neg".into(), self.n_neg.to_string());
        if let Some(s) = self.seed {
            m.insert("seed".into(), s.to_string());
        }
        m.insert("tool_version".into(), self.tool_version.clone());
        m.insert("created".into(), self.created.clone());
        for (k, v) in &self.extra {
            m.insert(format!("extra.{k}"), v.clone());
        }
        m
    }

    /// Read back what [`DirectionMeta::to_header`] wrote; files from other tools (no header) get the
    /// file stem as name and `unknown` provenance.
    fn from_header(
        h: &HashMap<String, String>,
        stem: &str,
        n_layers: usize,
        d: usize,
    ) -> Result<Self> {
        let get = |k: &str| h.get(k).cloned();
        let num = |k: &str| -> Result<Option<u64>> {
            match h.get(k) {
                None => Ok(None),
                Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
                    Error::InvalidValue(format!(
                        "direction file metadata '{k}' = '{v}' is not an integer"
                    ))
                }),
            }
        };
        let mut extra = BTreeMap::new();
        for (k, v) in h {
            if let Some(x) = k.strip_prefix("extra.") {
                extra.insert(x.to_string(), v.clone());
            }
        }
        Ok(Self {
            name: get("name")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| stem.to_string()),
            model: get("model").unwrap_or_default(),
            model_sha256: get("model_sha256"),
            architecture: get("architecture").unwrap_or_default(),
            d_model: d,
            n_layers,
            method: get("method").unwrap_or_else(|| "unknown".into()),
            position: get("position").unwrap_or_default(),
            prompt_set_sha256: get("prompt_set_sha256"),
            n_pos: num("n_pos")?.unwrap_or(0) as usize,
            n_neg: num("n_neg")?.unwrap_or(0) as usize,
            seed: num("seed")?,
            tool_version: get("tool_version").unwrap_or_default(),
            created: get("created").unwrap_or_default(),
            extra,
        })
    }
}

/// One vector, e.g. the refusal direction at layer 12, to apply at any set of layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Direction {
    pub name: String,
    /// Layer the vector was read at, when it came from a per-layer set.
    pub layer: Option<usize>,
    pub vector: Vec<f32>,
}

impl Direction {
    pub fn norm(&self) -> f64 {
        norm(&self.vector)
    }
}

/// Per-layer vectors `[n_layers, d_model]` with their provenance.
///
/// Vectors are kept raw (e.g. the difference in means, whose norm says how far apart the two
/// prompt sets sit at that layer); [`DirectionSet::unit`] gives the unit form, which is what
/// `ablate` and `cap` use and what `add` scales by default.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectionSet {
    pub meta: DirectionMeta,
    /// Row-major `[n_layers, d_model]`.
    data: Vec<f32>,
    /// Mean activation of the positive / negative prompt set per layer (`[n_layers, d_model]`), kept
    /// by extraction so cap thresholds can be set from where each side projects.
    pub pos_mean: Option<Vec<f32>>,
    pub neg_mean: Option<Vec<f32>>,
}

impl DirectionSet {
    /// A set from per-layer rows; errors on ragged rows, no rows, zero width or non-finite values.
    pub fn from_rows(mut meta: DirectionMeta, rows: Vec<Vec<f32>>) -> Result<Self> {
        let n = rows.len();
        if n == 0 {
            return Err(Error::Empty(
                "a direction set needs at least one layer".into(),
            ));
        }
        let d = rows[0].len();
        if d == 0 {
            return Err(Error::Empty("direction vectors have width 0".into()));
        }
        if let Some((l, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != d) {
            return Err(Error::InvalidValue(format!(
                "direction layer {l} has width {}, layer 0 has width {d}",
                r.len()
            )));
        }
        let data: Vec<f32> = rows.into_iter().flatten().collect();
        meta.n_layers = n;
        meta.d_model = d;
        Self::from_flat(meta, data, n, d)
    }

    /// A set from row-major data `[n_layers, d]`.
    pub fn from_flat(
        mut meta: DirectionMeta,
        data: Vec<f32>,
        n_layers: usize,
        d: usize,
    ) -> Result<Self> {
        if n_layers == 0 || d == 0 {
            return Err(Error::Empty(
                "a direction set needs at least one layer of width > 0".into(),
            ));
        }
        if data.len() != n_layers * d {
            return Err(Error::InvalidValue(format!(
                "direction data has {} values, expected {n_layers} layers x {d}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::InvalidValue(format!(
                "direction '{}' has a NaN or infinite value at layer {}",
                meta.name,
                i / d
            )));
        }
        meta.n_layers = n_layers;
        meta.d_model = d;
        Ok(Self {
            meta,
            data,
            pos_mean: None,
            neg_mean: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn n_layers(&self) -> usize {
        self.meta.n_layers
    }

    pub fn d_model(&self) -> usize {
        self.meta.d_model
    }

    /// Row-major `[n_layers, d_model]`.
    pub fn as_flat(&self) -> &[f32] {
        &self.data
    }

    /// The vector of layer `l`.
    pub fn layer(&self, l: usize) -> Result<&[f32]> {
        if l >= self.n_layers() {
            return Err(Error::InvalidValue(format!(
                "direction '{}' has {} layers (0..={}); layer {l} is out of range",
                self.name(),
                self.n_layers(),
                self.n_layers() - 1
            )));
        }
        let d = self.d_model();
        Ok(&self.data[l * d..(l + 1) * d])
    }

    /// Layer `l` as a named single [`Direction`].
    pub fn direction(&self, l: usize) -> Result<Direction> {
        Ok(Direction {
            name: format!("{}[{l}]", self.name()),
            layer: Some(l),
            vector: self.layer(l)?.to_vec(),
        })
    }

    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks(self.d_model())
    }

    /// L2 norm of each layer's vector.
    pub fn norms(&self) -> Vec<f64> {
        self.rows().map(norm).collect()
    }

    fn check_same_shape(&self, other: &Self, what: &str) -> Result<()> {
        if self.n_layers() != other.n_layers() || self.d_model() != other.d_model() {
            return Err(Error::InvalidValue(format!(
                "cannot {what} '{}' ({} layers x {}) and '{}' ({} layers x {})",
                self.name(),
                self.n_layers(),
                self.d_model(),
                other.name(),
                other.n_layers(),
                other.d_model()
            )));
        }
        Ok(())
    }

    /// A derived set: same shape and model, method `arithmetic`, the expression kept in `extra`.
    fn derived(&self, name: String, data: Vec<f32>) -> Result<Self> {
        let mut meta = self.meta.clone();
        meta.extra.insert("expression".into(), name.clone());
        meta.name = name;
        meta.method = "arithmetic".into();
        meta.created = now_utc();
        meta.tool_version = env!("CARGO_PKG_VERSION").into();
        Self::from_flat(meta, data, self.n_layers(), self.d_model())
    }

    /// `k * self`.
    pub fn scale(&self, k: f32) -> Result<Self> {
        if !k.is_finite() {
            return Err(Error::InvalidValue(format!(
                "scale factor {k} is not finite"
            )));
        }
        self.derived(
            format!("{k}*{}", self.name()),
            self.data.iter().map(|x| x * k).collect(),
        )
    }

    /// `self + other`, layer by layer (same model shape required).
    pub fn add(&self, other: &Self) -> Result<Self> {
        self.check_same_shape(other, "add")?;
        self.derived(
            format!("({} + {})", self.name(), other.name()),
            self.data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| a + b)
                .collect(),
        )
    }

    /// `self - other`, layer by layer.
    pub fn sub(&self, other: &Self) -> Result<Self> {
        self.check_same_shape(other, "subtract")?;
        self.derived(
            format!("({} - {})", self.name(), other.name()),
            self.data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| a - b)
                .collect(),
        )
    }

    /// Each layer's vector divided by its norm; an all-zero layer stays zero (a set imported from
    /// a control vector with layers left out has such rows).
    pub fn unit(&self) -> Self {
        let d = self.d_model();
        let mut data = self.data.clone();
        for row in data.chunks_mut(d) {
            let n = norm(row);
            if n > 0.0 {
                row.iter_mut().for_each(|x| *x = (*x as f64 / n) as f32);
            }
        }
        let mut out = self.clone();
        out.data = data;
        out.meta.extra.insert("normalized".into(), "unit".into());
        out
    }

    /// Cosine between this set and `other` at every layer (`None` where either vector is zero).
    pub fn cosines(&self, other: &Self) -> Result<Vec<Option<f64>>> {
        self.check_same_shape(other, "compare")?;
        Ok(self
            .rows()
            .zip(other.rows())
            .map(|(a, b)| cosine(a, b))
            .collect())
    }

    /// Projection of `mean` rows onto this set's unit vectors, per layer: where the positive and
    /// negative prompt sets sit along the direction (useful to pick `cap` bounds).
    pub fn projections(&self, means: &[f32]) -> Vec<Option<f64>> {
        means
            .chunks(self.d_model())
            .zip(self.rows())
            .map(|(m, v)| {
                let n = norm(v);
                (n > 0.0).then(|| dot(m, v) / n)
            })
            .collect()
    }

    /// Write as safetensors: `direction` (raw, `[n_layers, d]` f32), `unit` (the unit form), and
    /// `mean_pos` / `mean_neg` when known; provenance in the header.
    pub fn save(&self, path: &Path) -> Result<()> {
        let shape = vec![self.n_layers(), self.d_model()];
        let unit = self.unit();
        let mut tensors: Vec<(String, Vec<u8>)> = vec![
            ("direction".into(), f32_bytes(&self.data)),
            ("unit".into(), f32_bytes(unit.as_flat())),
        ];
        if let Some(m) = &self.pos_mean {
            tensors.push(("mean_pos".into(), f32_bytes(m)));
        }
        if let Some(m) = &self.neg_mean {
            tensors.push(("mean_neg".into(), f32_bytes(m)));
        }
        let views = tensors
            .iter()
            .map(|(n, b)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .map(|v| (n.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidValue(format!("safetensors: {e}")))?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        safetensors::serialize_to_file(views, Some(self.meta.to_header()), path).map_err(
            |e| match e {
                safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
                other => Error::InvalidValue(format!("{}: {other}", path.display())),
            },
        )
    }

    /// Read a direction file. Besides pgate's own files this accepts any safetensors file with a
    /// `direction` tensor (`[layers, d]` or `[d]`, f32/f16/bf16/f64), e.g. the fixtures'
    /// `reference.safetensors`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::InvalidValue(format!("{}: {reason}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let view = st.tensor("direction").map_err(|_| {
            bad(format!(
                "no 'direction' tensor (tensors: {})",
                st.names()
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let (n_layers, d) = match view.shape() {
            [d] => (1, *d),
            [n, d] => (*n, *d),
            s => {
                return Err(bad(format!(
                    "'direction' has shape {s:?}; expected [layers, d] or [d]"
                )))
            }
        };
        let data = view_to_f32(&view).map_err(bad)?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "direction".into());
        let empty = HashMap::new();
        let meta = DirectionMeta::from_header(
            header.metadata().as_ref().unwrap_or(&empty),
            &stem,
            n_layers,
            d,
        )?;
        let mut set = Self::from_flat(meta, data, n_layers, d).map_err(|e| bad(e.to_string()))?;
        for (name, slot) in [
            ("mean_pos", &mut set.pos_mean),
            ("mean_neg", &mut set.neg_mean),
        ] {
            if let Ok(v) = st.tensor(name) {
                if v.shape() == [n_layers, d] {
                    *slot = Some(view_to_f32(&v).map_err(bad)?);
                }
            }
        }
        Ok(set)
    }
}

impl std::ops::Neg for &DirectionSet {
    type Output = DirectionSet;
    fn neg(self) -> DirectionSet {
        let mut out = self.clone();
        out.data.iter_mut().for_each(|x| *x = -*x);
        out.meta.name = format!("-{}", self.name());
        out.meta.method = "arithmetic".into();
        out.meta
            .extra
            .insert("expression".into(), out.meta.name.clone());
        std::mem::swap(&mut out.pos_mean, &mut out.neg_mean);
        out
    }
}

/// `&a + &b`: shapes must agree, so the result is a `Result`.
impl std::ops::Add for &DirectionSet {
    type Output = Result<DirectionSet>;
    fn add(self, rhs: &DirectionSet) -> Result<DirectionSet> {
        DirectionSet::add(self, rhs)
    }
}

impl std::ops::Sub for &DirectionSet {
    type Output = Result<DirectionSet>;
    fn sub(self, rhs: &DirectionSet) -> Result<DirectionSet> {
        DirectionSet::sub(self, rhs)
    }
}

/// `0.5 * &happy`, as repeng writes it.
impl std::ops::Mul<&DirectionSet> for f32 {
    type Output = Result<DirectionSet>;
    fn mul(self, rhs: &DirectionSet) -> Result<DirectionSet> {
        rhs.scale(self)
    }
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn view_to_f32(v: &safetensors::tensor::TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let b = v.data();
    use safetensors::Dtype;
    Ok(match v.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "'direction' has dtype {other:?}; expected a float type"
            ))
        }
    })
}
