//! Tokenizers and chat templates: turning a conversation into exactly the ids the model was trained
//! on, and ids back into text.
//!
//! Why exactness matters here: refusal directions are read at the last prompt token (difference in
//! means, as in Arditi et al.), so a prompt that differs from the model's training format by one
//! token (a missing default system prompt, `<|im_start|>` cut into pieces, a doubled BOS) moves the
//! very activations being measured. Everything in this module is checked against ids and texts that
//! Hugging Face produced for the same model files (`tests/tokenizer_fixtures.rs`).
//!
//! Two sources are supported:
//! - GGUF metadata ([`ChatTokenizer::from_gguf_metadata`]): byte-level BPE vocabularies ("gpt2":
//!   Qwen2, SmolLM2, Llama-3) are rebuilt with the `tokenizers` crate and the pre-tokenizer their
//!   `tokenizer.json` uses; SentencePiece vocabularies ("llama": Gemma-3) run through a small
//!   SentencePiece-BPE encoder over the scored pieces (see `spm.rs`).
//! - A Hugging Face directory ([`ChatTokenizer::from_hf_dir`]): `tokenizer.json` as is, plus the chat
//!   metadata transformers keeps in side files.
//!
//! [`ChatTokenizer::encode`] never adds BOS: the chat template writes it when the model wants it, and
//! adding it again would give the model a sequence it never saw.

mod chat_template;
mod gguf_vocab;
mod hf_dir;
mod special;
mod spm;
mod untrusted;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use chat_template::{ChatTemplate, TemplateTokens};
use gguf_vocab::{GgufVocab, TokenKind};
use spm::SpmTokenizer;

/// One turn of a conversation, in the `{role, content}` shape chat templates iterate over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "system".into(),
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// End-of-turn markers of the common chat formats. Generation must stop on them even when the file
/// names only one EOS (a GGUF of an instruct model usually names `<|im_end|>` but not
/// `<|endoftext|>`; Llama-3 names `<|end_of_text|>` but chats end with `<|eot_id|>`).
const END_OF_TURN_TOKENS: [&str; 7] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
];

enum Backend {
    /// The `tokenizers` pipeline: byte-level BPE rebuilt from GGUF, or any `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
    /// SentencePiece BPE over a GGUF's scored pieces.
    Spm(Box<SpmTokenizer>),
}

struct Inner {
    backend: Backend,
    template: Option<ChatTemplate>,
    template_tokens: TemplateTokens,
    bos: Option<(String, u32)>,
    eos_id: Option<u32>,
    add_bos: bool,
    stop_ids: Vec<u32>,
    vocab_size: usize,
    vocab_sha256: OnceLock<String>,
    /// Built on first use by [`untrusted`]: the control tokens' texts, and (for the `tokenizers`
    /// backend) a copy of the pipeline that reads them as plain text.
    untrusted: OnceLock<untrusted::PlainText>,
}

/// A model's tokenizer together with its chat template and end-of-turn tokens.
///
/// Cheap to clone (shared behind an `Arc`) so generation threads and decode streams can each hold
/// one.
#[derive(Clone)]
pub struct ChatTokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field(
                "backend",
                &match self.inner.backend {
                    Backend::Hf(_) => "tokenizers",
                    Backend::Spm(_) => "sentencepiece-bpe",
                },
            )
            .field("vocab_size", &self.inner.vocab_size)
            .field("bos", &self.inner.bos)
            .field("eos_id", &self.inner.eos_id)
            .field("stop_ids", &self.inner.stop_ids)
            .field("chat_template", &self.inner.template.is_some())
            .finish()
    }
}

/// Appends `id` unless already there: keeps the stop list in priority order without repeats.
fn push_unique(list: &mut Vec<u32>, id: u32) {
    if !list.contains(&id) {
        list.push(id);
    }
}

impl ChatTokenizer {
    /// Builds the tokenizer a GGUF file describes (`Content.metadata`). Fails with
    /// [`Error::MissingTokenizer`] when the file carries no vocabulary.
    pub fn from_gguf_metadata(md: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        let v = GgufVocab::from_metadata(md)?;
        let backend = match v.model.as_str() {
            "gpt2" => Backend::Hf(Box::new(gguf_vocab::byte_level_bpe(&v)?)),
            "llama" => Backend::Spm(Box::new(SpmTokenizer::from_gguf(&v)?)),
            other => {
                return Err(Error::Unsupported(format!(
                    "GGUF tokenizer model '{other}' (supported: gpt2, llama); load the tokenizer \
                     from the model's tokenizer.json instead"
                )))
            }
        };

        let mut stop_ids = Vec::new();
        for id in [v.eos_id, v.eot_id, v.eom_id].into_iter().flatten() {
            push_unique(&mut stop_ids, id);
        }
        for name in END_OF_TURN_TOKENS {
            let found = v
                .tokens
                .iter()
                .zip(&v.kinds)
                .position(|(t, k)| t == name && *k != TokenKind::Normal);
            if let Some(id) = found {
                push_unique(&mut stop_ids, id as u32);
            }
        }

        let text = |id: Option<u32>| v.token(id).map(|(t, _)| t);
        let template_tokens = TemplateTokens {
            bos: text(v.bos_id),
            eos: text(v.eos_id),
            unk: text(v.unk_id),
            pad: text(v.pad_id),
        };
        // llama.cpp's defaults when the flag is absent: SentencePiece models want BOS, byte-level
        // ones do not.
        let add_bos = v.add_bos.unwrap_or(v.model == "llama");
        Ok(Self::assemble(
            backend,
            v.chat_template.clone(),
            template_tokens,
            v.token(v.bos_id),
            v.eos_id,
            add_bos,
            stop_ids,
            v.tokens.len(),
        ))
    }

    /// Builds the tokenizer of a Hugging Face model directory: `tokenizer.json`, with the chat
    /// template and special tokens from `chat_template.jinja` / `tokenizer_config.json` and extra
    /// end-of-turn ids from `generation_config.json` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let f = hf_dir::read_dir(dir)?;
        let tok = f.tokenizer;
        let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_to_id(t));
        let bos = f.bos.clone().zip(id_of(&f.bos));
        let eos_id = id_of(&f.eos);

        let added = tok.get_added_tokens_decoder();
        let mut stop_ids = Vec::new();
        for id in eos_id.into_iter().chain(f.generation_eos.iter().copied()) {
            push_unique(&mut stop_ids, id);
        }
        for name in END_OF_TURN_TOKENS {
            if let Some(id) = tok.token_to_id(name).filter(|id| added.contains_key(id)) {
                push_unique(&mut stop_ids, id);
            }
        }

        // Without an explicit flag, ask the pipeline itself: does its post-processor put BOS first?
        let add_bos = f.add_bos.unwrap_or_else(|| match &bos {
            Some((_, bos_id)) => tok
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(bos_id))
                .unwrap_or(false),
            None => false,
        });
        let vocab_size = tok
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |m| *m as usize + 1);
        let template_tokens = TemplateTokens {
            bos: f.bos,
            eos: f.eos,
            unk: f.unk,
            pad: f.pad,
        };
        Ok(Self::assemble(
            Backend::Hf(Box::new(tok)),
            f.chat_template,
            template_tokens,
            bos,
            eos_id,
            add_bos,
            stop_ids,
            vocab_size,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        backend: Backend,
        template: Option<String>,
        template_tokens: TemplateTokens,
        bos: Option<(String, u32)>,
        eos_id: Option<u32>,
        add_bos: bool,
        stop_ids: Vec<u32>,
        vocab_size: usize,
    ) -> Self {
        ChatTokenizer {
            inner: Arc::new(Inner {
                backend,
                template: template
                    .filter(|t| !t.trim().is_empty())
                    .map(ChatTemplate::new),
                template_tokens,
                bos,
                eos_id,
                add_bos,
                stop_ids,
                vocab_size,
                vocab_sha256: OnceLock::new(),
                untrusted: OnceLock::new(),
            }),
        }
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (chat template, BOS/EOS) into `dir`, so
    /// an exported model directory loads with [`ChatTokenizer::from_hf_dir`] and with transformers.
    /// SentencePiece vocabularies read from GGUF have no `tokenizer.json` form here yet.
    pub fn save_hf_files(&self, dir: &Path) -> Result<()> {
        let tok = match &self.inner.backend {
            Backend::Hf(t) => t,
            Backend::Spm(_) => {
                return Err(Error::Unsupported(
                    "writing tokenizer.json for a SentencePiece (gemma) vocabulary".into(),
                ))
            }
        };
        let path = dir.join("tokenizer.json");
        tok.save(&path, false)
            .map_err(|e| Error::Tokenizer(format!("writing {}: {e}", path.display())))?;
        let tt = &self.inner.template_tokens;
        let mut cfg = serde_json::json!({
            "add_bos_token": self.inner.add_bos,
            "bos_token": tt.bos,
            "eos_token": tt.eos,
            "unk_token": tt.unk,
            "pad_token": tt.pad,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        if let Some(t) = self.chat_template_source() {
            cfg["chat_template"] = t.into();
        }
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)
            .map_err(|e| Error::io(&path, e))?;
        let gen = serde_json::json!({ "eos_token_id": self.inner.stop_ids });
        let path = dir.join("generation_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&gen)?).map_err(|e| Error::io(&path, e))
    }

    /// Token ids of `text`. Adds no BOS; special tokens written in the text (`<|im_start|>`,
    /// `<bos>`, `<start_of_turn>`) become their single ids, as with Hugging Face's
    /// `encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner.backend {
            Backend::Hf(t) => Ok(t
                .encode_fast(text, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Backend::Spm(s) => s.encode(text),
        }
    }

    /// Text of `ids`; with `skip_special`, control tokens (BOS, `<|im_end|>`, ...) are left out.
    /// Ids outside the vocabulary are skipped, as Hugging Face does.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.inner.backend {
            Backend::Hf(t) => t
                .decode(ids, skip_special)
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Backend::Spm(s) => Ok(s.decode(ids, skip_special)),
        }
    }

    /// Whether the model ships a chat template (base models usually do not).
    pub fn has_chat_template(&self) -> bool {
        self.inner.template.is_some()
    }

    /// The template's Jinja source, for receipts and debugging.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.inner.template.as_ref().map(ChatTemplate::source)
    }

    /// Renders the model's own chat template, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does. Without a system message, the template's default system
    /// prompt applies (Qwen's "You are Qwen, created by Alibaba Cloud..."), which is part of what the
    /// model conditions on.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.inner.template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(
                "the model has no chat template (a base model): use format_prompt".into(),
            )
        })?;
        tmpl.render(messages, add_generation_prompt, &self.inner.template_tokens)
    }

    /// The text generation feeds the model for an (optional) system prompt and a user message: the
    /// chat template with the generation prompt when there is one; for a base model, BOS (if the
    /// model expects one) + system + "\n\n" + user, the plainest continuation format.
    pub fn format_prompt(&self, system: Option<&str>, user: &str) -> Result<String> {
        if self.has_chat_template() {
            let mut messages = Vec::with_capacity(2);
            if let Some(s) = system {
                messages.push(ChatMessage::system(s));
            }
            messages.push(ChatMessage::user(user));
            return self.render_chat(&messages, true);
        }
        let mut out = String::new();
        if self.inner.add_bos {
            if let Some((bos, _)) = &self.inner.bos {
                out.push_str(bos);
            }
        }
        if let Some(s) = system {
            out.push_str(s);
            out.push_str("\n\n");
        }
        out.push_str(user);
        Ok(out)
    }

    /// The BOS token's text and id, if the vocabulary names one (whether the model wants it at the
    /// start of raw text is [`ChatTokenizer::adds_bos`]).
    pub fn bos_token(&self) -> Option<(&str, u32)> {
        self.inner.bos.as_ref().map(|(t, id)| (t.as_str(), *id))
    }

    /// Whether the model expects BOS at the start of a sequence (GGUF `add_bos_token`, or what the
    /// `tokenizer.json` post-processor does). [`ChatTokenizer::format_prompt`] honours it for base
    /// models; chat templates write BOS themselves when needed.
    pub fn adds_bos(&self) -> bool {
        self.inner.add_bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_id
    }

    /// Ids that end a generation: EOS first, then end-of-turn tokens the vocabulary has
    /// (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|endoftext|>`, ...), GGUF's `eot`/`eom` ids and
    /// `generation_config.json`'s list.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.inner.stop_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        match &self.inner.backend {
            Backend::Hf(t) => t.token_to_id(tok),
            Backend::Spm(s) => s.token_to_id(tok),
        }
    }

    /// The vocabulary's spelling of a token (byte-level `Ġthe`, SentencePiece `▁the`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner.backend {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm(s) => s.id_to_token(id).map(str::to_string),
        }
    }

    /// sha256 (hex) of the chat template's source, so a receipt pins the prompt format.
    pub fn chat_template_sha256(&self) -> Option<String> {
        self.chat_template_source()
            .map(|s| hex::encode(Sha256::digest(s.as_bytes())))
    }

    /// sha256 (hex) of the vocabulary, so a receipt pins the ids. Canonical form: the compact JSON
    /// array of [`ChatTokenizer::id_to_token`] for ids `0..vocab_size` (`null` for a gap), as
    /// `json.dumps(tokens, ensure_ascii=False, separators=(",", ":"))` would write it for ordinary
    /// tokens. Computed once, on first use.
    pub fn vocab_sha256(&self) -> String {
        self.inner
            .vocab_sha256
            .get_or_init(|| {
                let tokens: Vec<Option<String>> = (0..self.inner.vocab_size as u32)
                    .map(|id| self.id_to_token(id))
                    .collect();
                // Serializing strings and nulls cannot fail.
                let json = serde_json::to_string(&tokens).unwrap_or_default();
                hex::encode(Sha256::digest(json.as_bytes()))
            })
            .clone()
    }
}

/// Incremental detokenizer for streaming: push ids one at a time and get back the text they
/// complete.
///
/// Decoding token by token is wrong in two ways: a character split over byte tokens would come out
/// as U+FFFD, and SentencePiece decoders treat a leading space differently at the start of a
/// sequence. So each step decodes a short window of recent ids twice (without and with the new
/// ones) and emits only the difference, holding text back while it ends in an incomplete character.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    tokenizer: ChatTokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window that gives context to the next decode.
    prefix_offset: usize,
    /// End of the ids whose text was already emitted.
    read_offset: usize,
}

impl DecodeStream {
    pub fn new(tokenizer: &ChatTokenizer, skip_special: bool) -> Self {
        DecodeStream {
            tokenizer: tokenizer.clone(),
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one id; returns the newly completed text, or `None` while it is still waiting for the
    /// rest of a multi-byte character (or the id produced no text).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        self.step(false)
    }

    /// Emits whatever is still held back (an incomplete character at the end of generation comes
    /// out as U+FFFD, as a full decode would give).
    pub fn flush(&mut self) -> Result<Option<String>> {
        self.step(true)
    }

    fn step(&mut self, force: bool) -> Result<Option<String>> {
        let t = &self.tokenizer;
        let before = t.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let after = t.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if after.len() <= before.len() && !(force && after != before) {
            return Ok(None);
        }
        if !force && after.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        // Normally `before` is a prefix of `after`; when a byte run changes meaning (an invalid
        // sequence that later bytes do not repair), emit from where the two texts diverge.
        let common = before
            .char_indices()
            .zip(after.chars())
            .find(|((_, a), b)| a != b)
            .map_or(before.len().min(after.len()), |((i, _), _)| i);
        let new = after[common..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok((!new.is_empty()).then_some(new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value;

    fn s(x: &str) -> Value {
        Value::String(x.to_string())
    }

    /// A tiny SentencePiece vocabulary with byte pieces, enough to exercise the public API.
    fn spm_metadata(template: Option<&str>) -> HashMap<String, Value> {
        let mut toks: Vec<(String, f32, i32)> = vec![
            ("<pad>".into(), 0.0, 3),
            ("<eos>".into(), 0.0, 3),
            ("<bos>".into(), 0.0, 3),
            ("<end_of_turn>".into(), 0.0, 3),
            ("h".into(), -5.0, 1),
            ("i".into(), -6.0, 1),
            ("hi".into(), -1.0, 1),
            ("▁".into(), -7.0, 1),
        ];
        for b in 0..=255u8 {
            toks.push((format!("<0x{b:02X}>"), 0.0, 6));
        }
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), s("llama"));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.iter().map(|t| s(&t.0)).collect()),
        );
        md.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(toks.iter().map(|t| Value::F32(t.1)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(toks.iter().map(|t| Value::I32(t.2)).collect()),
        );
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(2));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        if let Some(t) = template {
            md.insert("tokenizer.chat_template".into(), s(t));
        }
        md
    }

    #[test]
    fn shareable_across_threads() {
        fn check<T: Clone + Send + Sync>() {}
        check::<ChatTokenizer>();
        check::<DecodeStream>();
    }

    #[test]
    fn no_tokenizer_keys_is_missing_tokenizer() {
        let mut md = HashMap::new();
        md.insert("general.architecture".into(), s("llama"));
        let err = ChatTokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(matches!(err, Error::MissingTokenizer(_)), "{err:?}");
    }

    #[test]
    fn base_model_prompt_and_stops() {
        let t = ChatTokenizer::from_gguf_metadata(&spm_metadata(None)).unwrap();
        assert!(!t.has_chat_template());
        assert_eq!(t.format_prompt(None, "hi").unwrap(), "<bos>hi");
        assert_eq!(t.format_prompt(Some("s"), "hi").unwrap(), "<bos>s\n\nhi");
        assert_eq!(t.bos_token(), Some(("<bos>", 2)));
        assert_eq!(t.stop_token_ids(), &[1, 3]);
        assert_eq!(t.encode("<bos>hi hi").unwrap(), vec![2, 6, 7, 6]);
        assert!(matches!(
            t.render_chat(&[ChatMessage::user("x")], true),
            Err(Error::ChatTemplate(_))
        ));
        assert_eq!(t.chat_template_sha256(), None);
        assert_eq!(t.vocab_sha256().len(), 64);
        assert_eq!(t.vocab_sha256(), t.clone().vocab_sha256());
    }

    #[test]
    fn template_sees_bos_and_messages() {
        let src = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}<end_of_turn>{% endfor %}{% if add_generation_prompt %}<model>{% endif %}";
        let t = ChatTokenizer::from_gguf_metadata(&spm_metadata(Some(src))).unwrap();
        assert_eq!(
            t.format_prompt(Some("be nice"), "hi").unwrap(),
            "<bos><system>be nice<end_of_turn><user>hi<end_of_turn><model>"
        );
        assert_eq!(
            t.chat_template_sha256().unwrap(),
            hex::encode(Sha256::digest(src.as_bytes()))
        );
    }

    #[test]
    fn decode_stream_holds_split_characters() {
        let t = ChatTokenizer::from_gguf_metadata(&spm_metadata(None)).unwrap();
        // "é" is not a piece: it is encoded as two byte pieces.
        let ids = t.encode("hi é hi").unwrap();
        let mut stream = DecodeStream::new(&t, false);
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(stream.push(id).unwrap());
        }
        assert!(
            pieces.contains(&None),
            "the first byte of é must be held back"
        );
        let text: String = pieces.into_iter().flatten().collect();
        assert_eq!(text, "hi é hi");
        assert_eq!(stream.flush().unwrap(), None);
    }

    #[test]
    fn decode_stream_flushes_an_incomplete_tail() {
        let t = ChatTokenizer::from_gguf_metadata(&spm_metadata(None)).unwrap();
        let lone = t.token_to_id("<0xC3>").unwrap();
        let mut stream = DecodeStream::new(&t, true);
        assert_eq!(stream.push(6).unwrap(), Some("hi".into()));
        assert_eq!(stream.push(lone).unwrap(), None);
        assert_eq!(stream.flush().unwrap(), Some("\u{FFFD}".into()));
    }
}
