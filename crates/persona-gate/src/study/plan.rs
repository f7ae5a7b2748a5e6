//! A checked study file resolved into conditions, prompt sets and work items, with the hashes
//! that key stored results (see the module docs of [`crate::study`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::canon::{f32_text, hash_json, hex_u64};
use super::file::{ConditionDraft, DirRef, DirectionEntry, OpDraft, StudyFile};
use crate::directions::spec::ops_from_direction;
use crate::directions::{random_directions, DirectionSet, PlanBuilder, RandomOptions};
use crate::eval::{PromptItem, PromptSet};
use crate::intervene::{CompiledPlan, OpKind};
use crate::model::Model;
use crate::{Error, Result};

/// `prefix: message`, without nesting "invalid value:" prefixes.
fn wrap(prefix: impl std::fmt::Display, e: Error) -> Error {
    let inner = match e {
        Error::InvalidValue(m) => m,
        other => other.to_string(),
    };
    Error::InvalidValue(format!("{prefix}: {inner}"))
}

/// A prompt set of the study: its items after `skip` and `n`, and the hash of the whole set.
#[derive(Debug, Clone)]
pub struct StudyPrompts {
    pub name: String,
    pub source: String,
    /// sha256 of the whole set (before skip / n): the `prompt_set` of result keys.
    pub hash: String,
    pub skip: usize,
    pub items: Vec<PromptItem>,
}

/// A resolved condition.
#[derive(Debug, Clone)]
pub struct Condition {
    pub name: String,
    /// sha256 of [`Condition::hash_input`].
    pub hash: String,
    pub persona: Option<String>,
    pub system: Option<String>,
    pub ops: Vec<OpDraft>,
    /// Indices into [`Study::prompt_sets`].
    pub prompt_sets: Vec<usize>,
    pub vars: BTreeMap<String, String>,
    /// What the hash covers: model, system prompt, ops (directions by content), generation.
    pub hash_input: Value,
}

impl Condition {
    /// The stored description: the hash input plus names and the specs as written.
    pub fn spec_json(&self) -> Value {
        json!({
            "hashed": self.hash_input,
            "name": self.name,
            "persona": self.persona,
            "ops": self.ops.iter().map(|o| json!({"field": o.field.key(), "spec": o.text})).collect::<Vec<_>>(),
            "vars": self.vars,
        })
    }
}

/// One unit of work: a condition answering one prompt once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkItem {
    pub condition: usize,
    pub set: usize,
    /// Index into the set's items.
    pub prompt: usize,
    pub sample: usize,
    /// Sampling seed: from the study seed, the prompt and the sample index, not the condition, so
    /// every condition draws the same random numbers for a given prompt (common random numbers
    /// make paired comparisons sharper).
    pub seed: u64,
    /// sha256 of the result key, for sharding.
    pub item_hash: String,
}

/// A study ready to run: everything but the model.
#[derive(Debug, Clone)]
pub struct Study {
    pub file: StudyFile,
    pub name: String,
    pub hash: String,
    pub conditions: Vec<Condition>,
    pub prompt_sets: Vec<StudyPrompts>,
    /// Content identity of each direction (file sha256, or the recipe of a random one).
    pub direction_ids: BTreeMap<String, Value>,
    /// Index of the baseline condition.
    pub baseline: usize,
    pub canonical: Value,
}

/// sha256 of a result key `(condition hash, prompt-set hash, prompt id, sample)`.
pub fn item_hash(condition_hash: &str, set_hash: &str, prompt_id: &str, sample: usize) -> String {
    crate::hash::sha256_bytes(
        format!("{condition_hash}\u{1f}{set_hash}\u{1f}{prompt_id}\u{1f}{sample}").as_bytes(),
    )
}

/// The sampling seed of an item (fits SQLite's signed 64-bit integers).
pub fn item_seed(study_seed: u64, set_hash: &str, prompt_id: &str, sample: usize) -> u64 {
    let h = crate::hash::sha256_bytes(
        format!("seed\u{1f}{study_seed}\u{1f}{set_hash}\u{1f}{prompt_id}\u{1f}{sample}").as_bytes(),
    );
    hex_u64(&h) & (i64::MAX as u64)
}

/// Whether `item_hash` belongs to shard `index` of `count`.
pub fn in_shard(item_hash: &str, index: u64, count: u64) -> bool {
    count <= 1 || hex_u64(item_hash) % count == index
}

fn load_prompts(file: &StudyFile, name: &str) -> Result<StudyPrompts> {
    let entry = &file.prompts[name];
    let source = entry.source().to_string();
    let local = file.base_dir.join(&source);
    let spec = if Path::new(&source).is_relative() && local.exists() {
        local.to_string_lossy().to_string()
    } else {
        source.clone()
    };
    let set =
        PromptSet::load(&spec).map_err(|e| wrap(format!("prompt set '{name}' ({source})"), e))?;
    let hash = set.sha256();
    let total = set.items.len();
    let mut ids = BTreeSet::new();
    for it in &set.items {
        if !ids.insert(it.id.as_str()) {
            return Err(Error::InvalidValue(format!(
                "prompt set '{name}' ({source}) has two prompts with id '{}': ids key the results, give each prompt its own",
                it.id
            )));
        }
    }
    let skip = entry.skip();
    let mut items: Vec<PromptItem> = set.items.into_iter().skip(skip).collect();
    if let Some(n) = entry.n() {
        items.truncate(n);
    }
    if items.is_empty() {
        return Err(Error::InvalidValue(format!(
            "prompt set '{name}' ({source}) is empty: {total} prompts, skip = {skip} leaves none"
        )));
    }
    Ok(StudyPrompts {
        name: name.to_string(),
        source,
        hash,
        skip,
        items,
    })
}

fn file_identity(path: &Path, cache: &mut HashMap<PathBuf, String>) -> Result<Value> {
    if let Some(h) = cache.get(path) {
        return Ok(json!({ "sha256": h }));
    }
    if !path.exists() {
        return Err(Error::InvalidValue(format!(
            "direction file {} does not exist (make it with `pgate extract ...`)",
            path.display()
        )));
    }
    let h = crate::hash::sha256_file(path)?;
    cache.insert(path.to_path_buf(), h.clone());
    Ok(json!({ "sha256": h }))
}

fn entry_path(file: &StudyFile, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_relative() {
        file.base_dir.join(p)
    } else {
        p
    }
}

impl Study {
    /// Load prompt sets, hash direction files, hash conditions. Reads no model.
    pub fn resolve(file: StudyFile) -> Result<Study> {
        let drafts = file.conditions()?;
        let mut prompt_sets = Vec::new();
        for name in file.prompts.keys() {
            prompt_sets.push(load_prompts(&file, name)?);
        }
        let set_index: HashMap<&str, usize> = prompt_sets
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        // Direction identities: files by content, random ones by recipe.
        let mut sha_cache = HashMap::new();
        let mut direction_ids = BTreeMap::new();
        for (name, d) in &file.directions {
            if let DirectionEntry::Path(p) | DirectionEntry::File { file: p } = d {
                let id = file_identity(&entry_path(&file, p), &mut sha_cache)
                    .map_err(|e| wrap(format!("direction '{name}'"), e))?;
                direction_ids.insert(name.clone(), id);
            }
        }
        for (name, d) in &file.directions {
            if let DirectionEntry::Random {
                random,
                orthogonal_to,
                like,
            } = d
            {
                let rel = |r: &Option<String>| r.as_ref().map(|n| direction_ids[n].clone());
                let id = json!({
                    "random": random,
                    "orthogonal_to": rel(orthogonal_to),
                    "like": rel(like),
                    "generator": "gaussian-box-muller/StdRng",
                });
                direction_ids.insert(name.clone(), id);
            }
        }
        let g = &file.generation;
        // An endpoint is identified by its API root and model id (not the key, limits or prices).
        let model_id = match file.model.endpoint() {
            None => {
                let mut id = json!({ "spec": file.model.spec, "dtype": file.model.dtype.to_ascii_lowercase() });
                // Only when on, so studies written before the option keep their hashes.
                if file.model.batch_invariant {
                    id["batch_invariant"] = json!(true);
                }
                id
            }
            Some(ep) => {
                json!({ "endpoint": { "base_url": ep.normalized_base(), "model": ep.model } })
            }
        };
        let generation = json!({
            "max_new_tokens": g.max_new_tokens,
            "temperature": f32_text(g.temperature),
            "top_p": f32_text(g.top_p),
            "seed": g.seed,
        });
        let mut conditions = Vec::new();
        for d in drafts {
            let mut ops = Vec::new();
            for o in &d.ops {
                let direction = match &o.direction {
                    DirRef::Named(n) => direction_ids[n].clone(),
                    DirRef::Path(p) => file_identity(p, &mut sha_cache).map_err(|e| {
                        wrap(
                            format!("condition '{}': {} = \"{}\"", d.name, o.field.key(), o.text),
                            e,
                        )
                    })?,
                };
                let (coeff, raw, lo, hi) = match o.spec.kind {
                    OpKind::Add { coeff, raw } => (Some(f32_text(coeff)), raw, None, None),
                    OpKind::Ablate => (None, false, None, None),
                    OpKind::Cap { lo, hi } => (None, false, lo.map(f32_text), hi.map(f32_text)),
                };
                let op = match o.spec.kind {
                    OpKind::Add { .. } => "add",
                    OpKind::Ablate => "ablate",
                    OpKind::Cap { .. } => "cap",
                };
                ops.push(json!({
                    "op": op,
                    "coeff": coeff,
                    "raw": raw,
                    "lo": lo,
                    "hi": hi,
                    "direction": direction,
                    "pick": o.spec.pick,
                    "layers": String::from(o.spec.layers.clone()),
                    "positions": serde_json::to_value(o.spec.positions)?,
                }));
            }
            let hash_input = json!({
                "model": model_id,
                "system": d.system,
                "ops": ops,
                "generation": generation,
            });
            let hash = hash_json(&hash_input);
            conditions.push(condition_from(d, hash, hash_input, &set_index));
        }
        for (i, a) in conditions.iter().enumerate() {
            if let Some(b) = conditions[..i].iter().find(|b| b.hash == a.hash) {
                return Err(Error::InvalidValue(format!(
                    "conditions '{}' and '{}' are identical (same system prompt, ops and generation settings): remove one",
                    b.name, a.name
                )));
            }
        }
        check_item_count(&conditions, &prompt_sets, g.samples)?;
        let baseline = match &file.baseline {
            Some(b) => conditions.iter().position(|c| &c.name == b).unwrap_or(0),
            None => 0,
        };
        let canonical = json!({
            "version": file.version,
            "model": model_id,
            "generation": generation,
            "samples": g.samples,
            "baseline": conditions[baseline].name,
            "conditions": conditions.iter().map(|c| json!({
                "name": c.name,
                "hash": c.hash,
                "prompts": c.prompt_sets.iter().map(|&i| prompt_sets[i].name.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "prompt_sets": prompt_sets.iter().map(|s| json!({
                "name": s.name,
                "hash": s.hash,
                "skip": s.skip,
                "n": s.items.len(),
            })).collect::<Vec<_>>(),
            "judges": serde_json::to_value(&file.judges)?,
            "english": file.english,
        });
        let hash = hash_json(&canonical);
        Ok(Study {
            name: file.display_name(),
            file,
            hash,
            conditions,
            prompt_sets,
            direction_ids,
            baseline,
            canonical,
        })
    }

    /// Load, check and resolve a study file.
    pub fn load(path: &Path) -> Result<Study> {
        Study::resolve(StudyFile::load(path)?)
    }

    /// Every work item, ordered prompt-major (set, prompt, sample, then condition) so that a
    /// partial run has all conditions for its first prompts: paired comparisons work early.
    pub fn items(&self) -> Vec<WorkItem> {
        let samples = self.file.generation.samples;
        let mut out = Vec::new();
        for (si, set) in self.prompt_sets.iter().enumerate() {
            for (pi, p) in set.items.iter().enumerate() {
                for sample in 0..samples {
                    let seed = item_seed(self.file.generation.seed, &set.hash, &p.id, sample);
                    for (ci, c) in self.conditions.iter().enumerate() {
                        if !c.prompt_sets.contains(&si) {
                            continue;
                        }
                        out.push(WorkItem {
                            condition: ci,
                            set: si,
                            prompt: pi,
                            sample,
                            seed,
                            item_hash: item_hash(&c.hash, &set.hash, &p.id, sample),
                        });
                    }
                }
            }
        }
        out
    }

    /// The direction sets of the study for a model (files loaded, random ones drawn at the
    /// model's shape).
    pub fn direction_sets(&self, model: &Model) -> Result<BTreeMap<String, Arc<DirectionSet>>> {
        let cfg = model.config();
        let mut out: BTreeMap<String, Arc<DirectionSet>> = BTreeMap::new();
        for (name, d) in &self.file.directions {
            if let DirectionEntry::Path(p) | DirectionEntry::File { file: p } = d {
                let set = DirectionSet::load(&entry_path(&self.file, p))
                    .map_err(|e| wrap(format!("direction '{name}'"), e))?;
                out.insert(name.clone(), Arc::new(set));
            }
        }
        for (name, d) in &self.file.directions {
            if let DirectionEntry::Random {
                random,
                orthogonal_to,
                like,
            } = d
            {
                let get = |r: &Option<String>| r.as_ref().map(|n| out[n].clone());
                let (o, l) = (get(orthogonal_to), get(like));
                let mut set = random_directions(
                    cfg.n_layers,
                    cfg.d_model,
                    &RandomOptions {
                        seed: *random,
                        orthogonal_to: o.as_deref(),
                        like: l.as_deref(),
                    },
                )
                .map_err(|e| wrap(format!("direction '{name}'"), e))?;
                set.meta.name = name.clone();
                out.insert(name.clone(), Arc::new(set));
            }
        }
        Ok(out)
    }

    /// Compiled plans per condition for `model` (None for conditions without ops). Checks every
    /// layer and width against the model, naming the condition and spec at fault.
    pub fn compile_plans(&self, model: &Model) -> Result<Vec<Option<Arc<CompiledPlan>>>> {
        let sets = self.direction_sets(model)?;
        let mut files: HashMap<PathBuf, Arc<DirectionSet>> = HashMap::new();
        let cfg = model.config();
        let mut out = Vec::with_capacity(self.conditions.len());
        for c in &self.conditions {
            if c.ops.is_empty() {
                out.push(None);
                continue;
            }
            let mut b = PlanBuilder::new();
            for o in &c.ops {
                let ctx = |e: Error| {
                    wrap(
                        format!("condition '{}': {} = \"{}\"", c.name, o.field.key(), o.text),
                        e,
                    )
                };
                let (set, label) = match &o.direction {
                    DirRef::Named(n) => (sets[n].clone(), n.clone()),
                    DirRef::Path(p) => {
                        let s = match files.get(p) {
                            Some(s) => s.clone(),
                            None => {
                                let s = Arc::new(DirectionSet::load(p).map_err(ctx)?);
                                files.insert(p.clone(), s.clone());
                                s
                            }
                        };
                        let label = s.name().to_string();
                        (s, label)
                    }
                };
                let ops = ops_from_direction(
                    &set,
                    &label,
                    &o.spec.kind,
                    o.spec.pick,
                    &o.spec.layers,
                    o.spec.positions,
                )
                .map_err(ctx)?;
                b.ops(ops);
            }
            let plan = b
                .finish(cfg.n_layers, cfg.d_model)
                .map_err(|e| wrap(format!("condition '{}'", c.name), e))?;
            let compiled = plan
                .compile(
                    cfg.n_layers,
                    cfg.d_model,
                    model.decoder.dtype(),
                    model.decoder.device(),
                )
                .map_err(|e| wrap(format!("condition '{}'", c.name), e))?;
            out.push(Some(Arc::new(compiled)));
        }
        Ok(out)
    }

    /// The model spec to load: a relative path is read from the study file's folder when it
    /// exists there (short names, hub ids and other paths are passed on as written).
    pub fn model_spec(&self) -> String {
        let spec = &self.file.model.spec;
        let local = self.file.base_dir.join(spec);
        if Path::new(spec).is_relative() && local.exists() {
            local.to_string_lossy().to_string()
        } else {
            spec.clone()
        }
    }

    /// The endpoint the study targets (None: local weights).
    pub fn endpoint(&self) -> Option<&crate::endpoint::EndpointConfig> {
        self.file.model.endpoint()
    }

    /// Index of a condition by name.
    pub fn condition(&self, name: &str) -> Option<usize> {
        self.conditions.iter().position(|c| c.name == name)
    }
}

/// The study's work items (condition x prompt x sample), counted without listing them, must stay
/// within [`crate::model::limits::MAX_STUDY_ITEMS`]: [`Study::items`] holds them all in memory.
fn check_item_count(conds: &[Condition], sets: &[StudyPrompts], samples: usize) -> Result<()> {
    let max = crate::model::limits::MAX_STUDY_ITEMS;
    let per_sample = conds
        .iter()
        .flat_map(|c| c.prompt_sets.iter().map(|&i| sets[i].items.len()))
        .try_fold(0usize, |a, n| a.checked_add(n));
    match per_sample.and_then(|n| n.checked_mul(samples)) {
        Some(n) if n <= max => Ok(()),
        n => Err(Error::InvalidValue(format!(
            "the study has {} work items (conditions x prompts x samples), above the limit of {max}: split it into several studies",
            n.map_or("too many".to_string(), |n| n.to_string())
        ))),
    }
}

fn condition_from(
    d: ConditionDraft,
    hash: String,
    hash_input: Value,
    set_index: &HashMap<&str, usize>,
) -> Condition {
    Condition {
        prompt_sets: d.prompts.iter().map(|p| set_index[p.as_str()]).collect(),
        name: d.name,
        hash,
        persona: d.persona,
        system: d.system,
        ops: d.ops,
        vars: d.vars,
        hash_input,
    }
}
