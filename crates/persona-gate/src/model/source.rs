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

/// Largest `model.safetensors.index.json` read (real ones are well under 1 MB).
const MAX_INDEX_JSON: u64 = 64 << 20;

/// The `.safetensors` shards of a HF directory, in index order when an index exists. Shard names
/// in an index are untrusted: each must be a plain relative path that resolves, symlinks
/// followed, to a regular file inside `dir` (see [`shard_path`]).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = read_bounded(&index, MAX_INDEX_JSON)?;
        let files = index_shards(&text).map_err(|reason| Error::NotAModel {
            path: index.clone(),
            reason,
        })?;
        return files.iter().map(|f| shard_path(dir, f)).collect();
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
    files
        .iter()
        .map(|f| shard_path(dir, &f.file_name().unwrap_or_default().to_string_lossy()))
        .collect()
}

/// The distinct shard names of an index's `weight_map`, sorted; each a plain relative path.
pub fn index_shards(text: &str) -> std::result::Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("model.safetensors.index.json is not valid JSON ({e})"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("model.safetensors.index.json has no 'weight_map' object")?;
    let mut files = Vec::new();
    for f in map.values() {
        let f = f
            .as_str()
            .ok_or("a 'weight_map' value of model.safetensors.index.json is not a string")?;
        check_shard_name(f)?;
        files.push(f.to_string());
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err("model.safetensors.index.json names no shard files".into());
    }
    Ok(files)
}

/// A shard name must be a relative path of plain components (no `..`, root, drive or empty
/// name): it is joined to the model directory, or handed to the hub client as a file name.
fn check_shard_name(f: &str) -> std::result::Result<(), String> {
    use std::path::Component;
    let plain = !f.is_empty()
        && !f.contains('\\')
        && !f.contains('\0')
        && Path::new(f)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(format!(
            "shard '{}' in the index's weight_map is not a file inside the model directory",
            super::limits::quote(f, 120)
        ))
    }
}

/// `dir/name`, refused unless it resolves (symlinks followed) to a regular file inside `dir`.
pub fn shard_path(dir: &Path, name: &str) -> Result<PathBuf> {
    let escape = |why: &str| Error::NotAModel {
        path: dir.into(),
        reason: format!("shard '{}' {why}", super::limits::quote(name, 120)),
    };
    check_shard_name(name).map_err(|_| escape("is not a plain relative path"))?;
    let p = dir.join(name);
    let real = p.canonicalize().map_err(|e| Error::io(&p, e))?;
    let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !real.starts_with(&root) && !in_hub_blobs(&root, &real) {
        return Err(escape(&format!(
            "resolves to {}, outside the model directory",
            real.display()
        )));
    }
    require_regular_file(&real)?;
    Ok(p)
}

/// The Hugging Face cache keeps a snapshot's files as symlinks into the repo's blob store
/// (`models--org--name/snapshots/REV/f -> ../../blobs/SHA`): inside that store is inside the model.
fn in_hub_blobs(root: &Path, real: &Path) -> bool {
    let Some(snapshots) = root.parent() else {
        return false;
    };
    let repo = snapshots.parent();
    let is_hub = snapshots.file_name().is_some_and(|n| n == "snapshots")
        && repo
            .and_then(Path::file_name)
            .is_some_and(|n| n.to_string_lossy().starts_with("models--"));
    is_hub && repo.is_some_and(|r| real.starts_with(r.join("blobs")))
}

/// Refuse anything but a regular file (a FIFO, a device such as /dev/zero, a directory) before
/// opening it: reading one could block or never end.
pub fn require_regular_file(p: &Path) -> Result<()> {
    let m = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
    if m.is_file() {
        Ok(())
    } else {
        Err(Error::io(
            p,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ))
    }
}

/// A regular file's text, refused when larger than `max` bytes (configs and indexes are small;
/// a huge one is an attempt to exhaust memory).
pub fn read_bounded(p: &Path, max: u64) -> Result<String> {
    require_regular_file(p)?;
    let len = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
    if len > max {
        return Err(Error::io(
            p,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{len} bytes, more than the {max} this file may have"),
            ),
        ));
    }
    std::fs::read_to_string(p).map_err(|e| Error::io(p, e))
}

/// Tensor dtype counts and parameter count of one safetensors file (header only).
pub fn safetensors_summary(f: &Path) -> Result<(Vec<(String, usize)>, u64)> {
    require_regular_file(f)?;
    let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
    // SAFETY: read-only mapping of a file we just opened; only the header is parsed.
    let mm = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(f, e))?;
    let s = super::limits::check_safetensors_at(f, &mm)?;
    Ok((s.types.into_iter().collect(), s.n_params))
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
                let text = read_bounded(&index, MAX_INDEX_JSON)?;
                // Names are checked before any is requested: a crafted index must not make the
                // hub client write outside its cache.
                let shards = index_shards(&text).map_err(err)?;
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
