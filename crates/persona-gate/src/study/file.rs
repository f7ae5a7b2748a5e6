//! The study file (TOML, `version = 1`).
//!
//! ```toml
//! version = 1
//! name = "demo"
//! baseline = "baseline"            # paired comparisons are against this condition (default: the first)
//!
//! [model]
//! spec = "smollm2"                 # anything `Model::load` takes
//! dtype = "q"
//! # or, instead of spec/dtype, a served model (black-box conditions only, see crate::endpoint):
//! # endpoint = { base_url = "http://127.0.0.1:8000/v1", model = "Qwen/Qwen2.5-7B-Instruct", api_key_env = "VLLM_API_KEY" }
//!
//! [directions]                     # name -> direction (relative paths: from this file's folder)
//! compliant = "directions/compliant.safetensors"
//! control = { random = 7 }         # seeded Gaussian direction sized from the model (unit norm)
//! control_ortho = { random = 8, orthogonal_to = "compliant", like = "compliant" }
//!
//! [prompts]                        # name -> set (a file, or a name: demo_harmful, strongreject, ...)
//! harmful = "demo_harmful"
//! harmless = { source = "demo_harmless", n = 8, skip = 0 }
//!
//! [generation]
//! max_new_tokens = 128           # default 128: long enough to label (docs/labels.md)
//! batch_size = 8
//! temperature = 0.0                # 0 = greedy
//! top_p = 1.0
//! seed = 0                         # per-item seeds derive from this, the prompt and the sample index
//! samples = 1                      # samples per prompt (needs temperature > 0 when > 1)
//!
//! [personas]                       # your own persona modes, next to the built-in ones
//! pirate = "You are a pirate captain..."
//!
//! [[condition]]
//! name = "baseline"
//!
//! [[condition]]
//! name = "friendly"
//! persona = "friendly"             # a built-in or [personas] mode; or system = "..." verbatim
//!
//! [[condition]]
//! name = "steer"
//! add = ["compliant:8@12"]         # DirectionSpec syntax, the file part may be a direction name
//! prompts = ["harmful"]            # only these sets (default: all)
//!
//! [[sweep]]                        # expands into one condition per combination of its variables
//! base = "steer"                   # start from this condition's system prompt, ops and prompt sets
//! name = "readd-L{layer}-c{coeff}" # template; without placeholders "[coeff=4,layer=2]" is appended
//! add = "refusal:{coeff}@{layer}"  # appended after the base's ops
//! coeff = [4, 8]                   # a variable: a list ...
//! layer = { range = [0, 27], step = 9 }         # ... a range (inclusive): 0, 9, 18, 27 ...
//! # window = { windows = [0, 27], width = 3, step = 3 }  # ... or layer windows: "0-2", "3-5", ...
//!
//! [[judge]]                        # see eval::judge::JudgeConfig
//! kind = "rules"
//! ```
//!
//! **Op order.** Within a condition the ops apply in this order: `add`, `add_raw`, `ablate`, `cap`,
//! each list in the order written, and a sweep's ops come after its base's. Steering first and
//! projection second means `add = ["compliant:8@20"], ablate = ["compliant@20"]` removes what was
//! added, which is what "projecting the persona out" should mean at a shared layer.
//!
//! **Placeholders.** `{var}` in a sweep's `name`, `persona`, `system`, `add`, `add_raw`, `ablate`
//! and `cap` is replaced by the variable's value (numbers as written: `8`, `0.5`). A placeholder
//! that is not a variable and a variable used nowhere are errors (they are nearly always typos);
//! `{{` and `}}` write literal braces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::personas::{builtin_names, builtin_persona};
use crate::directions::DirectionSpec;
use crate::endpoint::EndpointConfig;
use crate::eval::judge::JudgeConfig;
use crate::{Error, Result};

/// The parsed study file. [`StudyFile::load`] also checks it; see the module docs for the format.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyFile {
    pub version: u32,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub model: ModelSection,
    #[serde(default)]
    pub baseline: Option<String>,
    #[serde(default)]
    pub directions: BTreeMap<String, DirectionEntry>,
    #[serde(default)]
    pub prompts: BTreeMap<String, PromptEntry>,
    #[serde(default)]
    pub generation: GenerationSection,
    #[serde(default)]
    pub personas: BTreeMap<String, String>,
    #[serde(default, rename = "condition")]
    pub conditions: Vec<ConditionSection>,
    #[serde(default, rename = "sweep")]
    pub sweeps: Vec<SweepSection>,
    #[serde(default, rename = "judge")]
    pub judges: Vec<JudgeConfig>,
    #[serde(default)]
    pub stats: StatsSection,
    /// Treat prompts as English for the wrong-language rule of the labels (default true).
    #[serde(default = "yes")]
    pub english: bool,
    /// The folder relative paths are read from (the study file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file's text, stored with the results.
    #[serde(skip)]
    pub source_text: String,
}

fn yes() -> bool {
    true
}

/// `[model]`: local weights (`spec`, `dtype`) or an OpenAI-compatible endpoint
/// (`endpoint = { base_url, model, api_key_env, ... }`, see [`EndpointConfig`]), not both.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A model `Model::load` takes (empty for an endpoint study).
    #[serde(default)]
    pub spec: String,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// The study's target is a served model, reached over HTTP: black-box conditions only.
    #[serde(default)]
    pub endpoint: Option<EndpointConfig>,
    /// Run the local model in batch-invariant mode (`Decoder::set_batch_invariant`): outputs no
    /// longer depend on `batch_size`, and match `pgate serve --batch-invariant` exactly.
    #[serde(default)]
    pub batch_invariant: bool,
}

impl ModelSection {
    /// The endpoint, when the study targets one.
    pub fn endpoint(&self) -> Option<&EndpointConfig> {
        self.endpoint.as_ref()
    }
}

fn default_dtype() -> String {
    "q".into()
}

/// A direction: a file, or a generated random control.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DirectionEntry {
    Path(String),
    File {
        file: String,
    },
    Random {
        /// Seed of the Gaussian generator (see `directions::random`).
        random: u64,
        /// Make each layer orthogonal to this study direction.
        #[serde(default)]
        orthogonal_to: Option<String>,
        /// Scale each layer to this study direction's norm.
        #[serde(default)]
        like: Option<String>,
    },
}

/// A prompt set: a path or name, optionally a slice.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptEntry {
    Source(String),
    Table {
        source: String,
        /// Use N prompts (after `skip`).
        #[serde(default)]
        n: Option<usize>,
        /// Skip the first K prompts (e.g. those used for extraction).
        #[serde(default)]
        skip: usize,
    },
}

impl PromptEntry {
    pub fn source(&self) -> &str {
        match self {
            PromptEntry::Source(s) | PromptEntry::Table { source: s, .. } => s,
        }
    }
    pub fn n(&self) -> Option<usize> {
        match self {
            PromptEntry::Source(_) => None,
            PromptEntry::Table { n, .. } => *n,
        }
    }
    pub fn skip(&self) -> usize {
        match self {
            PromptEntry::Source(_) => 0,
            PromptEntry::Table { skip, .. } => *skip,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one_f32")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "one_usize")]
    pub samples: usize,
}

/// 128 tokens: on the development set, labels of answers cut at 128 tokens differ from the careful
/// label of the full (256-token) answer on 5.5% of rows, against 13% at 64 and 21% at 24
/// (`examples/results/labels.md`); longer costs twice the decode for a 0.5-point gain.
fn default_max_new() -> usize {
    128
}
fn default_batch() -> usize {
    8
}
fn one_f32() -> f32 {
    1.0
}
fn one_usize() -> usize {
    1
}

impl Default for GenerationSection {
    fn default() -> Self {
        Self {
            max_new_tokens: default_max_new(),
            batch_size: default_batch(),
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            samples: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsSection {
    /// Paired-bootstrap resamples.
    #[serde(default = "default_boot")]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[serde(default)]
    pub seed: u64,
}

fn default_boot() -> usize {
    2000
}

impl Default for StatsSection {
    fn default() -> Self {
        Self {
            bootstrap: default_boot(),
            seed: 0,
        }
    }
}

/// A string or a list of strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<String> {
        match self {
            OneOrMany::None => vec![],
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSection {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub persona: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub add: OneOrMany,
    #[serde(default)]
    pub add_raw: OneOrMany,
    #[serde(default)]
    pub ablate: OneOrMany,
    #[serde(default)]
    pub cap: OneOrMany,
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
}

/// A sweep: the fields of a condition (templated) plus variables (any other key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepSection {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub persona: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub add: OneOrMany,
    #[serde(default)]
    pub add_raw: OneOrMany,
    #[serde(default)]
    pub ablate: OneOrMany,
    #[serde(default)]
    pub cap: OneOrMany,
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    #[serde(flatten)]
    pub vars: BTreeMap<String, toml::Value>,
}

/// Kinds of op spec, in application order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpField {
    Add,
    AddRaw,
    Ablate,
    Cap,
}

impl OpField {
    pub fn key(self) -> &'static str {
        match self {
            OpField::Add => "add",
            OpField::AddRaw => "add_raw",
            OpField::Ablate => "ablate",
            OpField::Cap => "cap",
        }
    }

    pub fn parse_spec(self, s: &str) -> Result<DirectionSpec> {
        match self {
            OpField::Add => DirectionSpec::parse_add(s),
            OpField::AddRaw => DirectionSpec::parse_add_raw(s),
            OpField::Ablate => DirectionSpec::parse_ablate(s),
            OpField::Cap => DirectionSpec::parse_cap(s),
        }
    }
}

/// Where an op's direction comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirRef {
    /// A name from the study's `[directions]`.
    Named(String),
    /// A file path (relative paths already joined to the study folder).
    Path(PathBuf),
}

/// One op of a condition: the spec as written, parsed, and its direction reference.
#[derive(Debug, Clone)]
pub struct OpDraft {
    pub field: OpField,
    pub text: String,
    pub spec: DirectionSpec,
    pub direction: DirRef,
}

/// A condition after sweep expansion and checks (no files read yet).
#[derive(Debug, Clone)]
pub struct ConditionDraft {
    pub name: String,
    pub persona: Option<String>,
    /// The system prompt text (the persona's, or given verbatim).
    pub system: Option<String>,
    pub ops: Vec<OpDraft>,
    /// Names of the prompt sets it runs on.
    pub prompts: Vec<String>,
    /// Sweep variables that made it, for tables and exports.
    pub vars: BTreeMap<String, String>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidValue(msg)
}

impl StudyFile {
    /// Read, parse and check a study file.
    pub fn load(path: &Path) -> Result<Self> {
        // Study files are a few kB; a huge one is refused before it is read.
        let text = crate::model::source::read_bounded(path, 16 << 20)?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &base).map_err(|e| match e {
            Error::InvalidValue(m) => invalid(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parse and check study text; relative paths are read from `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        let mut f: StudyFile = toml::from_str(text).map_err(|e| {
            invalid(format!(
                "not a valid study file: {}",
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        })?;
        f.base_dir = base_dir.to_path_buf();
        f.source_text = text.to_string();
        f.check().map_err(crate::model::limits::one_line_error)?;
        Ok(f)
    }

    /// The study's name (the file's `name`, else "study").
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| "study".into())
    }

    fn check(&self) -> Result<()> {
        if self.version != 1 {
            return Err(invalid(format!(
                "version {} is not supported (this pgate reads version = 1)",
                self.version
            )));
        }
        match &self.model.endpoint {
            None => {
                if self.model.spec.trim().is_empty() {
                    return Err(invalid(
                        "[model] needs spec (local weights) or endpoint = { base_url, model } (a served model)"
                            .into(),
                    ));
                }
                crate::model::DTypeMode::parse(&self.model.dtype)?;
            }
            Some(ep) => {
                if !self.model.spec.trim().is_empty() {
                    return Err(invalid(format!(
                        "[model] has both spec = \"{}\" and endpoint: a study has one target; write one study file per target (they can share a results database, see the README)",
                        self.model.spec
                    )));
                }
                ep.check()?;
                self.check_black_box()?;
            }
        }
        if self.prompts.is_empty() {
            return Err(invalid(
                "no prompt sets: add [prompts] name = \"demo_harmful\" (a file or a known name)"
                    .into(),
            ));
        }
        for (name, p) in &self.prompts {
            check_name("prompt set", name)?;
            if p.source().trim().is_empty() {
                return Err(invalid(format!("prompt set '{name}' has an empty source")));
            }
            if p.n() == Some(0) {
                return Err(invalid(format!(
                    "prompt set '{name}' is empty: n = 0 selects no prompts"
                )));
            }
        }
        for (name, d) in &self.directions {
            check_name("direction", name)?;
            if let DirectionEntry::Random {
                orthogonal_to,
                like,
                ..
            } = d
            {
                for r in [orthogonal_to, like].into_iter().flatten() {
                    match self.directions.get(r) {
                        None => {
                            return Err(invalid(format!(
                                "direction '{name}': '{r}' is not a direction of this study ({})",
                                self.direction_names()
                            )))
                        }
                        Some(DirectionEntry::Random { .. }) => {
                            return Err(invalid(format!(
                                "direction '{name}': '{r}' must be a file direction, not another random one"
                            )))
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        for (name, text) in &self.personas {
            check_name("persona", name)?;
            if text.trim().is_empty() {
                return Err(invalid(format!("persona '{name}' has an empty prompt")));
            }
        }
        let g = &self.generation;
        if g.max_new_tokens == 0 {
            return Err(invalid(
                "generation.max_new_tokens must be at least 1".into(),
            ));
        }
        if g.batch_size == 0 {
            return Err(invalid("generation.batch_size must be at least 1".into()));
        }
        if g.samples == 0 {
            return Err(invalid("generation.samples must be at least 1".into()));
        }
        check_limits(g, &self.stats)?;
        crate::generate::Sampling {
            temperature: g.temperature,
            top_p: g.top_p,
            seed: g.seed,
        }
        .validate()
        .map_err(|e| invalid(format!("generation: {e}")))?;
        if g.samples > 1 && g.temperature <= 0.0 {
            return Err(invalid(format!(
                "generation.samples = {} with greedy decoding (temperature = 0) would repeat the same answer: set temperature > 0 or samples = 1",
                g.samples
            )));
        }
        if self.stats.bootstrap == 0 {
            return Err(invalid("stats.bootstrap must be at least 1".into()));
        }
        let mut judge_names = BTreeSet::new();
        for j in &self.judges {
            j.check()?;
            if !judge_names.insert(j.display_name()) {
                return Err(invalid(format!(
                    "two judges are named '{}': give each a distinct name",
                    j.display_name()
                )));
            }
            for p in &j.prompts {
                if !self.prompts.contains_key(p) {
                    return Err(invalid(format!(
                        "judge '{}': prompt set '{p}' is not in [prompts] ({})",
                        j.display_name(),
                        self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
        let conds = self.conditions()?;
        if let Some(b) = &self.baseline {
            if !conds.iter().any(|c| &c.name == b) {
                return Err(invalid(format!(
                    "baseline '{b}' is not a condition ({})",
                    conds
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    }

    /// An endpoint study runs black-box conditions only: system prompts (persona modes) under the
    /// study's sampling settings. Steering reads and writes the residual stream, which a server
    /// does not expose.
    fn check_black_box(&self) -> Result<()> {
        let steering =
            |add: &OneOrMany, add_raw: &OneOrMany, ablate: &OneOrMany, cap: &OneOrMany| {
                [
                    ("add", add),
                    ("add_raw", add_raw),
                    ("ablate", ablate),
                    ("cap", cap),
                ]
                .into_iter()
                .find_map(|(k, v)| v.items().first().map(|t| format!("{k} = \"{t}\"")))
            };
        if self.model.batch_invariant {
            return Err(invalid(
                "[model] batch_invariant applies to local models: for an endpoint it is the server's setting (`pgate serve --batch-invariant`)"
                    .to_string(),
            ));
        }
        let why = "steering needs the model's weights, and this study targets an endpoint ([model] endpoint): only black-box conditions apply there (persona / system prompts under the [generation] sampling settings). Run steering conditions in a local study (same persona modes, [model] spec = ...) into the same results database";
        for c in &self.conditions {
            if let Some(op) = steering(&c.add, &c.add_raw, &c.ablate, &c.cap) {
                return Err(invalid(format!("condition '{}': {op}: {why}", c.name)));
            }
        }
        for (i, s) in self.sweeps.iter().enumerate() {
            if let Some(op) = steering(&s.add, &s.add_raw, &s.ablate, &s.cap) {
                let name = s
                    .name
                    .clone()
                    .or_else(|| s.base.clone())
                    .unwrap_or_else(|| format!("sweep{}", i + 1));
                return Err(invalid(format!("sweep '{name}': {op}: {why}")));
            }
        }
        if !self.directions.is_empty() {
            return Err(invalid(format!(
                "[directions] ({}): {why}",
                self.directions
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    fn direction_names(&self) -> String {
        if self.directions.is_empty() {
            "the study has no [directions]".into()
        } else {
            format!(
                "directions: {}",
                self.directions
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    /// System prompt of a persona name: the study's own, then the built-in ones.
    pub fn persona_text(&self, name: &str) -> Result<String> {
        if let Some(t) = self.personas.get(name) {
            return Ok(t.clone());
        }
        builtin_persona(name).map(str::to_string).ok_or_else(|| {
            let mut known: Vec<String> = builtin_names().into_iter().map(String::from).collect();
            known.extend(self.personas.keys().cloned());
            invalid(format!(
                "unknown persona '{name}' (known: {})",
                known.join(", ")
            ))
        })
    }

    /// Resolve the direction part of a spec: a study direction name, or a path.
    fn dir_ref(&self, spec: &DirectionSpec) -> std::result::Result<DirRef, String> {
        let s = spec.file.to_string_lossy().to_string();
        if self.directions.contains_key(&s) {
            return Ok(DirRef::Named(s));
        }
        let looks_like_path =
            s.contains('/') || s.contains('\\') || s.to_ascii_lowercase().ends_with(".safetensors");
        if looks_like_path {
            let p = PathBuf::from(&s);
            return Ok(DirRef::Path(if p.is_relative() {
                self.base_dir.join(p)
            } else {
                p
            }));
        }
        Err(format!(
            "unknown direction '{s}' ({}; or give a path to a .safetensors file)",
            self.direction_names()
        ))
    }

    fn op_drafts(&self, what: &str, fields: [(OpField, Vec<String>); 4]) -> Result<Vec<OpDraft>> {
        let mut out = Vec::new();
        for (field, specs) in fields {
            for text in specs {
                let spec = field
                    .parse_spec(&text)
                    .map_err(|e| invalid(format!("{what}: {} = \"{text}\": {e}", field.key())))?;
                let direction = self
                    .dir_ref(&spec)
                    .map_err(|e| invalid(format!("{what}: {} = \"{text}\": {e}", field.key())))?;
                out.push(OpDraft {
                    field,
                    text,
                    spec,
                    direction,
                });
            }
        }
        Ok(out)
    }

    fn check_prompts(&self, what: &str, p: &Option<Vec<String>>) -> Result<Vec<String>> {
        match p {
            None => Ok(self.prompts.keys().cloned().collect()),
            Some(list) => {
                if list.is_empty() {
                    return Err(invalid(format!(
                        "{what}: prompts = [] runs on no prompt set"
                    )));
                }
                for n in list {
                    if !self.prompts.contains_key(n) {
                        return Err(invalid(format!(
                            "{what}: prompt set '{n}' is not in [prompts] ({})",
                            self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
                Ok(list.clone())
            }
        }
    }

    fn system_of(
        &self,
        what: &str,
        persona: &Option<String>,
        system: &Option<String>,
    ) -> Result<Option<String>> {
        match (persona, system) {
            (Some(_), Some(_)) => Err(invalid(format!("{what}: give persona or system, not both"))),
            (Some(p), None) => self
                .persona_text(p)
                .map(Some)
                .map_err(|e| invalid(format!("{what}: {}", strip_prefix(&e)))),
            (None, Some(s)) if s.trim().is_empty() => Err(invalid(format!(
                "{what}: system is empty (leave it out for the model's default)"
            ))),
            (None, s) => Ok(s.clone()),
        }
    }

    /// Every condition: the `[[condition]]` tables, then each sweep's expansion, checked.
    pub fn conditions(&self) -> Result<Vec<ConditionDraft>> {
        let mut out = self.plain_conditions()?;
        let n_plain = out.len();
        for (si, s) in self.sweeps.iter().enumerate() {
            let expanded = self.expand_sweep(si, s, &out[..n_plain], out.len())?;
            out.extend(expanded);
        }
        if out.is_empty() {
            return Err(invalid(
                "no conditions: add [[condition]] name = \"baseline\"".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for c in &out {
            if !seen.insert(c.name.as_str()) {
                return Err(invalid(format!(
                    "two conditions are named '{}' (sweep names must differ from each other and from [[condition]] names)",
                    c.name
                )));
            }
        }
        Ok(out)
    }

    /// The `[[condition]]` tables, each checked.
    fn plain_conditions(&self) -> Result<Vec<ConditionDraft>> {
        let mut out = Vec::new();
        for c in &self.conditions {
            check_name("condition", &c.name)?;
            let what = format!("condition '{}'", c.name);
            let system = self.system_of(&what, &c.persona, &c.system)?;
            let ops = self.op_drafts(
                &what,
                [
                    (OpField::Add, c.add.items()),
                    (OpField::AddRaw, c.add_raw.items()),
                    (OpField::Ablate, c.ablate.items()),
                    (OpField::Cap, c.cap.items()),
                ],
            )?;
            let prompts = self.check_prompts(&what, &c.prompts)?;
            out.push(ConditionDraft {
                name: c.name.clone(),
                persona: c.persona.clone(),
                system,
                ops,
                prompts,
                vars: BTreeMap::new(),
            });
        }
        Ok(out)
    }

    /// The conditions of sweep number `si` (0-based): one per combination of its variables, on
    /// top of its base among `plain`; `before` conditions exist already (for the limit).
    fn expand_sweep(
        &self,
        si: usize,
        s: &SweepSection,
        plain: &[ConditionDraft],
        before: usize,
    ) -> Result<Vec<ConditionDraft>> {
        let label = s
            .name
            .clone()
            .or_else(|| s.base.clone())
            .unwrap_or_else(|| format!("sweep{}", si + 1));
        let what = format!("sweep '{label}'");
        let base = self.sweep_base(&what, s, plain)?;
        let vars = sweep_vars(&what, &s.vars)?;
        if vars.is_empty() {
            return Err(invalid(format!(
                "{what}: no variables (add e.g. coeff = [4, 8] and use {{coeff}} in a spec)"
            )));
        }
        check_sweep_placeholders(&what, s, &vars)?;
        let max = crate::model::limits::MAX_CONDITIONS;
        match product_len(&vars) {
            Some(n) if n <= max.saturating_sub(before) => {}
            n => {
                return Err(invalid(format!(
                    "{what}: {} combinations would make more than {max} conditions",
                    n.map_or("too many".to_string(), |n| n.to_string())
                )))
            }
        }
        product(&vars)
            .iter()
            .map(|combo| self.sweep_condition(&what, &label, s, base.as_ref(), combo))
            .collect()
    }

    /// The `[[condition]]` a sweep builds on (`base = "..."`), if it names one.
    fn sweep_base(
        &self,
        what: &str,
        s: &SweepSection,
        plain: &[ConditionDraft],
    ) -> Result<Option<ConditionDraft>> {
        let Some(b) = &s.base else {
            return Ok(None);
        };
        plain
            .iter()
            .find(|c| &c.name == b)
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                invalid(format!(
                    "{what}: base '{b}' is not a [[condition]] ({})",
                    self.conditions
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// One combination of a sweep's variables as a condition: its templates filled in, on top of
    /// the base condition's persona, ops, prompts and variables.
    fn sweep_condition(
        &self,
        what: &str,
        label: &str,
        s: &SweepSection,
        base: Option<&ConditionDraft>,
        combo: &[(String, String)],
    ) -> Result<ConditionDraft> {
        let map: BTreeMap<String, String> = combo.iter().cloned().collect();
        let sub = |t: &str, field: &str| -> Result<String> {
            substitute(t, &map).map_err(|e| invalid(format!("{what}: {field}: {e}")))
        };
        let suffix = combo
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let name = if s.name.as_deref().is_some_and(has_placeholder) {
            sub(s.name.as_deref().unwrap_or_default(), "name")?
        } else {
            format!("{label}[{suffix}]")
        };
        let cwhat = format!("{what} ({suffix})");
        let persona = s
            .persona
            .as_deref()
            .map(|p| sub(p, "persona"))
            .transpose()?;
        let system = s.system.as_deref().map(|p| sub(p, "system")).transpose()?;
        let (persona, system) = if persona.is_some() || system.is_some() {
            let sys = self.system_of(&cwhat, &persona, &system)?;
            (persona, sys)
        } else {
            match base {
                Some(b) => (b.persona.clone(), b.system.clone()),
                None => (None, None),
            }
        };
        let subs = |f: &OneOrMany, key: &str| -> Result<Vec<String>> {
            f.items().iter().map(|t| sub(t, key)).collect()
        };
        let mut ops = base.map(|b| b.ops.clone()).unwrap_or_default();
        ops.extend(self.op_drafts(
            &cwhat,
            [
                (OpField::Add, subs(&s.add, "add")?),
                (OpField::AddRaw, subs(&s.add_raw, "add_raw")?),
                (OpField::Ablate, subs(&s.ablate, "ablate")?),
                (OpField::Cap, subs(&s.cap, "cap")?),
            ],
        )?);
        let prompts = match (&s.prompts, base) {
            (Some(_), _) | (None, None) => self.check_prompts(&cwhat, &s.prompts)?,
            (None, Some(b)) => b.prompts.clone(),
        };
        let mut vars = base.map(|b| b.vars.clone()).unwrap_or_default();
        vars.extend(map);
        Ok(ConditionDraft {
            name,
            persona,
            system,
            ops,
            prompts,
            vars,
        })
    }
}

/// Every placeholder of a sweep's templates names one of its variables, and every variable
/// appears somewhere (a misspelled field would otherwise leave its variable silently unused).
fn check_sweep_placeholders(
    what: &str,
    s: &SweepSection,
    vars: &[(String, Vec<String>)],
) -> Result<()> {
    let templates: Vec<&str> = s
        .name
        .iter()
        .chain(s.persona.iter())
        .chain(s.system.iter())
        .map(String::as_str)
        .collect();
    let spec_texts: Vec<String> = [&s.add, &s.add_raw, &s.ablate, &s.cap]
        .iter()
        .flat_map(|f| f.items())
        .collect();
    // Unknown placeholders first: a misspelled {var} also leaves its variable unused.
    let probe: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v[0].clone()))
        .collect();
    for t in templates
        .iter()
        .copied()
        .chain(spec_texts.iter().map(String::as_str))
    {
        substitute(t, &probe).map_err(|e| invalid(format!("{what}: {e}")))?;
    }
    for (v, _) in vars {
        let needle = format!("{{{v}}}");
        if !templates.iter().any(|t| t.contains(&needle))
            && !spec_texts.iter().any(|t| t.contains(&needle))
        {
            return Err(invalid(format!(
                "{what}: variable '{v}' is used nowhere (write {{{v}}} in a spec or the name; or is '{v}' a misspelled field? fields: name, base, persona, system, add, add_raw, ablate, cap, prompts)"
            )));
        }
    }
    Ok(())
}

/// The documented upper limits of [`crate::model::limits`] on what a study may ask for, checked
/// before anything is sized by them (`samples = 1e9` would otherwise plan a billion items).
fn check_limits(g: &GenerationSection, stats: &StatsSection) -> Result<()> {
    use crate::model::limits::{MAX_BATCH, MAX_BOOTSTRAP, MAX_NEW_TOKENS, MAX_SAMPLES};
    for (name, v, max) in [
        ("generation.samples", g.samples, MAX_SAMPLES),
        (
            "generation.max_new_tokens",
            g.max_new_tokens,
            MAX_NEW_TOKENS,
        ),
        ("generation.batch_size", g.batch_size, MAX_BATCH),
        ("stats.bootstrap", stats.bootstrap, MAX_BOOTSTRAP),
    ] {
        if v > max {
            return Err(invalid(format!("{name} = {v} is above the limit of {max}")));
        }
    }
    Ok(())
}

fn strip_prefix(e: &Error) -> String {
    match e {
        Error::InvalidValue(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Names appear in tables, file names and the command line: keep them plain.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '_' | '-' | '.' | '+' | '=' | ',' | '@' | '[' | ']')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} name '{name}' must be non-empty and use only letters, digits and _ - . + = , @ [ ]"
        )))
    }
}

fn value_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) if f.is_finite() => Some(format!("{f}")),
        toml::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Variables of a sweep, each as its list of value texts, in name order.
fn sweep_vars(
    what: &str,
    raw: &BTreeMap<String, toml::Value>,
) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for (name, v) in raw {
        let bad = |why: &str| {
            invalid(format!(
                "{what}: '{name}' {why} (a sweep variable is a list like [4, 8], {{range = [0, 27], step = 3}} or {{windows = [0, 27], width = 3, step = 3}}; sweep fields are name, base, persona, system, add, add_raw, ablate, cap, prompts)"
            ))
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad("is not a valid variable name"));
        }
        let values: Vec<String> = match v {
            toml::Value::Array(a) => {
                if a.is_empty() {
                    return Err(bad("is an empty list"));
                }
                a.iter()
                    .map(|x| {
                        if let toml::Value::Float(f) = x {
                            if !f.is_finite() {
                                return Err(bad(&format!("has a non-finite value {f}")));
                            }
                        }
                        value_text(x)
                            .ok_or_else(|| bad("has a value that is not a number or string"))
                    })
                    .collect::<Result<_>>()?
            }
            toml::Value::Table(t) => {
                let int = |k: &str| -> Result<Option<i64>> {
                    match t.get(k) {
                        None => Ok(None),
                        Some(toml::Value::Integer(i)) => Ok(Some(*i)),
                        Some(_) => Err(bad(&format!("has a non-integer '{k}'"))),
                    }
                };
                let pair = |k: &str| -> Result<Option<(i64, i64)>> {
                    match t.get(k) {
                        None => Ok(None),
                        Some(toml::Value::Array(a)) => match a.as_slice() {
                            [toml::Value::Integer(x), toml::Value::Integer(y)] => {
                                Ok(Some((*x, *y)))
                            }
                            _ => Err(bad(&format!("'{k}' must be [FROM, TO] integers"))),
                        },
                        Some(_) => Err(bad(&format!("'{k}' must be [FROM, TO] integers"))),
                    }
                };
                for k in t.keys() {
                    if !matches!(k.as_str(), "range" | "windows" | "width" | "step") {
                        return Err(bad(&format!("has an unknown key '{k}'")));
                    }
                }
                let step = int("step")?.unwrap_or(1);
                if step < 1 {
                    return Err(bad("has step < 1"));
                }
                match (pair("range")?, pair("windows")?) {
                    (Some((a, b)), None) => {
                        if a > b || a < 0 {
                            return Err(bad("has a range that is empty or negative"));
                        }
                        if t.contains_key("width") {
                            return Err(bad("has 'width' without 'windows'"));
                        }
                        check_sweep_count(((b - a) / step).saturating_add(1), &bad)?;
                        (a..=b)
                            .step_by(step as usize)
                            .map(|x| x.to_string())
                            .collect()
                    }
                    (None, Some((a, b))) => {
                        let w = int("width")?.ok_or_else(|| bad("needs 'width' for windows"))?;
                        // a <= b and w <= b - a + 1 keep every sum below in range.
                        if w < 1 || a < 0 || a > b || w - 1 > b - a {
                            return Err(bad("has windows that do not fit in [FROM, TO]"));
                        }
                        check_sweep_count(((b - a - (w - 1)) / step).saturating_add(1), &bad)?;
                        let mut v = Vec::new();
                        let mut s = a;
                        while s <= b - (w - 1) {
                            v.push(if w == 1 {
                                s.to_string()
                            } else {
                                format!("{s}-{}", s + w - 1)
                            });
                            s = match s.checked_add(step) {
                                Some(n) => n,
                                None => break,
                            };
                        }
                        v
                    }
                    _ => return Err(bad("needs exactly one of 'range' or 'windows'")),
                }
            }
            _ => return Err(bad("is not a sweep field nor a variable")),
        };
        check_sweep_count(values.len() as i64, &bad)?;
        let distinct: BTreeSet<&String> = values.iter().collect();
        if distinct.len() != values.len() {
            return Err(bad("repeats a value"));
        }
        out.push((name.clone(), values));
    }
    Ok(out)
}

/// A sweep variable of more than [`crate::model::limits::MAX_SWEEP_VALUES`] values is refused
/// before its values are listed (`range = [0, 1000000000000]` would otherwise list them all).
fn check_sweep_count(n: i64, bad: &dyn Fn(&str) -> Error) -> Result<()> {
    let max = crate::model::limits::MAX_SWEEP_VALUES;
    if n > max as i64 {
        return Err(bad(&format!("has {n} values, above the limit of {max}")));
    }
    Ok(())
}

/// Number of combinations of the variables, `None` past `usize`.
fn product_len(vars: &[(String, Vec<String>)]) -> Option<usize> {
    vars.iter()
        .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()))
}

/// Cartesian product of the variables, first variable slowest.
fn product(vars: &[(String, Vec<String>)]) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = vec![vec![]];
    for (name, values) in vars {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push((name.clone(), v.clone()));
                    p
                })
            })
            .collect();
    }
    out
}

fn has_placeholder(t: &str) -> bool {
    substitute(t, &BTreeMap::new()).is_err()
}

/// Replace `{var}`; `{{` / `}}` are literal braces; an unknown `{name}` is an error.
pub fn substitute(t: &str, vars: &BTreeMap<String, String>) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(t.len());
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for d in chars.by_ref() {
                    if d == '}' {
                        closed = true;
                        break;
                    }
                    name.push(d);
                }
                if !closed {
                    return Err(format!("'{t}' has an unclosed '{{'"));
                }
                match vars.get(&name) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(format!(
                            "'{{{name}}}' is not a variable of this sweep ({})",
                            if vars.is_empty() {
                                "none".to_string()
                            } else {
                                vars.keys().cloned().collect::<Vec<_>>().join(", ")
                            }
                        ))
                    }
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}
