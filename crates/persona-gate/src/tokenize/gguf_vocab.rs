//! Reading a tokenizer out of GGUF metadata, and building the byte-level BPE ("gpt2") kind.
//!
//! A GGUF file carries no `tokenizer.json`: llama.cpp stores the vocabulary, merges, scores, token
//! types and special ids under `tokenizer.ggml.*`, and names the pre-tokenizer (the regex that cuts
//! text into words before merging) only by a short tag such as `qwen2` or `smollm`. We rebuild the
//! pipeline Hugging Face uses for that tag, because the model was trained on exactly those splits:
//! Qwen2 and SmolLM2 differ in how digits are cut, and a different cut gives different ids.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// What llama.cpp's `tokenizer.ggml.token_type` says a token is. The numbering is SentencePiece's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Normal,
    Unknown,
    /// Chat markers, BOS/EOS: matched whole in text, skipped by `decode(.., skip_special = true)`.
    Control,
    /// Matched whole in text but decoded like text (Qwen's `<tool_call>`, Gemma's runs of spaces).
    UserDefined,
    /// Padding rows llama.cpp adds so the vocabulary matches the embedding (`[PAD151665]`).
    Unused,
    /// SentencePiece byte-fallback tokens `<0x00>`..`<0xFF>`.
    Byte,
}

impl TokenKind {
    fn from_gguf(code: i64) -> Self {
        match code {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            // 1 is normal; anything else is unknown to llama.cpp too, which treats it as text.
            _ => TokenKind::Normal,
        }
    }

    /// Whether Hugging Face treats the token as special, i.e. drops it when decoding with
    /// `skip_special_tokens`.
    pub(crate) fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }
}

/// The tokenizer metadata of one GGUF file, read once into owned values.
#[derive(Debug, Clone)]
pub(crate) struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer tag, if the file names one.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub kinds: Vec<TokenKind>,
    pub scores: Option<Vec<f32>>,
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub eom_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

type Metadata = HashMap<String, Value>;

fn bad_key(key: &str, what: &str, v: &Value) -> Error {
    Error::Tokenizer(format!(
        "GGUF key {key} should be {what}, found {:?}",
        v.value_type()
    ))
}

fn get_str<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(bad_key(key, "a string", v)),
    }
}

/// Any integer kind: converters disagree on whether ids are u32, i32 or u64.
fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

/// A token id, dropped when out of range: some converters write -1 or a stale id for "none".
fn get_id(md: &Metadata, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            let id = value_as_i64(v).ok_or_else(|| bad_key(key, "an integer", v))?;
            Ok((id >= 0 && (id as usize) < n_vocab).then_some(id as u32))
        }
    }
}

fn get_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => value_as_i64(v)
            .map(|x| Some(x != 0))
            .ok_or_else(|| bad_key(key, "a bool", v)),
    }
}

fn get_array<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a [Value]>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a.as_slice())),
        Some(v) => Err(bad_key(key, "an array", v)),
    }
}

fn strings(key: &str, values: &[Value]) -> Result<Vec<String>> {
    values
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            v => Err(bad_key(key, "an array of strings", v)),
        })
        .collect()
}

impl GgufVocab {
    /// Reads every `tokenizer.*` key we use. Fails with [`Error::MissingTokenizer`] when the file has
    /// no vocabulary at all (a weights-only GGUF), so the caller can point the user at a
    /// `tokenizer.json` instead.
    pub(crate) fn from_metadata(md: &Metadata) -> Result<Self> {
        let model = get_str(md, "tokenizer.ggml.model")?;
        let tokens = get_array(md, "tokenizer.ggml.tokens")?;
        let (model, tokens) = match (model, tokens) {
            (Some(m), Some(t)) if !t.is_empty() => (m.to_string(), t),
            _ => {
                return Err(Error::MissingTokenizer(
                    "the GGUF metadata has no tokenizer.ggml.model / tokenizer.ggml.tokens; \
                     load the tokenizer from the model's Hugging Face directory (tokenizer.json)"
                        .into(),
                ))
            }
        };
        let tokens = strings("tokenizer.ggml.tokens", tokens)?;
        let n = tokens.len();

        let kinds = match get_array(md, "tokenizer.ggml.token_type")? {
            None => vec![TokenKind::Normal; n],
            Some(a) if a.len() == n => a
                .iter()
                .map(|v| {
                    value_as_i64(v)
                        .map(TokenKind::from_gguf)
                        .ok_or_else(|| bad_key("tokenizer.ggml.token_type", "integers", v))
                })
                .collect::<Result<_>>()?,
            Some(a) => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    a.len()
                )))
            }
        };

        let scores = match get_array(md, "tokenizer.ggml.scores")? {
            None => None,
            Some(a) if a.len() == n => Some(
                a.iter()
                    .map(|v| match v {
                        Value::F32(x) => Ok(*x),
                        Value::F64(x) => Ok(*x as f32),
                        v => Err(bad_key("tokenizer.ggml.scores", "floats", v)),
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(a) => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer.ggml.scores has {} entries for {n} tokens",
                    a.len()
                )))
            }
        };

        let merges = get_array(md, "tokenizer.ggml.merges")?
            .map(|a| strings("tokenizer.ggml.merges", a))
            .transpose()?;

        Ok(GgufVocab {
            model,
            pre: get_str(md, "tokenizer.ggml.pre")?.map(str::to_string),
            kinds,
            scores,
            merges,
            bos_id: get_id(md, "tokenizer.ggml.bos_token_id", n)?,
            eos_id: get_id(md, "tokenizer.ggml.eos_token_id", n)?,
            eot_id: get_id(md, "tokenizer.ggml.eot_token_id", n)?,
            eom_id: get_id(md, "tokenizer.ggml.eom_token_id", n)?,
            pad_id: get_id(md, "tokenizer.ggml.padding_token_id", n)?,
            unk_id: get_id(md, "tokenizer.ggml.unknown_token_id", n)?,
            add_bos: get_bool(md, "tokenizer.ggml.add_bos_token")?,
            add_space_prefix: get_bool(md, "tokenizer.ggml.add_space_prefix")?,
            chat_template: get_str(md, "tokenizer.chat_template")?.map(str::to_string),
            tokens,
        })
    }

    /// The text of a token id.
    pub(crate) fn token(&self, id: Option<u32>) -> Option<(String, u32)> {
        let id = id?;
        Some((self.tokens.get(id as usize)?.clone(), id))
    }
}

/// Qwen2's split: like Llama-3's but digits one at a time (`\p{N}`, not `\p{N}{1,3}`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama-3's split (numbers in runs of up to three digits).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level vocabulary cuts text before merging, per `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteLevelPre {
    /// NFC, then Qwen2's regex, then bytes (Qwen2/2.5 `tokenizer.json`).
    Qwen2,
    /// Llama-3's regex, then bytes; whole words found in the vocabulary skip merging
    /// (`ignore_merges`, as in Llama-3's `tokenizer.json`).
    Llama3,
    /// Every digit on its own, then GPT-2's regex (SmolLM/StarCoder `tokenizer.json`).
    DigitsThenGpt2,
    /// GPT-2's regex.
    Gpt2,
}

impl ByteLevelPre {
    fn from_tag(tag: Option<&str>) -> Result<Self> {
        Ok(match tag {
            Some("qwen2") | Some("deepseek-r1-qwen") => ByteLevelPre::Qwen2,
            Some("llama3") | Some("llama-bpe") | Some("llama-v3") | Some("smaug-bpe") => {
                ByteLevelPre::Llama3
            }
            Some("smollm") | Some("starcoder") | Some("refact") => ByteLevelPre::DigitsThenGpt2,
            None | Some("default") | Some("gpt-2") | Some("gpt2") | Some("phi-2") => {
                ByteLevelPre::Gpt2
            }
            Some(other) => {
                // Guessing would give plausible but wrong ids, which is worse than stopping here.
                return Err(Error::Unsupported(format!(
                    "GGUF pre-tokenizer '{other}' (supported: qwen2, deepseek-r1-qwen, llama3, \
                     llama-bpe, smaug-bpe, smollm, starcoder, refact, gpt-2, default); load the \
                     tokenizer from the model's tokenizer.json instead"
                )));
            }
        })
    }
}

/// Builds the byte-level BPE tokenizer of a "gpt2" GGUF with the `tokenizers` crate, so that merging
/// and added-token matching are Hugging Face's own code.
pub(crate) fn byte_level_bpe(v: &GgufVocab) -> Result<Tokenizer> {
    let pre = ByteLevelPre::from_tag(v.pre.as_deref())?;
    let merges = v.merges.as_ref().ok_or_else(|| Error::MissingMetadata {
        what: "tokenizer.ggml.merges (a byte-level BPE tokenizer needs its merges)".into(),
    })?;
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("malformed merge '{m}' in GGUF")))
        })
        .collect::<Result<Vec<_>>>()?;
    // Later duplicates must not steal an earlier id: keep the first, as llama.cpp does.
    let mut vocab = Vocab::with_capacity(v.tokens.len());
    for (id, t) in v.tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == ByteLevelPre::Llama3)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE from GGUF: {e}")))?;

    let mut tok = Tokenizer::new(bpe);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?
        .into())
    };
    let bytes_only: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        ByteLevelPre::Qwen2 => Sequence::new(vec![split(QWEN2_SPLIT)?, bytes_only]).into(),
        ByteLevelPre::Llama3 => Sequence::new(vec![split(LLAMA3_SPLIT)?, bytes_only]).into(),
        ByteLevelPre::DigitsThenGpt2 => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        ByteLevelPre::Gpt2 => ByteLevel::new(false, true, true).into(),
    };
    if pre == ByteLevelPre::Qwen2 {
        tok.with_normalizer(Some(NFC));
    }
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevel::default()));

    // Control tokens are special (skipped on decode); user-defined ones are plain added tokens. Both
    // are matched in the raw text, before normalization, as in the models' tokenizer.json.
    let special: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(&v.kinds)
        .filter(|(t, k)| k.is_special() && !t.is_empty())
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    let user: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(&v.kinds)
        .filter(|(t, k)| **k == TokenKind::UserDefined && !t.is_empty())
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.to_string())
    }

    /// A toy byte-level vocabulary: enough to check splitting, merges and added tokens.
    fn toy(pre: &str) -> Metadata {
        let tokens = [
            "a", "b", "ab", "Ġ", "Ġab", "1", "2", "12", "<|end|>", "<tool>",
        ];
        let kinds = [1, 1, 1, 1, 1, 1, 1, 1, 3, 4];
        let merges = ["a b", "Ġ ab", "1 2"];
        let mut md = Metadata::new();
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s(pre));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(kinds.iter().map(|k| Value::I32(*k)).collect()),
        );
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        );
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(8));
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::I32(-1));
        md
    }

    #[test]
    fn reads_ids_and_drops_out_of_range() {
        let v = GgufVocab::from_metadata(&toy("qwen2")).unwrap();
        assert_eq!(v.eos_id, Some(8));
        assert_eq!(v.bos_id, None);
        assert_eq!(v.kinds[8], TokenKind::Control);
        assert_eq!(v.kinds[9], TokenKind::UserDefined);
    }

    #[test]
    fn digits_split_depends_on_pre_tag() {
        let enc = |pre: &str, text: &str| {
            let v = GgufVocab::from_metadata(&toy(pre)).unwrap();
            let t = byte_level_bpe(&v).unwrap();
            t.encode(text, false).unwrap().get_ids().to_vec()
        };
        // Qwen2 cuts digits one by one; GPT-2's regex keeps "12" together so the merge applies.
        assert_eq!(enc("qwen2", "12"), vec![5, 6]);
        assert_eq!(enc("gpt-2", "12"), vec![7]);
        assert_eq!(enc("smollm", "12"), vec![5, 6]);
        assert_eq!(enc("qwen2", "ab ab<|end|><tool>"), vec![2, 4, 8, 9]);
    }

    #[test]
    fn unknown_pre_tag_is_an_error() {
        let v = GgufVocab::from_metadata(&toy("no-such-pre")).unwrap();
        assert!(matches!(byte_level_bpe(&v), Err(Error::Unsupported(_))));
    }

    #[test]
    fn empty_metadata_is_missing_tokenizer() {
        assert!(matches!(
            GgufVocab::from_metadata(&Metadata::new()),
            Err(Error::MissingTokenizer(_))
        ));
    }
}
