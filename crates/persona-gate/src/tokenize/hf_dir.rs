//! Reading a tokenizer from a Hugging Face model directory.
//!
//! `tokenizer.json` holds the whole pipeline, which the `tokenizers` crate loads as is. What it lacks
//! is chat metadata, spread over other files by transformers' conventions: the template in
//! `chat_template.jinja` (newer) or `tokenizer_config.json` (older), the special-token strings in
//! `tokenizer_config.json`, and the extra end-of-turn ids in `generation_config.json` (Llama-3 lists
//! `<|eot_id|>` only there). We read all of them, so a model stops where transformers would stop it.

use std::path::Path;

use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Everything read from the directory.
pub(crate) struct HfFiles {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
    pub add_bos: Option<bool>,
    /// `generation_config.json`'s `eos_token_id` (an id or a list of ids).
    pub generation_eos: Vec<u32>,
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).map_err(|e| {
            Error::Tokenizer(format!("{}: invalid JSON: {e}", path.display()))
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// A special token in `tokenizer_config.json`: a string, or an AddedToken object with `content`.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is the one
/// `apply_chat_template` uses when no name is given.
fn template_from(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |want: &str| {
                list.iter().find_map(|e| {
                    (e.get("name")?.as_str()? == want)
                        .then(|| e.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            named("default")
        }
        _ => None,
    }
}

fn ids_from(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

pub(crate) fn read_dir(dir: &Path) -> Result<HfFiles> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::MissingTokenizer(format!(
            "{} has no tokenizer.json",
            dir.display()
        )));
    }
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;

    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let cfg = |key: &str| config.as_ref().and_then(|c| c.get(key));

    // transformers prefers the standalone template file when both exist.
    let jinja_path = dir.join("chat_template.jinja");
    let chat_template = match std::fs::read_to_string(&jinja_path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let from_json = read_json(&dir.join("chat_template.json"))?
                .and_then(|j| template_from(j.get("chat_template")));
            from_json.or_else(|| template_from(cfg("chat_template")))
        }
        Err(e) => return Err(Error::io(jinja_path, e)),
    };

    let generation = read_json(&dir.join("generation_config.json"))?;
    Ok(HfFiles {
        tokenizer,
        chat_template,
        bos: token_string(cfg("bos_token")),
        eos: token_string(cfg("eos_token")),
        unk: token_string(cfg("unk_token")),
        pad: token_string(cfg("pad_token")),
        add_bos: cfg("add_bos_token").and_then(Json::as_bool),
        generation_eos: ids_from(generation.as_ref().and_then(|g| g.get("eos_token_id"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn special_token_forms() {
        assert_eq!(token_string(Some(&json!("<s>"))), Some("<s>".into()));
        assert_eq!(
            token_string(Some(&json!({"content": "<eos>", "lstrip": false}))),
            Some("<eos>".into())
        );
        assert_eq!(token_string(Some(&json!(null))), None);
    }

    #[test]
    fn template_forms() {
        assert_eq!(template_from(Some(&json!("x"))), Some("x".into()));
        let list =
            json!([{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]);
        assert_eq!(template_from(Some(&list)), Some("d".into()));
    }

    #[test]
    fn eos_ids_forms() {
        assert_eq!(ids_from(Some(&json!(7))), vec![7]);
        assert_eq!(ids_from(Some(&json!([1, 106]))), vec![1, 106]);
        assert!(ids_from(None).is_empty());
    }

    #[test]
    fn missing_tokenizer_json() {
        let dir = std::env::temp_dir().join("pgate-no-tokenizer-here");
        let _ = std::fs::create_dir_all(&dir);
        assert!(matches!(read_dir(&dir), Err(Error::MissingTokenizer(_))));
    }
}
