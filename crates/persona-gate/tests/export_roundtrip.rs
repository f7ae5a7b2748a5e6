//! The safetensors path and weight orthogonalization, on real models: a GGUF exported as a Hugging
//! Face directory loads back with the same tokens and logits, and a model with a direction
//! orthogonalized out of its weights generates exactly what run-time ablation generates.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use persona_gate::generate::{GenRequest, Generator, Sampling};
use persona_gate::intervene::{InterventionPlan, LayerSet, RowCtx};
use persona_gate::model::export::{export_hf_dir, ExportOptions};
use persona_gate::model::{DTypeMode, KvCache, LoadOptions, LogitsAt, Model, ModelSource};

fn f32_opts() -> LoadOptions {
    LoadOptions {
        dtype: DTypeMode::F32,
        device: Device::Cpu,
    }
}

fn tmp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn last_logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let rows = [RowCtx {
        seq: 0,
        chunk_pad: 0,
        start_pos: 0,
        prompt_len: ids.len(),
    }];
    let mut cache = KvCache::new(m.config().n_layers);
    let l = m
        .decoder
        .forward(&t, &rows, &mut cache, None, LogitsAt::Last)
        .unwrap()
        .unwrap();
    l.get(0).unwrap().to_vec1::<f32>().unwrap()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let n: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d).sqrt()
}

fn roundtrip(short: &str, fixture: &str) {
    let (r, _) = common::fixture(fixture);
    let gguf = common::model_path(short);
    let dir = tmp_dir(short);
    let rep = export_hf_dir(
        &ModelSource::Gguf(gguf.clone()),
        &dir,
        &ExportOptions::default(),
    )
    .unwrap();
    assert!(rep.tensors > 10);
    let a = Model::load(gguf.to_str().unwrap(), &f32_opts()).unwrap();
    let b = Model::load(dir.to_str().unwrap(), &f32_opts()).unwrap();
    assert_eq!(b.info.format, "safetensors");
    assert_eq!(a.config().n_layers, b.config().n_layers);
    let texts = r["chat_texts"].as_array().unwrap();
    for (i, ids) in common::ids(&r["input_ids"]).iter().enumerate() {
        let text = texts[i].as_str().unwrap();
        assert_eq!(
            &b.tokenizer.encode(text).unwrap(),
            ids,
            "{short}: tokenizer.json ids differ"
        );
        let prompt = r["prompts"][i].as_str().unwrap();
        let rendered = b.tokenizer.format_prompt(None, prompt).unwrap();
        assert_eq!(
            rendered, text,
            "{short}: exported chat template renders differently"
        );
        let e = rel(&last_logits(&b, ids), &last_logits(&a, ids));
        assert!(
            e < 1e-5,
            "{short} prompt {i}: exported model logits differ, rel {e:.2e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smollm2_exports_to_safetensors_and_loads_back_identically() {
    roundtrip("smollm2", "smollm2");
}

#[test]
fn qwen05_exports_to_safetensors_and_loads_back_identically() {
    roundtrip("q05", "q05");
}

/// Prompts: the six fixture prompts plus harmful and harmless validation instructions.
fn twenty_prompts() -> Vec<String> {
    let (r, _) = common::fixture("q05");
    let mut out: Vec<String> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    for f in ["harmful_val.json", "harmless_val.json"] {
        let text =
            std::fs::read_to_string(common::shared_dir().join("data/refusal_splits").join(f))
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        out.extend(
            v.as_array()
                .unwrap()
                .iter()
                .take(7)
                .map(|x| x["instruction"].as_str().unwrap().to_string()),
        );
    }
    assert_eq!(out.len(), 20);
    out
}

#[test]
fn orthogonalized_qwen05_equals_runtime_ablation_on_20_prompts() {
    let gguf = common::model_path("q05");
    let (_, st) = common::fixture("q05");
    let refs = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let dir_vec = refs["direction"].get(12).unwrap().to_vec1::<f32>().unwrap();
    let out = tmp_dir("q05-ortho");
    let rep = export_hf_dir(
        &ModelSource::Gguf(gguf.clone()),
        &out,
        &ExportOptions {
            bf16: false,
            orthogonalize: Some(dir_vec.clone()),
        },
    )
    .unwrap();
    assert!(rep.orthogonalized.iter().any(|n| n.contains("ffn_down")));

    let base = Model::load(gguf.to_str().unwrap(), &f32_opts()).unwrap();
    let ortho = Model::load(out.to_str().unwrap(), &f32_opts()).unwrap();
    let cfg = base.config().clone();
    let mut plan = InterventionPlan::new().ablate(LayerSet((0..cfg.n_layers).collect()), dir_vec);
    plan.ops[0].sites = persona_gate::intervene::Sites::All;
    let plan = Arc::new(
        plan.compile(
            cfg.n_layers,
            cfg.d_model,
            base.decoder.dtype(),
            &Device::Cpu,
        )
        .unwrap(),
    );

    let prompts = twenty_prompts();
    let run =
        |m: &Model, plan: Option<Arc<persona_gate::intervene::CompiledPlan>>| -> Vec<Vec<u32>> {
            let reqs: Vec<GenRequest> = prompts
                .iter()
                .map(|p| GenRequest {
                    prompt: m
                        .tokenizer
                        .encode(&m.tokenizer.format_prompt(None, p).unwrap())
                        .unwrap(),
                    max_new_tokens: 24,
                    sampling: Sampling::greedy(),
                    stop: m.tokenizer.stop_token_ids().to_vec(),
                    plan: plan.clone(),
                })
                .collect();
            Generator::new(&m.decoder, 10)
                .run(&reqs, None, |_, _| Ok(()))
                .unwrap()
                .into_iter()
                .map(|o| o.tokens)
                .collect()
        };
    let runtime = run(&base, Some(plan));
    let baked = run(&ortho, None);
    let plain = run(&base, None);
    let mut same = 0;
    for (i, (a, b)) in runtime.iter().zip(&baked).enumerate() {
        assert_eq!(
            a, b,
            "prompt {i} ({}): orthogonalized model differs from run-time ablation",
            prompts[i]
        );
        same += 1;
    }
    let changed = runtime.iter().zip(&plain).filter(|(a, b)| a != b).count();
    eprintln!(
        "{same}/20 identical; ablation changed {changed}/20 continuations vs the plain model"
    );
    assert!(changed > 0, "the ablation should change some continuations");
    let _ = std::fs::remove_dir_all(&out);
}
