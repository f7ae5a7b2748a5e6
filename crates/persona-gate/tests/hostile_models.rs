//! Crafted model files (issue 17, "Loaders and specs"): every one is refused with one error line
//! naming the problem, never a panic, an abort or an allocation sized by the attacker. GGUF files
//! are built byte by byte here (no weights in the repository).

mod common;
mod fuzz_support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use fuzz_support::gguf::{tiny_llama, Gguf, T, V};
use persona_gate::model::gguf_check::{check_gguf_bytes, check_header};
use persona_gate::model::source::shard_path;
use persona_gate::model::synth::{write_synth_model, SynthOptions};
use persona_gate::model::weights::{check_safetensors_bytes, GgufWeights};
use persona_gate::model::{config_from_gguf, config_from_hf_json, DTypeMode, LoadOptions, Model};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// The error of `f`, checked: no panic, and one line.
fn error_of<T>(what: &str, f: impl FnOnce() -> persona_gate::Result<T>) -> String {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what}: panicked"));
    let e = match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains('\n'), "{what}: error is not one line: {e}");
    e
}

fn load(path: &Path) -> persona_gate::Result<Model> {
    Model::load(
        path.to_str().unwrap(),
        &LoadOptions {
            dtype: DTypeMode::F32,
            ..Default::default()
        },
    )
}

/// A crafted GGUF through `Model::load` (file on disk) and the in-memory checks; both must refuse
/// it with a message containing every needle.
fn assert_gguf_refused(name: &str, g: &Gguf, needles: &[&str]) {
    let p = tmp(&format!("{name}.gguf"));
    g.write(&p);
    let from_file = error_of(name, || load(&p));
    let in_memory = error_of(name, || check_gguf_bytes(&g.bytes()));
    for n in needles {
        assert!(from_file.contains(n), "{name}: '{n}' not in: {from_file}");
        assert!(in_memory.contains(n), "{name}: '{n}' not in: {in_memory}");
    }
}

#[test]
fn tiny_crafted_llama_passes_the_checks() {
    let cfg = check_gguf_bytes(&tiny_llama().bytes()).expect("the base of the crafted files");
    assert_eq!((cfg.n_layers, cfg.d_model, cfg.head_dim), (1, 8, 4));
}

#[test]
fn gguf_head_count_zero_is_an_error() {
    let g = tiny_llama().kv("llama.attention.head_count", V::U32(0));
    assert_gguf_refused("head_count_zero", &g, &["head count is 0"]);
}

#[test]
fn gguf_alignment_zero_is_an_error() {
    let g = tiny_llama().kv("general.alignment", V::U32(0));
    assert_gguf_refused("alignment_zero", &g, &["general.alignment = 0"]);
    let g = tiny_llama().kv("general.alignment", V::U32(48));
    assert_gguf_refused("alignment_48", &g, &["power of two"]);
    let g = tiny_llama().kv("general.alignment", V::I32(-32));
    assert_gguf_refused("alignment_negative", &g, &["general.alignment"]);
}

#[test]
fn gguf_zero_dimension_embedding_is_an_error() {
    let no_dims = T {
        name: "token_embd.weight".into(),
        dims: vec![],
        ty: 0,
        offset: Some(0),
    };
    let g = tiny_llama().raw_tensor(no_dims);
    assert_gguf_refused(
        "embedding_no_dims",
        &g,
        &["token_embd.weight", "0 dimensions"],
    );
    let g = tiny_llama().tensor("token_embd.weight", &[8, 0]);
    assert_gguf_refused("embedding_zero_rows", &g, &["token_embd.weight", "zero"]);
    let g = tiny_llama().tensor("token_embd.weight", &[8]);
    assert_gguf_refused("embedding_one_dim", &g, &["token_embd.weight", "shape [8]"]);
    let g = tiny_llama().tensor("token_embd.weight", &[16, 16]);
    assert_gguf_refused(
        "embedding_wrong_width",
        &g,
        &["16 wide", "embedding_length is 8"],
    );
}

#[test]
fn gguf_block_count_huge_is_an_error() {
    let g = tiny_llama().kv("llama.block_count", V::U32(0xFFFF_FFFF));
    assert_gguf_refused("block_count_huge", &g, &["n_layers = 4294967295", "1024"]);
    // Within the limit but more blocks than the file has tensors for.
    let g = tiny_llama().kv("llama.block_count", V::U32(900));
    assert_gguf_refused("block_count_900", &g, &["block_count is 900", "1 blocks"]);
    let g = tiny_llama().kv("llama.block_count", V::I32(-1));
    assert_gguf_refused("block_count_negative", &g, &["n_layers"]);
}

#[test]
fn gguf_tensor_past_the_file_end_is_an_error() {
    let far = T {
        name: "blk.0.attn_q.weight".into(),
        dims: vec![8, 8],
        ty: 0,
        offset: Some(1 << 40),
    };
    let g = tiny_llama().raw_tensor(far);
    assert_gguf_refused(
        "offset_past_end",
        &g,
        &["blk.0.attn_q.weight", "does not fit"],
    );
    let wrap = T {
        name: "blk.0.attn_q.weight".into(),
        dims: vec![8, 8],
        ty: 0,
        offset: Some(u64::MAX - 8),
    };
    assert_gguf_refused(
        "offset_wraps",
        &tiny_llama().raw_tensor(wrap),
        &["does not fit"],
    );
    let g = tiny_llama().tensor("blk.0.ffn_up.weight", &[1 << 32, 1 << 32, 1 << 8]);
    assert_gguf_refused("dims_overflow", &g, &["blk.0.ffn_up.weight", "overflowing"]);
    let g = tiny_llama().tensor("blk.0.ffn_up.weight", &[1 << 20, 1 << 20]);
    assert_gguf_refused(
        "dims_past_end",
        &g,
        &["blk.0.ffn_up.weight", "does not fit"],
    );
    // Q8_0 rows must be whole blocks of 32.
    let odd = T {
        name: "blk.0.ffn_up.weight".into(),
        dims: vec![8, 16],
        ty: 8,
        offset: Some(0),
    };
    let g = tiny_llama().raw_tensor(odd);
    assert_gguf_refused("partial_block", &g, &["not a multiple", "block of 32"]);
    // A truncated file.
    let bytes = tiny_llama().bytes();
    let p = tmp("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = error_of("truncated", || load(&p));
    assert!(e.contains("truncated") || e.contains("does not fit"), "{e}");
}

#[test]
fn gguf_heads_not_dividing_hidden_size_is_an_error() {
    let g = tiny_llama().kv("llama.attention.head_count", V::U32(3));
    assert_gguf_refused("heads_3_of_8", &g, &["hidden size 8", "3 attention heads"]);
}

#[test]
fn gguf_kv_heads_not_dividing_heads_is_an_error() {
    let g = tiny_llama().kv("llama.attention.head_count_kv", V::U32(3));
    assert_gguf_refused(
        "kv_heads_3_of_2",
        &g,
        &["cannot be grouped over 3 kv heads"],
    );
    let g = tiny_llama().kv("llama.attention.head_count_kv", V::U32(0));
    assert_gguf_refused("kv_heads_0", &g, &["n_kv_heads = 0"]);
}

#[test]
fn gguf_absurd_vocab_and_context_are_errors() {
    let g = tiny_llama().kv("llama.context_length", V::U64(1 << 40));
    assert_gguf_refused("context_2e40", &g, &["max_position = 1099511627776"]);
    let g = tiny_llama().kv("llama.embedding_length", V::U64(1 << 33));
    assert_gguf_refused("width_2e33", &g, &["d_model"]);
    let g = tiny_llama().kv("llama.feed_forward_length", V::U32(0));
    assert_gguf_refused("ffn_0", &g, &["d_ff = 0"]);
    let g = tiny_llama().kv("llama.rope.freq_base", V::F32(f32::NAN));
    assert_gguf_refused("rope_nan", &g, &["rope_theta"]);
    // A vocabulary past the limit needs a table that is not in the file.
    let g = tiny_llama().tensor("token_embd.weight", &[8, 1 << 23]);
    assert_gguf_refused("vocab_2e23", &g, &["token_embd.weight"]);
    let mut cfg = check_gguf_bytes(&tiny_llama().bytes()).unwrap();
    cfg.vocab_size = 1 << 30;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("vocab_size = 1073741824"), "{e}");
}

#[test]
fn gguf_huge_lengths_and_counts_are_errors() {
    let g = tiny_llama().kv("general.name", V::RawStr(u64::MAX, b"x".to_vec()));
    assert_gguf_refused("string_len_max", &g, &["general.name"]);
    let g = tiny_llama().kv("general.name", V::RawStr(1 << 30, b"x".to_vec()));
    assert_gguf_refused("string_len_1g", &g, &["general.name"]);
    let g = tiny_llama().kv("tokenizer.ggml.scores", V::RawArray(0, 1 << 40));
    assert_gguf_refused("array_len_2e40", &g, &["tokenizer.ggml.scores", "array of"]);
    // Fewer bytes left than the declared elements need at their smallest.
    let g = tiny_llama().kv("tokenizer.ggml.scores", V::RawArray(9, 1 << 20));
    assert_gguf_refused(
        "array_of_arrays_past_end",
        &g,
        &["tokenizer.ggml.scores", "bytes left"],
    );
    let mut g = tiny_llama();
    g.n_tensors = Some(u64::MAX);
    assert_gguf_refused("tensor_count_max", &g, &["tensors"]);
    let mut g = tiny_llama();
    g.n_kv = Some(1 << 20);
    assert_gguf_refused("kv_count_2e20", &g, &["metadata entries"]);
    let g = tiny_llama().kv("general.flag", V::Bool(7));
    assert_gguf_refused("bool_7", &g, &["bool"]);
    let mut g = tiny_llama();
    g.version = 99;
    assert_gguf_refused("version_99", &g, &["version 99"]);
    let dup = tiny_llama().tensors[1].clone();
    let mut g = tiny_llama();
    g.tensors.push(dup);
    assert_gguf_refused("duplicate_tensor", &g, &["appears twice"]);
}

#[test]
fn gguf_array_nesting_is_bounded() {
    // One metadata entry: an array of one array of one array ... 64 levels deep.
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata entries
    out.extend(4u64.to_le_bytes());
    out.extend(b"deep");
    out.extend(9u32.to_le_bytes());
    for _ in 0..64 {
        out.extend(9u32.to_le_bytes());
        out.extend(1u64.to_le_bytes());
    }
    out.resize(out.len() + 4096, 0);
    let e = check_header(&mut std::io::Cursor::new(&out), out.len() as u64).unwrap_err();
    assert!(e.contains("deeper than"), "{e}");
    let e = error_of("nested arrays", || check_gguf_bytes(&out));
    assert!(e.contains("deeper than"), "{e}");
}

#[test]
fn gguf_special_file_is_refused() {
    let e = error_of("/dev/zero", || load(Path::new("/dev/zero")));
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn real_model_headers_pass_the_bounded_reader() {
    for short in ["smollm2", "q05", "q15", "gemma3"] {
        let p = common::model_path(short);
        let g = GgufWeights::open(&p).unwrap_or_else(|e| panic!("{short}: {e}"));
        let cfg = config_from_gguf(&g.content).unwrap_or_else(|e| panic!("{short}: {e}"));
        assert!(cfg.n_layers > 0);
    }
}

// ---- Hugging Face directories: config.json, safetensors, index ----

fn synth_dir(name: &str) -> PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    let opts = SynthOptions {
        layers: Some(1),
        ..Default::default()
    };
    write_synth_model("llama-tiny", &d, &opts).unwrap();
    d
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(&p, v.to_string()).unwrap();
}

fn hf_config_text() -> String {
    serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 384, "max_position_embeddings": 2048
    })
    .to_string()
}

fn hf_config_with(key: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&hf_config_text()).unwrap();
    v[key] = value;
    v.to_string()
}

#[test]
fn hf_config_head_count_zero_is_an_error() {
    config_from_hf_json(&hf_config_text()).expect("the base config");
    let e = error_of("num_attention_heads 0", || {
        config_from_hf_json(&hf_config_with("num_attention_heads", 0.into()))
    });
    assert!(e.contains("head count is 0"), "{e}");
    let e = error_of("heads 3 of 64", || {
        config_from_hf_json(&hf_config_with("num_attention_heads", 3.into()))
    });
    assert!(e.contains("not divisible"), "{e}");
    let dir = synth_dir("heads0");
    edit_config(&dir, "num_attention_heads", 0.into());
    let e = error_of("synth heads 0", || load(&dir));
    assert!(e.contains("head count is 0"), "{e}");
}

#[test]
fn hf_config_absurd_sizes_are_errors() {
    for (key, v, needle) in [
        ("num_hidden_layers", 0xFFFF_FFFFu64, "n_layers = 4294967295"),
        ("vocab_size", 1 << 40, "vocab_size"),
        ("max_position_embeddings", 1 << 40, "max_position"),
        ("intermediate_size", 0, "d_ff = 0"),
    ] {
        let e = error_of(key, || config_from_hf_json(&hf_config_with(key, v.into())));
        assert!(e.contains(needle), "{key}: {e}");
    }
    let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0});
    let e = error_of("llama3 low = high", || {
        config_from_hf_json(&hf_config_with("rope_scaling", scaling))
    });
    assert!(e.contains("high_freq_factor > low_freq_factor"), "{e}");
    let e = error_of("not json", || config_from_hf_json("{\"model_type\": "));
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn hf_config_layers_without_weights_is_an_error() {
    let dir = synth_dir("layers3");
    edit_config(&dir, "num_hidden_layers", 3.into());
    let e = error_of("3 layers, weights for 1", || load(&dir));
    assert!(
        e.contains("num_hidden_layers is 3") && e.contains("model.layers.2."),
        "{e}"
    );
}

#[test]
fn safetensors_header_longer_than_the_file_is_an_error() {
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    let e = error_of("header 2^40", || check_safetensors_bytes(&bytes));
    assert!(e.contains("not a valid safetensors file"), "{e}");
    let mut bytes = 100u64.to_le_bytes().to_vec();
    bytes.extend(br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#);
    let e = error_of("header past end", || check_safetensors_bytes(&bytes));
    assert!(e.contains("not a valid safetensors file"), "{e}");
    let header = br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend([0u8; 16]);
    let e = error_of("shape overflow", || check_safetensors_bytes(&bytes));
    assert!(e.contains("not a valid safetensors file"), "{e}");
    // The same through a model directory.
    let dir = synth_dir("st_header");
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let e = error_of("synth header 2^40", || load(&dir));
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid"),
        "{e}"
    );
}

fn write_index(dir: &Path, shard: &str) {
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": { "model.embed_tokens.weight": shard, "lm_head.weight": "model.safetensors" }
    });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn safetensors_index_path_traversal_is_refused() {
    let dir = synth_dir("traversal");
    for shard in [
        "../../../../etc/hostname",
        "/etc/hostname",
        "a/../../x.safetensors",
        "",
    ] {
        write_index(&dir, shard);
        let e = error_of(shard, || load(&dir));
        assert!(
            e.contains("not a file inside the model directory"),
            "{shard}: {e}"
        );
    }
    // A symlink inside the directory that points outside it.
    let outside = tmp("outside.safetensors");
    std::fs::copy(dir.join("model.safetensors"), &outside).unwrap();
    let link = dir.join("evil.safetensors");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    write_index(&dir, "evil.safetensors");
    let e = error_of("symlink via index", || load(&dir));
    assert!(e.contains("outside the model directory"), "{e}");
    // ... and found by listing the directory (no index).
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    let e = error_of("symlink via listing", || load(&dir));
    assert!(e.contains("outside the model directory"), "{e}");
    std::fs::remove_file(&link).unwrap();
    load(&dir).expect("the directory loads once the link is gone");
}

#[test]
fn hub_cache_blob_links_stay_allowed() {
    // The Hugging Face cache layout: snapshot files are links into the repo's blob store.
    let root = tmp("hub/models--org--name");
    let _ = std::fs::remove_dir_all(&root);
    let snap = root.join("snapshots/abc");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::write(root.join("blobs/123"), b"x").unwrap();
    std::os::unix::fs::symlink("../../blobs/123", snap.join("model.safetensors")).unwrap();
    shard_path(&snap, "model.safetensors").expect("a blob link is inside the model");
}
