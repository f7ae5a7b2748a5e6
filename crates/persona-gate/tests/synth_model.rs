//! `pgate synth-model`: what it writes loads back (config, weights, tokenizer, chat template) and
//! generates; the weights depend on the seed only; and last-token logits of a left-padded batch
//! equal those of each prompt alone (what the GPU check compares with transformers).

use persona_gate::bench::last_token_logits;
use persona_gate::generate::{generate_chat, ChatPrompt, GenSettings};
use persona_gate::intervene::{InterventionPlan, LayerSet};
use persona_gate::model::synth::{write_synth_model, SynthOptions};
use persona_gate::model::{DTypeMode, LoadOptions, Model};
use std::sync::Arc;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-synth-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn load(dir: &std::path::Path) -> Model {
    Model::load(
        dir.to_str().unwrap(),
        &LoadOptions {
            dtype: DTypeMode::F32,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn synth_models_load_and_generate() {
    for like in ["llama-tiny", "qwen-tiny"] {
        let dir = tmp(like);
        let r = write_synth_model(like, &dir, &SynthOptions::default()).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(dir.join(f).is_file(), "{like}: {f} missing");
        }
        let model = load(&dir);
        assert_eq!(model.config().n_layers, r.config.n_layers);
        assert_eq!(model.config().vocab_size, r.config.vocab_size);
        assert_eq!(model.info.n_params, r.n_params);
        assert!(model.info.chat_template, "{like}: no chat template");
        assert!(!model.tokenizer.stop_token_ids().is_empty());
        // Byte-level round trip.
        let text = "Hello, world! héllo";
        let ids = model.tokenizer.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(model.tokenizer.decode(&ids, false).unwrap(), text);

        let settings = GenSettings {
            max_new_tokens: 8,
            ..Default::default()
        };
        let prompts = [
            ChatPrompt::new("Say hi."),
            ChatPrompt::new("A longer request, please."),
        ];
        let (out, stats) = generate_chat(&model, &prompts, &settings, None, |_, _| Ok(())).unwrap();
        assert_eq!(out.len(), 2);
        assert!(stats.decode_tokens > 0 || out.iter().all(|c| c.tokens.len() <= 1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn weights_depend_on_the_seed_only() {
    let (a, b, c) = (tmp("a"), tmp("b"), tmp("c"));
    let opts = SynthOptions {
        seed: 3,
        ..Default::default()
    };
    write_synth_model("qwen-tiny", &a, &opts).unwrap();
    write_synth_model("qwen-tiny", &b, &opts).unwrap();
    write_synth_model(
        "qwen-tiny",
        &c,
        &SynthOptions {
            seed: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let read = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn padded_batch_logits_match_single_prompts() {
    let dir = tmp("pad");
    write_synth_model("llama-tiny", &dir, &SynthOptions::default()).unwrap();
    let model = load(&dir);
    let prompts = vec![
        vec![5u32, 9, 77, 3],
        vec![11u32, 200, 6, 7, 8, 9, 10, 250, 1],
    ];
    let d = model.config().d_model;
    let plan = InterventionPlan::new()
        .add(
            LayerSet::single(0),
            (0..d).map(|i| (i as f32).sin()).collect(),
            4.0,
        )
        .ablate(
            LayerSet::single(1),
            (0..d).map(|i| (i as f32).cos()).collect(),
        );
    let compiled = Arc::new(
        plan.compile(2, d, model.decoder.dtype(), model.decoder.device())
            .unwrap(),
    );
    for p in [None, Some(compiled)] {
        let batch = last_token_logits(&model, &prompts, p.clone()).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let one = last_token_logits(&model, std::slice::from_ref(prompt), p.clone()).unwrap();
            let num: f64 = batch[i]
                .iter()
                .zip(&one[0])
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = one[0].iter().map(|b| (*b as f64).powi(2)).sum();
            assert!(
                (num / den).sqrt() < 1e-5,
                "prompt {i}: rel {}",
                (num / den).sqrt()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
