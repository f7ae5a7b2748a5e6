//! Fuzz targets of persona-gate's parsers of untrusted input (issue 17): GGUF headers, safetensors
//! headers, HF `config.json`, steering specs, intervention plans (JSON and TOML) and study files.
//! Each runs the seeded mutation loop of `fuzz_support` for `PGATE_FUZZ_SECS` seconds (default 8)
//! and fails on a panic or an error of more than one line. Run longer with e.g.
//! `PGATE_FUZZ_SECS=600 cargo test --release -p persona-gate --test fuzz`.

mod fuzz_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fuzz_support::gguf::{tiny_llama, V};
use fuzz_support::{one_line, run, Rng, Target, INTERESTING};
use persona_gate::directions::{DirectionSpec, PlanBuilder};
use persona_gate::model::config_from_hf_json;
use persona_gate::model::gguf_check::{check_gguf_bytes, read_content};
use persona_gate::model::limits::one_line_error;
use persona_gate::model::weights::check_safetensors_bytes;
use persona_gate::study::file::StudyFile;
use persona_gate::tokenize::ChatTokenizer;

/// `Ok(true)` for a parsed input, else the error checked to be one line.
fn verdict<T>(r: persona_gate::Result<T>) -> Result<bool, String> {
    match r {
        Ok(_) => Ok(true),
        Err(e) => one_line(e.to_string()),
    }
}

/// An empty folder for relative paths (so that fuzzed file names find nothing).
fn empty_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-fuzz-empty-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---- GGUF ----

const GGUF_KEYS: &[&str] = &[
    "general.alignment",
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.context_length",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "gemma3.attention.sliding_window",
    "gemma3.rope.scaling.factor",
];

/// A random value of a random type: the integers of [`INTERESTING`], negative ones, odd floats,
/// strings and arrays where numbers are expected.
fn gguf_value(rng: &mut Rng) -> V {
    let n = *rng.pick(INTERESTING);
    match rng.below(7) {
        0 => V::U32(n as u32),
        1 => V::I32(-(n as i32)),
        2 => V::U64(n),
        3 => V::F32(*rng.pick(&[0.0, -1.0, f32::NAN, f32::INFINITY, 1e30, 1e-30])),
        4 => V::Str("llama".into()),
        5 => V::I32s(vec![n as i32; rng.below(3)]),
        _ => V::RawArray(rng.below(13) as u32, n),
    }
}

/// A tiny model of a random family with a few metadata values and tensor shapes replaced.
fn gguf_generate(rng: &mut Rng) -> Vec<u8> {
    let arch = *rng.pick(&["llama", "qwen2", "gemma3", "mistral"]);
    let mut g = tiny_llama();
    for (k, _) in g.kv.iter_mut() {
        if let Some(rest) = k.strip_prefix("llama.") {
            *k = format!("{arch}.{rest}");
        }
    }
    g = g.kv("general.architecture", V::Str(arch.into()));
    for _ in 0..1 + rng.below(3) {
        let key = rng.pick(GGUF_KEYS).replace("llama.", &format!("{arch}."));
        g = g.kv(&key, gguf_value(rng));
    }
    if rng.chance(3) {
        let i = rng.below(g.tensors.len());
        let dims = (0..rng.below(5))
            .map(|_| *rng.pick(INTERESTING) % 64)
            .collect();
        g.tensors[i].dims = dims;
        g.tensors[i].ty = *rng.pick(&[0u32, 1, 2, 8, 12, 14, 30, 99]);
    }
    g.bytes()
}

#[test]
fn fuzz_gguf_header() {
    let mut qwen = tiny_llama();
    for (k, _) in qwen.kv.iter_mut() {
        *k = k.replace("llama.", "qwen2.");
    }
    let qwen = qwen.kv("general.architecture", V::Str("qwen2".into()));
    let mut v2 = tiny_llama();
    v2.version = 2;
    let seeds = vec![tiny_llama().bytes(), qwen.bytes(), v2.bytes()];
    let dict: &[&[u8]] = &[
        b"GGUF",
        b"blk.",
        b"token_embd.weight",
        b"general.alignment",
        b"llama.",
    ];
    run(
        Target {
            name: "gguf_header",
            seeds,
            dict,
            generate: Some(&gguf_generate),
            max_len: 1 << 16,
        },
        gguf_check,
    );
}

/// Header, config and the tokenizer built from the metadata, as `Model::load` does before it
/// reads any tensor.
fn gguf_check(b: &[u8]) -> Result<bool, String> {
    if let Err(e) = check_gguf_bytes(b) {
        return one_line(e.to_string());
    }
    let c = read_content(&mut std::io::Cursor::new(b), Path::new("m.gguf"))
        .map_err(|e| format!("passed the checks, then failed: {e}"))?;
    match ChatTokenizer::from_gguf_metadata(&c.metadata).map_err(one_line_error) {
        Ok(t) => {
            let _ = t.encode("hello t1 é\n<|im_start|>");
            Ok(true)
        }
        Err(e) => one_line(e.to_string()),
    }
}

// ---- safetensors and config.json ----

fn safetensors_seed(tensors: &[(&str, safetensors::Dtype, Vec<usize>)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dt, shape)| vec![0x3c; shape.iter().product::<usize>() * dt.bitsize() / 8])
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, dt, shape), d)| {
            let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), d).unwrap();
            (n.to_string(), v)
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta)).unwrap()
}

/// Header checks, then every float tensor turned into a candle tensor as the loader does.
fn safetensors_check(b: &[u8]) -> Result<bool, String> {
    if let Err(e) = check_safetensors_bytes(b) {
        return one_line(e.to_string());
    }
    let st = safetensors::SafeTensors::deserialize(b).map_err(|e| e.to_string())?;
    for (_, view) in st.tensors() {
        let dt = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            _ => continue,
        };
        let t = Tensor::from_raw_buffer(view.data(), dt, view.shape(), &Device::Cpu);
        if let Ok(t) = t {
            let _ = t.to_dtype(DType::F32);
        }
    }
    Ok(true)
}

#[test]
fn fuzz_safetensors_header() {
    use safetensors::Dtype::{BF16, F16, F32, I64};
    let seeds = vec![
        safetensors_seed(&[
            ("model.embed_tokens.weight", F32, vec![4, 8]),
            ("model.norm.weight", BF16, vec![8]),
        ]),
        safetensors_seed(&[
            ("a", F16, vec![2, 3]),
            ("b", I64, vec![1]),
            ("c", F32, vec![0]),
        ]),
    ];
    let dict: &[&[u8]] = &[
        b"\"dtype\"",
        b"\"shape\"",
        b"\"data_offsets\"",
        b"[0,16]",
        b"\"BF16\"",
        b"4294967296",
        b"18446744073709551615",
        b"\"__metadata__\"",
    ];
    run(
        Target {
            name: "safetensors_header",
            seeds,
            dict,
            generate: None,
            max_len: 1 << 14,
        },
        safetensors_check,
    );
}

#[test]
fn fuzz_hf_config() {
    let llama = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 384, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    });
    let gemma = serde_json::json!({
        "model_type": "gemma3_text", "hidden_size": 640, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 18,
        "intermediate_size": 2048, "vocab_size": 262144, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": null, "rope_scaling": {"factor": 8.0}
    });
    let qwen = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_attention_heads": 14,
        "num_key_value_heads": 2, "num_hidden_layers": 24, "intermediate_size": 4864,
        "vocab_size": 151936, "use_sliding_window": true, "sliding_window": 0
    });
    let seeds = [llama, gemma, qwen]
        .iter()
        .map(|v| v.to_string().into_bytes())
        .collect();
    let dict: &[&[u8]] = &[
        b"0",
        b"-1",
        b"1e400",
        b"null",
        b"18446744073709551615",
        b"4294967295",
        b"\"text_config\":{",
        b"\"head_dim\":",
        b"\"num_attention_heads\":",
    ];
    run(
        Target {
            name: "hf_config",
            seeds,
            dict,
            generate: None,
            max_len: 1 << 12,
        },
        |b| verdict(config_from_hf_json(&String::from_utf8_lossy(b))),
    );
}

// ---- steering specs, plans, studies ----

const SPEC_DICT: &[&[u8]] = &[
    b"@",
    b":",
    b"-",
    b",",
    b"[",
    b"]",
    b"/prompt",
    b"/generated",
    b"999999999999",
    b"18446744073709551616",
    b"inf",
    b"NaN",
    b"-0",
    b"1e39",
    b"\n",
    b"\xc3\xa9",
    b"{",
    b"}",
];

#[test]
fn fuzz_steering_specs() {
    let seeds = [
        "compliant:8@10-14",
        "refusal[21]@0-27/prompt",
        "dir.safetensors:-5:5@3,10-12/generated",
        "x:4@5",
        "refusal[3]:-2:@0-1",
        "d::1@7",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    run(
        Target {
            name: "steering_specs",
            seeds,
            dict: SPEC_DICT,
            generate: None,
            max_len: 256,
        },
        |b| {
            let s = String::from_utf8_lossy(b);
            let mut parsed = false;
            type Parse = fn(&str) -> persona_gate::Result<DirectionSpec>;
            let parsers: [Parse; 4] = [
                DirectionSpec::parse_add,
                DirectionSpec::parse_add_raw,
                DirectionSpec::parse_ablate,
                DirectionSpec::parse_cap,
            ];
            for p in parsers {
                parsed |= verdict(p(&s))?;
            }
            let layers = s.rsplit_once('@').map_or(&*s, |(_, l)| l);
            parsed |= verdict(persona_gate::intervene::LayerSet::parse(layers))?;
            Ok(parsed)
        },
    );
}

/// A plan parsed from text, checked against a 4-layer, 8-wide model and compiled.
fn plan_check(text: &str, toml: bool, base: &Path) -> Result<bool, String> {
    let mut b = PlanBuilder::new();
    if let Err(e) = b.plan_text(text, toml, base, "fuzz-plan") {
        return one_line(e.to_string());
    }
    let plan = match b.finish(4, 8) {
        Ok(p) => p,
        Err(e) => return one_line(e.to_string()),
    };
    verdict(plan.compile(4, 8, DType::F32, &Device::Cpu))
}

const PLAN_DICT: &[&[u8]] = &[
    b"\"layers\":",
    b"\"0-999999999999\"",
    b"999999999999",
    b"\"op\":\"cap\"",
    b"\"lo\":",
    b"\"hi\":",
    b"1e39",
    b"-1e39",
    b"\"sites\":\"all\"",
    b"\"positions\":\"prompt\"",
    b"\"include_embedding\":true",
    b"[1,2,3]",
    b"{\"file\":\"nope.safetensors\",\"layer\":2}",
    b"\"raw\":true",
    b"0.0",
    b"\n",
];

#[test]
fn fuzz_plan_json() {
    let d = "[0.5,0.1,0.0,0.0,0.2,0.0,0.0,1.0]";
    let seeds = [
        format!(r#"{{"ops":[{{"op":"add","coeff":4.0,"layers":"1-2","direction":{d}}}]}}"#),
        format!(r#"{{"ops":[{{"op":"ablate","layers":[0,3],"positions":"generated","direction":{d},"sites":"all"}}]}}"#),
        format!(r#"{{"ops":[{{"op":"cap","lo":-1,"hi":2,"layers":2,"direction":{d},"name":"x"}},{{"op":"add","coeff":-2,"raw":true,"layers":"0","direction":{d}}}]}}"#),
        r#"{"ops":[{"op":"ablate","layers":"0-3","direction":"refusal.safetensors[2]"}]}"#.to_string(),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let base = empty_dir();
    run(
        Target {
            name: "plan_json",
            seeds,
            dict: PLAN_DICT,
            generate: None,
            max_len: 2048,
        },
        |b| plan_check(&String::from_utf8_lossy(b), false, &base),
    );
}

#[test]
fn fuzz_plan_toml() {
    let d = "[0.5, 0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 1.0]";
    let seeds = [
        format!("[[ops]]\nop = \"add\"\ncoeff = 4.0\nlayers = \"1-2\"\ndirection = {d}\n"),
        format!("[[ops]]\nop = \"cap\"\nlo = -1.0\nlayers = [0, 3]\npositions = \"prompt\"\ndirection = {d}\n\n[[ops]]\nop = \"ablate\"\nlayers = 2\ninclude_embedding = true\ndirection = {d}\n"),
        "[[ops]]\nop = \"ablate\"\nlayers = \"0-3\"\ndirection = { file = \"refusal.safetensors\", layer = 2 }\n".to_string(),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let dict: &[&[u8]] = &[
        b"layers = ",
        b"\"0-999999999999\"",
        b"[[ops]]\n",
        b"op = \"cap\"\n",
        b"hi = 1e39\n",
        b"nan",
        b"inf",
        b"[[[[[[[[",
        b"]]]]]]]]",
        b"\"\"\"",
        b"= {",
        b"}\n",
        b"\n",
        b"999999999999",
    ];
    let base = empty_dir();
    run(
        Target {
            name: "plan_toml",
            seeds,
            dict,
            generate: None,
            max_len: 2048,
        },
        |b| plan_check(&String::from_utf8_lossy(b), true, &base),
    );
}

const STUDY_SEED: &str = r#"version = 1
name = "demo"
baseline = "baseline"

[model]
spec = "smollm2"
dtype = "q"

[directions]
compliant = "directions/compliant.safetensors"
control = { random = 7 }
control_ortho = { random = 8, orthogonal_to = "compliant", like = "compliant" }

[prompts]
harmful = "demo_harmful"
harmless = { source = "demo_harmless", n = 8, skip = 0 }

[generation]
max_new_tokens = 128
batch_size = 8
temperature = 0.7
top_p = 1.0
seed = 0
samples = 2

[personas]
pirate = "You are a pirate captain."

[[condition]]
name = "baseline"

[[condition]]
name = "friendly"
persona = "pirate"

[[condition]]
name = "steer"
add = ["compliant:8@12"]
ablate = "control@3-5/prompt"
prompts = ["harmful"]

[[sweep]]
base = "steer"
name = "readd-L{layer}-c{coeff}"
add = "compliant:{coeff}@{layer}"
coeff = [4, 8.5]
layer = { range = [0, 27], step = 9 }

[[sweep]]
system = "window {w}"
cap = "compliant:-1:{{1}}@{w}"
w = { windows = [0, 27], width = 3, step = 3 }
"#;

#[test]
fn fuzz_study_toml() {
    let endpoint = "version = 1\n[model]\nendpoint = { base_url = \"http://127.0.0.1:8000/v1\", model = \"m\" }\n[prompts]\nh = \"demo_harmful\"\n[[condition]]\nname = \"baseline\"\n";
    let seeds = vec![STUDY_SEED.as_bytes().to_vec(), endpoint.as_bytes().to_vec()];
    let dict: &[&[u8]] = &[
        b"samples = 1000000000\n",
        b"{ range = [0, 1000000000000] }",
        b"{ windows = [0, 9223372036854775807], width = 1 }",
        b"step = 0",
        b"@0-999999999999",
        b"[[sweep]]\n",
        b"[[condition]]\nname = \"x\"\n",
        b"{x}",
        b"{{",
        b"}}",
        b"\n",
        b"\"\\n\"",
        b"-9223372036854775808",
        b"1e400",
        b"[[[[[[",
    ];
    let base = empty_dir();
    run(
        Target {
            name: "study_toml",
            seeds,
            dict,
            generate: None,
            max_len: 4096,
        },
        |b| {
            let f = match StudyFile::parse(&String::from_utf8_lossy(b), &base) {
                Ok(f) => f,
                Err(e) => return one_line(e.to_string()),
            };
            verdict(f.conditions())
        },
    );
}
