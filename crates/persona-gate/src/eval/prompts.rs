//! Prompt sets: what a study asks the model.
//!
//! Formats: StrongREJECT CSV (`forbidden_prompt`, `category`) or any CSV with a chosen column; JSON
//! lists of `{instruction, category}` (the refusal-direction splits) or of strings; JSONL with
//! `prompt` / `instruction` / `forbidden_prompt` / `user` fields. By name (`strongreject`,
//! `harmful_train`, `harmful_val`, `harmless_train`, `harmless_val`, `demo_harmful`,
//! `demo_harmless`): built-in demo sets, then `$PGATE_CACHE/data/`, then `$PGATE_SHARED/data/`,
//! then a download from the canonical URL (sha256-checked) into the cache.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptItem {
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub category: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub name: String,
    pub source: String,
    pub items: Vec<PromptItem>,
}

/// A named set: file name under `data/`, canonical URL, sha256 of the file.
struct Known {
    name: &'static str,
    rel: &'static str,
    url: &'static str,
    sha256: &'static str,
}

const RD: &str = "https://raw.githubusercontent.com/andyrdt/refusal_direction/9d852fae1a9121c78b29142de733cb1340770cc3/dataset/splits";

const KNOWN: &[Known] = &[
    Known {
        name: "strongreject",
        rel: "strongreject/strongreject_dataset.csv",
        url: "https://raw.githubusercontent.com/alexandrasouly/strongreject/main/strongreject_dataset/strongreject_dataset.csv",
        sha256: "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
    },
    Known { name: "harmful_train", rel: "refusal_splits/harmful_train.json", url: "", sha256: "8f5c0eac0efd2a7f99084bbe8d0de2c465e31b1997184783c917969d9de9ece1" },
    Known { name: "harmful_val", rel: "refusal_splits/harmful_val.json", url: "", sha256: "305f1d1e6dfa6c50a32d24a18ef815f42b5441eb83e6d7767d242107162fd9f4" },
    Known { name: "harmless_train", rel: "refusal_splits/harmless_train.json", url: "", sha256: "86623b1f8a25aa35df153fc97a556dbcebb6a7c881538ae43ee479ca17f2e002" },
    Known { name: "harmless_val", rel: "refusal_splits/harmless_val.json", url: "", sha256: "772010758e7d771ef4c7e5e4acdfd7598dcece1a6f383f20d382f640913a2a4d" },
];

const DEMO_HARMFUL: &str = include_str!("demo_harmful.txt");
const DEMO_HARMLESS: &str = include_str!("demo_harmless.txt");

impl PromptSet {
    /// Load by path (any supported format) or by name.
    pub fn load(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        let set = if p.exists() {
            Self::from_path(p, None)?
        } else {
            Self::by_name(spec)?
        };
        if set.items.is_empty() {
            return Err(Error::Empty(format!("prompt set '{spec}' has no prompts")));
        }
        Ok(set)
    }

    /// Keep the first `n` prompts (all when `n` is larger).
    pub fn take(mut self, n: usize) -> Self {
        self.items.truncate(n);
        self
    }

    pub fn texts(&self) -> Vec<String> {
        self.items.iter().map(|i| i.text.clone()).collect()
    }

    /// sha256 over the prompt texts and categories, in order (what receipts record).
    pub fn sha256(&self) -> String {
        let mut s = String::new();
        for i in &self.items {
            s.push_str(&i.id);
            s.push('\u{1f}');
            s.push_str(&i.text);
            s.push('\u{1f}');
            s.push_str(i.category.as_deref().unwrap_or(""));
            s.push('\u{1e}');
        }
        crate::hash::sha256_bytes(s.as_bytes())
    }

    fn by_name(name: &str) -> Result<Self> {
        let demo = |text: &str, n: &str| PromptSet {
            name: n.into(),
            source: "built-in".into(),
            items: text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .enumerate()
                .map(|(i, l)| PromptItem {
                    id: format!("{n}-{}", i + 1),
                    text: l.into(),
                    category: None,
                })
                .collect(),
        };
        match name {
            "demo_harmful" => return Ok(demo(DEMO_HARMFUL, name)),
            "demo_harmless" => return Ok(demo(DEMO_HARMLESS, name)),
            _ => {}
        }
        let k = KNOWN.iter().find(|k| k.name == name).ok_or_else(|| {
            Error::InvalidValue(format!(
                "prompt set '{name}' is neither a file nor a known name (known: demo_harmful, demo_harmless, {})",
                KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let cached = crate::model::source::cache_dir().join("data").join(k.rel);
        let mut candidates = vec![cached.clone()];
        if let Some(s) = std::env::var_os("PGATE_SHARED") {
            candidates.push(PathBuf::from(s).join("data").join(k.rel));
        }
        for c in &candidates {
            if c.exists() {
                let mut s = Self::from_path(c, None)?;
                s.name = name.into();
                return Ok(s);
            }
        }
        let url = if k.url.is_empty() {
            format!("{RD}/{}", k.rel.rsplit('/').next().unwrap_or(k.rel))
        } else {
            k.url.to_string()
        };
        download(&url, &cached, k.sha256)?;
        let mut s = Self::from_path(&cached, None)?;
        s.name = name.into();
        Ok(s)
    }

    /// Read a file; `column` picks the CSV column (default `forbidden_prompt`, else `prompt`).
    pub fn from_path(path: &Path, column: Option<&str>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let items = match ext.as_str() {
            "csv" => parse_csv(&text, column)
                .map_err(|e| Error::InvalidValue(format!("{}: {e}", path.display())))?,
            "jsonl" => parse_jsonl(&text)
                .map_err(|e| Error::InvalidValue(format!("{}: {e}", path.display())))?,
            "json" => parse_json(&text)
                .map_err(|e| Error::InvalidValue(format!("{}: {e}", path.display())))?,
            "txt" => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .enumerate()
                .map(|(i, l)| PromptItem {
                    id: format!("{}", i + 1),
                    text: l.into(),
                    category: None,
                })
                .collect(),
            other => {
                return Err(Error::InvalidValue(format!(
                    "{}: unknown prompt-set format '.{other}' (csv, json, jsonl, txt)",
                    path.display()
                )))
            }
        };
        if items.is_empty() {
            return Err(Error::Empty(format!("{}: no prompts", path.display())));
        }
        Ok(Self {
            name,
            source: path.display().to_string(),
            items,
        })
    }
}

fn item_from_json(i: usize, v: &serde_json::Value) -> std::result::Result<PromptItem, String> {
    if let Some(s) = v.as_str() {
        return Ok(PromptItem {
            id: format!("{}", i + 1),
            text: s.into(),
            category: None,
        });
    }
    let text = [
        "instruction",
        "prompt",
        "forbidden_prompt",
        "user",
        "question",
    ]
    .iter()
    .find_map(|k| v.get(k).and_then(|x| x.as_str()))
    .ok_or_else(|| {
        format!(
            "item {}: no instruction/prompt/forbidden_prompt/user field",
            i + 1
        )
    })?;
    let id = v
        .get("id")
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| x.to_string())
        })
        .unwrap_or_else(|| format!("{}", i + 1));
    let category = v
        .get("category")
        .and_then(|x| x.as_str())
        .map(str::to_string);
    Ok(PromptItem {
        id,
        text: text.into(),
        category,
    })
}

fn parse_json(text: &str) -> std::result::Result<Vec<PromptItem>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let arr = v.as_array().ok_or("expected a JSON list of prompts")?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| item_from_json(i, x))
        .collect()
}

fn parse_jsonl(text: &str) -> std::result::Result<Vec<PromptItem>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| format!("line {}: not valid JSON ({e})", i + 1))?;
            item_from_json(i, &v)
        })
        .collect()
}

/// Minimal RFC 4180 CSV: quoted fields with doubled quotes and embedded newlines.
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rec = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => rec.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                rec.push(std::mem::take(&mut field));
                if rec.iter().any(|f| !f.is_empty()) {
                    out.push(std::mem::take(&mut rec));
                } else {
                    rec.clear();
                }
            }
            _ => field.push(c),
        }
    }
    if !field.is_empty() || !rec.is_empty() {
        rec.push(field);
        out.push(rec);
    }
    out
}

fn parse_csv(text: &str, column: Option<&str>) -> std::result::Result<Vec<PromptItem>, String> {
    let recs = csv_records(text);
    let header = recs.first().ok_or("empty CSV")?;
    let find = |name: &str| header.iter().position(|h| h.trim() == name);
    let col = match column {
        Some(c) => {
            find(c).ok_or_else(|| format!("no column '{c}' (columns: {})", header.join(", ")))?
        }
        None => find("forbidden_prompt")
            .or_else(|| find("prompt"))
            .or_else(|| find("instruction"))
            .ok_or_else(|| {
                format!(
                    "no forbidden_prompt/prompt/instruction column (columns: {})",
                    header.join(", ")
                )
            })?,
    };
    let cat = find("category");
    Ok(recs[1..]
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let t = r.get(col)?.trim();
            (!t.is_empty()).then(|| PromptItem {
                id: format!("{}", i + 1),
                text: t.into(),
                category: cat.and_then(|c| r.get(c)).map(|s| s.trim().to_string()),
            })
        })
        .collect())
}

/// Download `url` to `dest` and check its sha256 (nothing is kept on a mismatch).
fn download(url: &str, dest: &Path, sha256: &str) -> Result<()> {
    let err = |reason: String| {
        Error::InvalidValue(format!(
            "prompt set not cached and download of {url} failed: {reason}"
        ))
    };
    let resp = ureq::get(url)
        .timeout(std::time::Duration::from_secs(30))
        .call()
        .map_err(|e| err(e.to_string()))?;
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body)
        .map_err(|e| err(e.to_string()))?;
    let got = crate::hash::sha256_bytes(&body);
    if got != sha256 {
        return Err(err(format!(
            "sha256 {got} does not match the pinned {sha256}"
        )));
    }
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    std::fs::write(dest, &body).map_err(|e| Error::io(dest, e))
}

/// The prompts of a JSONL file for `pgate generate --prompts`: each line a string or an object
/// with `prompt` / `user` / `instruction` / `forbidden_prompt`, optional `system` (else `system`
/// given here) and `id` (else the line number). Unlike [`PromptSet`], each prompt may carry its own
/// system prompt.
pub fn read_chat_prompts(
    path: &Path,
    system: Option<&str>,
) -> Result<Vec<crate::generate::ChatPrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::InvalidValue(format!("{at}: not valid JSON: {e}")))?;
        let user = match &v {
            serde_json::Value::String(s) => s.clone(),
            _ => ["prompt", "user", "instruction", "forbidden_prompt"]
                .iter()
                .find_map(|k| v.get(k).and_then(|x| x.as_str()))
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::InvalidValue(format!("{at}: no prompt/user/instruction field"))
                })?,
        };
        let sys = v
            .get("system")
            .and_then(|x| x.as_str())
            .or(system)
            .map(str::to_string);
        let id = v.get("id").map(|x| {
            x.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| x.to_string())
        });
        out.push(crate::generate::ChatPrompt {
            id: id.or(Some(format!("{}", n + 1))),
            system: sys,
            user,
        });
    }
    if out.is_empty() {
        return Err(Error::Empty(format!(
            "{}: no prompts in file",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_and_newlines() {
        let t =
            "category,source,forbidden_prompt\nA,x,\"Say \"\"hi\"\", then\nleave\"\nB,y,plain\n";
        let items = parse_csv(t, None).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].text, "Say \"hi\", then\nleave");
        assert_eq!(items[0].category.as_deref(), Some("A"));
        assert!(parse_csv(t, Some("nope")).is_err());
    }

    #[test]
    fn json_and_jsonl() {
        assert_eq!(
            parse_json(r#"[{"instruction":"a","category":"c"},"b"]"#)
                .unwrap()
                .len(),
            2
        );
        assert!(parse_json(r#"{"a":1}"#).is_err());
        assert_eq!(
            parse_jsonl("{\"prompt\":\"a\"}\n\n{\"user\":\"b\"}\n")
                .unwrap()
                .len(),
            2
        );
        assert!(parse_jsonl("{\"x\":1}").is_err());
    }

    #[test]
    fn demo_sets_are_built_in() {
        assert!(PromptSet::load("demo_harmful").unwrap().items.len() >= 10);
        assert!(PromptSet::load("demo_harmless").unwrap().items.len() >= 10);
        assert!(PromptSet::load("no_such_set").is_err());
    }
}
