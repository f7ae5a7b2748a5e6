//! The file checks of `verify`: model files and tokenizer, the study and condition hashes from the
//! study file and every file it names, direction files, prompt sets, and the database's work
//! items. Every path comes from a receipt or the stored study and is read only through
//! [`super::untrusted::ReadPolicy`]; model specs are never resolved and data sets never fetched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::receipt::{prompt_source_path, selected_sha256, FileHash, Receipt};
use super::untrusted::{Located, ReadPolicy};
use super::verify_ctx::{Ctx, DbState, VerifyOptions};
use crate::eval::PromptSet;
use crate::study::file::{DirRef, DirectionEntry, StudyFile};
use crate::study::plan::Study;

/// Largest direction or prompt file `verify` reads.
const MAX_STUDY_FILE_BYTES: u64 = 1 << 30;

/// Named prompt sets and where `PromptSet::load` finds them cached (`data/` of the cache or of
/// `$PGATE_SHARED`). `verify` reads a named set only when it is cached: it never downloads. A name
/// missing here is never read (the study check is skipped), which is the safe side.
const NAMED_SETS: &[(&str, &str)] = &[
    ("strongreject", "strongreject/strongreject_dataset.csv"),
    ("harmful_train", "refusal_splits/harmful_train.json"),
    ("harmful_val", "refusal_splits/harmful_val.json"),
    ("harmless_train", "refusal_splits/harmless_train.json"),
    ("harmless_val", "refusal_splits/harmless_val.json"),
];

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

/// Work items in the database against each set's `expected`.
pub(crate) fn work_checks(cx: &mut Ctx, group: &[&(PathBuf, Receipt)], db: &DbState) {
    if db.record.is_err() {
        return;
    }
    for (p, r) in group {
        for s in &r.results {
            let total = db
                .status
                .iter()
                .find(|x| x.condition_hash == r.condition.hash && x.prompt_set == s.prompt_set)
                .map(|x| x.total.to_string())
                .ok_or_else(|| "no work items in the database".to_string());
            cx.push(
                &file_label(p),
                format!(
                    "condition '{}' set '{}' work items (database)",
                    r.condition.name, s.prompt_set
                ),
                &s.expected.to_string(),
                total,
            );
        }
    }
}

/// Model, tokenizer and study files of every receipt.
pub(crate) fn file_checks(
    cx: &mut Ctx,
    receipts: &[(PathBuf, Receipt)],
    policy: &ReadPolicy,
    opts: &VerifyOptions,
    dbs: &HashMap<String, Option<DbState>>,
) {
    let mut tokenizers: HashMap<Vec<PathBuf>, std::result::Result<Tok, String>> = HashMap::new();
    let mut studies: HashMap<String, StudyCheck> = HashMap::new();
    for (path, r) in receipts {
        let rn = file_label(path);
        if r.endpoint.is_none() {
            let located = model_checks(cx, &rn, r, policy, opts);
            tokenizer_checks(cx, &rn, r, located, &mut tokenizers);
        }
        let db = dbs.get(&r.study.hash).and_then(Option::as_ref);
        let sc = studies
            .entry(r.study.hash.clone())
            .or_insert_with(|| StudyCheck::load(r, policy, opts, db));
        study_checks(cx, &rn, r, sc);
    }
}

/// Where a model file of the receipt is: beside `--model`, or at its recorded path when that is
/// inside the bundle folder or a root.
fn locate_model_file(
    f: &FileHash,
    n_files: usize,
    policy: &ReadPolicy,
    opts: &VerifyOptions,
) -> Located {
    let recorded = PathBuf::from(&f.path);
    match &opts.model {
        Some(m) if m.is_dir() => match recorded.file_name() {
            Some(n) => ReadPolicy::explicit(&m.join(n)),
            None => Located::Refused(format!("{}: no file name", f.path)),
        },
        Some(m) if n_files == 1 || m.file_name() == recorded.file_name() => ReadPolicy::explicit(m),
        Some(m) => Located::Outside(format!(
            "--model {} is another file than {}",
            m.display(),
            f.path
        )),
        None => policy.locate(&recorded),
    }
}

/// Each model file's sha256 (size first: a file of another size is not read). Returns the files
/// when every one was found and matched.
fn model_checks(
    cx: &mut Ctx,
    rn: &str,
    r: &Receipt,
    policy: &ReadPolicy,
    opts: &VerifyOptions,
) -> Option<Vec<PathBuf>> {
    let mut all = Some(Vec::new());
    for f in &r.model.files {
        let what = format!("model file {} sha256", f.path);
        match locate_model_file(f, r.model.files.len(), policy, opts) {
            Located::File(p) => {
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                let found = if size != f.bytes {
                    Err(format!(
                        "{} has {size} bytes, the receipt records {}",
                        p.display(),
                        f.bytes
                    ))
                } else {
                    cx.file_sha(&p, f.bytes)
                };
                let ok = found.as_deref() == Ok(f.sha256.as_str());
                cx.push(rn, what, &f.sha256, found);
                match (&mut all, ok) {
                    (Some(v), true) => v.push(p),
                    _ => all = None,
                }
            }
            Located::Outside(why) => {
                cx.skip(
                    rn,
                    what,
                    format!("{why}: pass --root with its folder, or --model"),
                );
                all = None;
            }
            Located::Refused(why) => {
                cx.push(rn, what, &f.sha256, Err(why));
                all = None;
            }
        }
    }
    all.filter(|v| !v.is_empty())
}

#[derive(Clone)]
struct Tok {
    vocab: String,
    template: Option<String>,
    n_layers: usize,
    d_model: usize,
    architecture: String,
}

/// Tokenizer hashes and shape, from the model files checked above (opened, no tensor loaded).
fn tokenizer_checks(
    cx: &mut Ctx,
    rn: &str,
    r: &Receipt,
    located: Option<Vec<PathBuf>>,
    cache: &mut HashMap<Vec<PathBuf>, std::result::Result<Tok, String>>,
) {
    let Some(files) = located else {
        cx.skip(
            rn,
            "tokenizer and model shape".into(),
            "the model files were not all found and matched".into(),
        );
        return;
    };
    let tok = cache
        .entry(files.clone())
        .or_insert_with(|| {
            let src = if r.model.format == "gguf" {
                crate::model::ModelSource::Gguf(files[0].clone())
            } else {
                let dir = files[0].parent().map(Path::to_path_buf).unwrap_or_default();
                crate::model::ModelSource::HfDir(dir)
            };
            let o = crate::model::open(&src, &crate::model::LoadOptions::default())
                .map_err(|e| e.to_string())?;
            Ok(Tok {
                vocab: o.tokenizer.vocab_sha256(),
                template: o.tokenizer.chat_template_sha256(),
                n_layers: o.info.n_layers,
                d_model: o.info.d_model,
                architecture: o.info.architecture.clone(),
            })
        })
        .clone();
    let t = &r.model.tokenizer;
    cx.push(
        rn,
        "tokenizer vocabulary sha256".into(),
        &t.vocab_sha256,
        tok.clone().map(|t| t.vocab),
    );
    cx.push(
        rn,
        "chat template sha256".into(),
        t.chat_template_sha256.as_deref().unwrap_or("none"),
        tok.clone()
            .map(|t| t.template.unwrap_or_else(|| "none".into())),
    );
    let m = &r.model;
    cx.push(
        rn,
        "model architecture, layers and width".into(),
        &format!("{} {}x{}", m.architecture, m.n_layers, m.d_model),
        tok.map(|t| format!("{} {}x{}", t.architecture, t.n_layers, t.d_model)),
    );
}

/// The study re-read from its stored text and files, or why it was not.
enum StudyCheck {
    Ready(Box<Study>, ReadPolicy),
    Skipped(String),
    Failed(String),
}

impl StudyCheck {
    fn load(
        r: &Receipt,
        policy: &ReadPolicy,
        opts: &VerifyOptions,
        db: Option<&DbState>,
    ) -> StudyCheck {
        let Some(rec) = db.and_then(|d| d.record.as_ref().ok()) else {
            return StudyCheck::Skipped("the results database was not read".into());
        };
        let located = match (&opts.study_file, &r.study.file) {
            (Some(p), _) => ReadPolicy::explicit(p),
            (None, Some(f)) => policy.locate(Path::new(f)),
            (None, None) => {
                Located::Outside("the receipt names no study file (pass --study-file)".into())
            }
        };
        let file = match located {
            Located::File(p) => p,
            Located::Outside(why) => {
                return StudyCheck::Skipped(format!(
                    "{why}: pass --root with its folder, or --study-file"
                ))
            }
            Located::Refused(why) => return StudyCheck::Failed(why),
        };
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        // The files the study names may lie in its own folder too.
        let mut roots = policy.roots().to_vec();
        roots.push(base.clone());
        let spol = ReadPolicy::new(&base, &roots);
        let sf = match StudyFile::parse(&rec.toml, &base) {
            Ok(f) => f,
            Err(e) => return StudyCheck::Failed(format!("the stored study does not parse: {e}")),
        };
        if let Err(c) = prescreen(&sf, &spol) {
            return c;
        }
        match Study::resolve(sf) {
            Ok(s) => StudyCheck::Ready(Box::new(s), spol),
            Err(e) => StudyCheck::Failed(e.to_string()),
        }
    }
}

fn too_big(p: &Path) -> Option<String> {
    let n = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    (n > MAX_STUDY_FILE_BYTES)
        .then(|| format!("{} has {n} bytes, more than verify reads", p.display()))
}

/// Check a path the stored study names before anything reads it.
fn screen(pol: &ReadPolicy, p: &Path) -> Result<(), StudyCheck> {
    match pol.locate(p) {
        Located::File(real) => match too_big(&real) {
            Some(why) => Err(StudyCheck::Failed(why)),
            None => Ok(()),
        },
        Located::Outside(why) => Err(StudyCheck::Skipped(format!(
            "the study names {why}: pass --root with its folder"
        ))),
        Located::Refused(why) => Err(StudyCheck::Failed(why)),
    }
}

/// Every file the study will read must be a bounded regular file inside the allowed folders,
/// and every named prompt set must be built in or cached (nothing is downloaded).
fn prescreen(f: &StudyFile, pol: &ReadPolicy) -> Result<(), StudyCheck> {
    let join = |p: &str| {
        let p = PathBuf::from(p);
        if p.is_relative() {
            f.base_dir.join(p)
        } else {
            p
        }
    };
    for d in f.directions.values() {
        if let DirectionEntry::Path(p) | DirectionEntry::File { file: p } = d {
            screen(pol, &join(p))?;
        }
    }
    let drafts = f
        .conditions()
        .map_err(|e| StudyCheck::Failed(format!("the stored study's conditions: {e}")))?;
    for c in &drafts {
        for o in &c.ops {
            if let DirRef::Path(p) = &o.direction {
                screen(pol, p)?;
            }
        }
    }
    for (name, e) in &f.prompts {
        let src = e.source();
        let local = f.base_dir.join(src);
        if Path::new(src).is_relative() && local.exists() {
            screen(pol, &local)?;
        } else if Path::new(src).exists() {
            screen(pol, Path::new(src))?;
        } else if !matches!(src, "demo_harmful" | "demo_harmless") && !named_set_cached(src) {
            return Err(StudyCheck::Skipped(format!(
                "prompt set '{name}' is the named data set '{src}', not cached here (verify never downloads)"
            )));
        }
    }
    Ok(())
}

fn named_set_cached(name: &str) -> bool {
    let Some((_, rel)) = NAMED_SETS.iter().find(|(n, _)| *n == name) else {
        return false;
    };
    let mut places = vec![crate::model::source::cache_dir().join("data").join(rel)];
    if let Some(s) = std::env::var_os("PGATE_SHARED") {
        places.push(PathBuf::from(s).join("data").join(rel));
    }
    places.iter().any(|p| p.is_file())
}

/// Study and condition hashes, prompt sets and direction files of one receipt.
fn study_checks(cx: &mut Ctx, rn: &str, r: &Receipt, sc: &StudyCheck) {
    let what = "study files (study hash, condition hash, prompt sets, directions)".to_string();
    let (study, spol) = match sc {
        StudyCheck::Skipped(why) => return cx.skip(rn, what, why.clone()),
        StudyCheck::Failed(why) => return cx.push(rn, what, &r.study.hash, Err(why.clone())),
        StudyCheck::Ready(s, p) => (s, p),
    };
    cx.push(
        rn,
        "study hash (from the study file and its files)".into(),
        &r.study.hash,
        Ok(study.hash.clone()),
    );
    let c = study
        .condition(&r.condition.name)
        .map(|i| &study.conditions[i]);
    cx.push(
        rn,
        format!(
            "condition '{}' hash (system prompt, ops and directions, model, generation)",
            r.condition.name
        ),
        &r.condition.hash,
        c.map(|c| c.hash.clone())
            .ok_or_else(|| "no such condition in the study file".into()),
    );
    for ps in &r.prompt_sets {
        let Some(s) = study.prompt_sets.iter().find(|s| s.name == ps.name) else {
            cx.push(
                rn,
                format!("prompt set '{}'", ps.name),
                &ps.set_sha256,
                Err("not in the study file".into()),
            );
            continue;
        };
        let src = prompt_source_path(&study.file, &s.source);
        let whole = PromptSet::load(&src)
            .map(|p| p.sha256())
            .map_err(|e| e.to_string());
        cx.push(
            rn,
            format!("prompt set '{}' ({}) sha256", ps.name, ps.source),
            &ps.set_sha256,
            whole,
        );
        cx.push(
            rn,
            format!(
                "prompt set '{}' prompts used (skip {}, n {}) sha256",
                ps.name, ps.skip, ps.n
            ),
            &ps.selected_sha256,
            Ok(selected_sha256(&s.items)),
        );
        let mut cats: BTreeMap<String, usize> = BTreeMap::new();
        for it in &s.items {
            *cats
                .entry(it.category.clone().unwrap_or_else(|| "(none)".into()))
                .or_insert(0) += 1;
        }
        let shown = |skip: usize, n: usize, c: &BTreeMap<String, usize>| {
            format!("skip {skip}, n {n}, categories {c:?}")
        };
        cx.push(
            rn,
            format!("prompt set '{}' slice and categories", ps.name),
            &shown(ps.skip, ps.n, &ps.categories),
            Ok(shown(s.skip, s.items.len(), &cats)),
        );
    }
    let base = &study.file.base_dir;
    for o in &r.condition.ops {
        let (Some(file), Some(sha)) = (&o.file, o.identity.get("sha256").and_then(|v| v.as_str()))
        else {
            continue;
        };
        let p = PathBuf::from(file);
        let p = if p.is_relative() { base.join(p) } else { p };
        let what = format!("direction '{}' file {} sha256", o.direction, p.display());
        match spol.locate(&p) {
            Located::File(real) => {
                let found = cx.file_sha(&real, MAX_STUDY_FILE_BYTES);
                cx.push(rn, what, sha, found);
            }
            Located::Outside(why) => {
                cx.skip(rn, what, format!("{why}: pass --root with its folder"))
            }
            Located::Refused(why) => cx.push(rn, what, sha, Err(why)),
        }
    }
}
