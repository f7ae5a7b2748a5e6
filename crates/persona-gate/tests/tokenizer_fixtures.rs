//! The tokenizer and chat template against Hugging Face's output for the same GGUF files
//! (`../shared/fixtures/*/reference.json`): rendered prompts must match byte for byte and ids
//! exactly, because the refusal direction is read at the last prompt token.
//!
//! Models are real and must be present: a missing file fails the test with the command that fetches
//! it, rather than skipping, so a green run always means the real tokenizers were checked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Value};
use persona_gate::tokenize::{ChatMessage, ChatTokenizer, DecodeStream};
use persona_gate::Error;

fn models_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_MODELS_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("PGATE_CACHE") {
        return PathBuf::from(p).join("models");
    }
    let home = std::env::var_os("HOME").expect("HOME is not set (or set PGATE_MODELS_DIR)");
    PathBuf::from(home).join(".cache/persona-gate/models")
}

fn shared_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_SHARED") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn metadata(short: &str) -> HashMap<String, Value> {
    let path = models_dir().join(format!("{short}.gguf"));
    assert!(
        path.exists(),
        "model {} is missing: run scripts/setup-models.sh {short}",
        path.display()
    );
    let mut f = std::fs::File::open(&path).expect("open model");
    gguf_file::Content::read(&mut f)
        .unwrap_or_else(|e| panic!("{}: not a GGUF file: {e}", path.display()))
        .metadata
}

/// Builds the tokenizer and reports how long that took (release builds should stay well under 2 s).
fn tokenizer(short: &str) -> ChatTokenizer {
    let md = metadata(short);
    let t0 = Instant::now();
    let tok = ChatTokenizer::from_gguf_metadata(&md).expect("tokenizer from GGUF");
    eprintln!(
        "[tokenizer] {short}: built in {:.0} ms (vocab {})",
        t0.elapsed().as_secs_f64() * 1e3,
        tok.vocab_size()
    );
    tok
}

struct Fixture {
    prompts: Vec<String>,
    chat_texts: Vec<String>,
    input_ids: Vec<Vec<u32>>,
}

fn fixture(name: &str) -> Fixture {
    let path = shared_dir()
        .join("fixtures")
        .join(name)
        .join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} not readable ({e}); set PGATE_SHARED",
            path.display()
        )
    });
    let v: serde_json::Value = serde_json::from_str(&text).expect("fixture json");
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("fixture key {k}"))
            .iter()
            .map(|s| s.as_str().expect("string").to_string())
            .collect()
    };
    let input_ids = v["input_ids"]
        .as_array()
        .expect("input_ids")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        })
        .collect();
    Fixture {
        prompts: strings("prompts"),
        chat_texts: strings("chat_texts"),
        input_ids,
    }
}

/// Render (or base-model format), encode and decode every fixture prompt.
fn check_model(short: &str, chat: bool) {
    let tok = tokenizer(short);
    let fx = fixture(short);
    assert_eq!(
        tok.has_chat_template(),
        chat,
        "{short}: chat template presence"
    );
    assert!(!fx.prompts.is_empty());
    for (i, prompt) in fx.prompts.iter().enumerate() {
        let text = if chat {
            let rendered = tok
                .render_chat(&[ChatMessage::user(prompt.as_str())], true)
                .expect("render_chat");
            // format_prompt without a system prompt is the same rendering.
            assert_eq!(tok.format_prompt(None, prompt).unwrap(), rendered);
            rendered
        } else {
            tok.format_prompt(None, prompt).expect("format_prompt")
        };
        assert_eq!(text, fx.chat_texts[i], "{short}: prompt {i} rendered text");

        let t0 = Instant::now();
        let ids = tok.encode(&fx.chat_texts[i]).expect("encode");
        let dt = t0.elapsed();
        assert_eq!(ids, fx.input_ids[i], "{short}: prompt {i} ids");
        if i == 0 {
            eprintln!(
                "[tokenizer] {short}: encoded {} chars in {:.2} ms",
                text.len(),
                dt.as_secs_f64() * 1e3
            );
        }

        let back = tok.decode(&ids, false).expect("decode");
        assert_eq!(
            back, fx.chat_texts[i],
            "{short}: prompt {i} decode round trip"
        );

        // Streaming one id at a time gives the same text.
        let mut stream = DecodeStream::new(&tok, false);
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(piece) = stream.push(id).expect("stream push") {
                streamed.push_str(&piece);
            }
        }
        if let Some(rest) = stream.flush().expect("flush") {
            streamed.push_str(&rest);
        }
        assert_eq!(
            streamed, fx.chat_texts[i],
            "{short}: prompt {i} streamed decode"
        );

        // Without special tokens, the user's words are still there.
        let plain = tok.decode(&ids, true).expect("decode skip special");
        assert!(plain.contains(prompt.as_str()), "{short}: {plain:?}");
    }
}

#[test]
fn smollm2_matches_hf() {
    check_model("smollm2", true);
    let tok = tokenizer("smollm2");
    let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    assert!(tok.stop_token_ids().contains(&im_end));
    // SmolLM2 splits digits one by one (its tokenizer.json has a Digits pre-tokenizer).
    let ids = tok.encode("2024").unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
}

#[test]
fn q05_matches_hf() {
    check_model("q05", true);
    let tok = tokenizer("q05");
    assert_eq!(tok.eos_token_id(), tok.token_to_id("<|im_end|>"));
    // Special tokens are single ids and are dropped when asked.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids.first().copied(), tok.token_to_id("<|im_start|>"));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    // Qwen2 also splits digits one by one.
    assert_eq!(tok.encode("2024").unwrap().len(), 4);
}

#[test]
fn gemma3_matches_hf() {
    check_model("gemma3", false);
    let tok = tokenizer("gemma3");
    assert_eq!(tok.bos_token(), Some(("<bos>", 2)));
    assert!(tok.adds_bos());
    for name in ["<eos>", "<end_of_turn>"] {
        let id = tok.token_to_id(name).expect(name);
        assert!(tok.stop_token_ids().contains(&id), "{name} must stop");
    }
    // Characters outside the vocabulary go through byte pieces and come back intact.
    let text = "<start_of_turn>user\nTabs\tand  spaces, 🫩 emoji, ünïcödé 12345<end_of_turn>\n";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids[0], tok.token_to_id("<start_of_turn>").unwrap());
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn q15_system_prompt_and_stop_tokens() {
    let tok = tokenizer("q15");
    let sys = "You are a pirate.";
    let user = "Where is the treasure?";
    let rendered = tok
        .render_chat(&[ChatMessage::system(sys), ChatMessage::user(user)], true)
        .expect("render with system");
    let expected = format!(
        "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(rendered, expected);
    assert_eq!(tok.format_prompt(Some(sys), user).unwrap(), expected);

    // Without a system message the template's default one applies.
    let default = tok.render_chat(&[ChatMessage::user(user)], false).unwrap();
    assert!(default.starts_with(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    ));
    assert!(default.ends_with("<|im_end|>\n"));

    // A multi-turn conversation renders the assistant turn too.
    let multi = tok
        .render_chat(
            &[
                ChatMessage::user("a"),
                ChatMessage::assistant("b"),
                ChatMessage::user("c"),
            ],
            true,
        )
        .unwrap();
    assert!(multi.contains("<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"));

    let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    assert_eq!(im_end, 151645);
    assert!(tok.stop_token_ids().contains(&im_end));
    let ids = tok.encode(&rendered).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), rendered);

    assert_eq!(tok.chat_template_sha256().map(|h| h.len()), Some(64));
    assert_eq!(tok.vocab_sha256().len(), 64);
}

#[test]
fn receipts_hashes_tell_models_apart() {
    let a = tokenizer("q05");
    let b = tokenizer("smollm2");
    assert_ne!(a.vocab_sha256(), b.vocab_sha256());
    assert_ne!(a.chat_template_sha256(), b.chat_template_sha256());
    assert_eq!(tokenizer("gemma3").chat_template_sha256(), None);
}

#[test]
fn gguf_without_tokenizer_keys_is_missing_tokenizer() {
    let mut md = metadata("smollm2");
    md.retain(|k, _| !k.starts_with("tokenizer."));
    assert!(md.contains_key("general.architecture"));
    match ChatTokenizer::from_gguf_metadata(&md) {
        Err(Error::MissingTokenizer(msg)) => assert!(msg.contains("tokenizer"), "{msg}"),
        other => panic!("expected MissingTokenizer, got {other:?}"),
    }
}
