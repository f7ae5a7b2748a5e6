//! Fuzz targets of the server's parsers of untrusted input (issue 17): the presets TOML and the
//! chat-completions request body. The harness is persona-gate's (`fuzz_support`): seeded
//! mutations for `PGATE_FUZZ_SECS` seconds (default 8) per target; a panic or an error of more
//! than one line fails. Run longer with e.g.
//! `PGATE_FUZZ_SECS=600 cargo test --release -p persona-gate-serve --test fuzz_parsers`.

#[path = "../../persona-gate/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use fuzz_support::{one_line, run, Target};
use persona_gate_serve::openai::{flatten_messages, parse_chat_request};
use persona_gate_serve::PresetFile;

const PRESETS_SEED: &str = r#"
[presets.default]
description = "the model's own default persona"

[presets.friendly]
system = "You are a friendly assistant."

[presets.compliant]
description = "compliant persona steering (collapses refusal)"
add = ["compliant:8@10-14"]
add_raw = ["compliant[3]:0.5@2/prompt"]
ablate = ["refusal[21]@0-27"]
cap = ["compliant:-5:5@10-14/generated"]
plan = "plan.toml"
guard = "block"
output_guard = "monitor"
"#;

#[test]
fn fuzz_preset_toml() {
    let dict: &[&[u8]] = &[
        b"[presets.",
        b"]\n",
        b"add = [\"",
        b"\"]\n",
        b"@0-999999999999",
        b"guard = \"off\"\n",
        b"\n",
        b"\"\\n\"",
        b"[[[[[[",
        b"nan",
        b"1e39",
        b"\xc3\xa9",
        b"'''",
        b"= {",
    ];
    run(
        Target {
            name: "preset_toml",
            seeds: vec![PRESETS_SEED.as_bytes().to_vec(), b"".to_vec()],
            dict,
            generate: None,
            max_len: 4096,
        },
        |b| match PresetFile::parse(&String::from_utf8_lossy(b)) {
            Ok(_) => Ok(true),
            Err(e) => one_line(e.to_string()),
        },
    );
}

#[test]
fn fuzz_chat_request() {
    let seeds = [
        r#"{"model":"default","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"x","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_tokens":16,"temperature":0.7,"top_p":0.9,"seed":3,"n":1,"stream":true,"stream_options":{"include_usage":true},"stop":["\n","é"],"preset":"friendly"}"#,
        r#"{"model":"m","messages":[{"role":"developer","content":null},{"role":"assistant","content":"a"},{"role":"user","content":"b"}],"stop":"END","max_completion_tokens":4}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let dict: &[&[u8]] = &[
        b"\"role\":",
        b"\"content\":",
        b"\"type\":\"image_url\"",
        b"\"max_tokens\":",
        b"18446744073709551616",
        b"-1",
        b"1e400",
        b"null",
        b"[",
        b"]",
        b"{",
        b"}",
        b"\\n",
        b"\\u0000",
        b"\\ud800",
        b"\"tool\"",
    ];
    run(
        Target {
            name: "chat_request",
            seeds,
            dict,
            generate: None,
            max_len: 4096,
        },
        |b| {
            let req = match parse_chat_request(b) {
                Ok(r) => r,
                Err(e) => return one_line(e.message),
            };
            match flatten_messages(&req.messages) {
                Ok(_) => Ok(true),
                Err(e) => one_line(e.message),
            }
        },
    );
}
