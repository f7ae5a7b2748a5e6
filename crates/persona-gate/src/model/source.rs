//! Resolving what the user typed into model files: a GGUF path, a HF directory, a short name of a
//! model fetched by `scripts/setup-models.sh`, or a hub repo id (downloaded once, then the same path
//! as a local directory).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

/// Directory where persona-gate caches models and data sets (`$PGATE_CACHE`, else
/// `~/.cache/persona-gate`).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("persona-gate")
}

/// Short names of the models `scripts/setup-models.sh` fetches.
pub const SHORT_NAMES: &[(&str, &str)] = &[
    ("smollm2", "SmolLM2-135M-Instruct"),
    ("q05", "Qwen2.5-Coder-0.5B-Instruct"),
    ("q15", "Qwen2.5-Coder-1.5B-Instruct"),
    ("gemma3", "Gemma-3-270M"),
];

impl ModelSource {
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec.trim().is_empty() {
            return Err(Error::InvalidValue("empty model name".into()));
        }
        let p = Path::new(spec);
        if p.exists() {
            return Self::from_path(p);
        }
        if let Some((short, _)) = SHORT_NAMES.iter().find(|(s, _)| *s == spec) {
            let f = cache_dir().join("models").join(format!("{short}.gguf"));
            if f.exists() {
                return Ok(ModelSource::Gguf(f));
            }
            return Err(Error::InvalidValue(format!(
                "model '{spec}' is not fetched yet: run scripts/setup-models.sh {spec}"
            )));
        }
        let looks_like_repo =
            spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
        if looks_like_repo {
            return hub::fetch(spec).map(ModelSource::HfDir);
        }
        Err(Error::io(
            p,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ))
    }

    pub fn from_path(p: &Path) -> Result<Self> {
        if p.is_dir() {
            if p.join("config.json").exists() {
                return Ok(ModelSource::HfDir(p.to_path_buf()));
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "gguf"))
                .collect();
            if ggufs.len() == 1 {
                return Ok(ModelSource::Gguf(ggufs[0].clone()));
            }
            return Err(Error::NotAModel {
                path: p.into(),
                reason: "directory has no config.json and not exactly one .gguf file".into(),
            });
        }
        Ok(ModelSource::Gguf(p.to_path_buf()))
    }

    pub fn describe(&self) -> String {
        match self {
            ModelSource::Gguf(p) => format!("gguf:{}", p.display()),
            ModelSource::HfDir(p) => format!("hf-dir:{}", p.display()),
        }
    }
}

/// The `.safetensors` shards of a HF directory, in index order when an index exists.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let mut files: Vec<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::NotAModel {
            path: dir.into(),
            reason: "no .safetensors files".into(),
        });
    }
    Ok(files)
}

/// Tensor dtype counts and parameter count of one safetensors file (header only).
pub fn safetensors_summary(f: &Path) -> Result<(Vec<(String, usize)>, u64)> {
    let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
    // SAFETY: read-only mapping of a file we just opened; only the header is parsed.
    let mm = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(f, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&mm).map_err(|e| Error::CorruptModel {
            path: f.into(),
            reason: e.to_string(),
        })?;
    let mut counts = std::collections::BTreeMap::new();
    let mut n = 0u64;
    for (_, info) in meta.tensors() {
        *counts.entry(format!("{:?}", info.dtype)).or_insert(0usize) += 1;
        n += info.shape.iter().product::<usize>() as u64;
    }
    Ok((counts.into_iter().collect(), n))
}

/// Hugging Face hub access. Cached files are used offline; downloads go to the standard HF cache.
pub mod hub {
    use super::*;

    const FILES: &[&str] = &[
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model.safetensors",
    ];

    /// Make `repo` available as a local directory and return it.
    pub fn fetch(repo: &str) -> Result<PathBuf> {
        let err = |reason: String| Error::Hub {
            repo: repo.into(),
            reason,
        };
        let cache = hf_hub::Cache::from_env();
        let cached = cache.model(repo.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1");
        // Everything already cached: no network needed.
        if let (Some(cfg), Some(_)) = (cached.get("config.json"), cached.get("tokenizer.json")) {
            let dir = cfg.parent().map(Path::to_path_buf).unwrap_or_default();
            if safetensors_files(&dir).is_ok() {
                return Ok(dir);
            }
        }
        if offline {
            return Err(err(
                "HF_HUB_OFFLINE=1 and the model is not in the local hub cache".into(),
            ));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
            .with_progress(true)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let r = api.model(repo.to_string());
        let cfg = r
            .get("config.json")
            .map_err(|e| err(format!("config.json: {e}")))?;
        for f in &FILES[1..4] {
            // tokenizer_config / generation_config are optional on some repos.
            let got = r.get(f);
            if *f == "tokenizer.json" {
                got.map_err(|e| err(format!("tokenizer.json: {e}")))?;
            }
        }
        match r.get("model.safetensors.index.json") {
            Ok(index) => {
                let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let mut shards: Vec<String> = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.values()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                for s in shards {
                    r.get(&s).map_err(|e| err(format!("{s}: {e}")))?;
                }
            }
            Err(_) => {
                r.get("model.safetensors")
                    .map_err(|e| err(format!("model.safetensors: {e}")))?;
            }
        }
        Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default())
    }
}
