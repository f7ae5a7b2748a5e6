//! Direction extraction against the independent PyTorch reference (../shared/fixtures/q05,
//! Qwen2.5-Coder-0.5B-Instruct in f32): batched last-token capture reproduces the reference
//! residuals, `refusal_candidates` on the 3 harmful + 3 harmless fixture prompts reproduces the
//! reference difference in means at every layer, post-instruction means average the right tokens,
//! and an ablation plan built from the fixture's direction file reproduces the reference greedy
//! continuations.

mod common;

use std::sync::OnceLock;

use candle_core::Device;
use persona_gate::directions::capture::{capture_prompts, post_instruction_len, CaptureOptions};
use persona_gate::directions::{
    diff_in_means, prompt_set_sha256, refusal_candidates, DirectionSet, DirectionSpec, PlanBuilder,
    Position,
};
use persona_gate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use persona_gate::model::{DTypeMode, LoadOptions, Model};

fn q05() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let p = common::model_path("q05");
        Model::load(
            p.to_str().unwrap(),
            &LoadOptions {
                dtype: DTypeMode::F32,
                device: Device::Cpu,
            },
        )
        .expect("load q05")
    })
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn fixture_prompts() -> (Vec<String>, serde_json::Value) {
    let (r, _) = common::fixture("q05");
    let prompts: Vec<String> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert_eq!(prompts.len(), 6);
    (prompts, r)
}

#[test]
fn last_token_capture_and_refusal_candidates_match_reference() {
    let model = q05();
    let (prompts, r) = fixture_prompts();
    let (_, st) = common::fixture("q05");
    let refs = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let resid = refs["resid_last_token"].to_vec3::<f32>().unwrap(); // [layers, 6, d]
    let direction = refs["direction"].to_vec2::<f32>().unwrap(); // [layers, d]
    let n_layers = model.config().n_layers;

    // The chat prompts render to the reference ids (template default system prompt, no BOS).
    let chat: Vec<ChatPrompt> = prompts.iter().map(ChatPrompt::new).collect();
    let want_ids = common::ids(&r["input_ids"]);
    for (p, want) in chat.iter().zip(&want_ids) {
        assert_eq!(&encode_chat(model, p).unwrap(), want);
    }

    // Batched, left-padded capture at the last token (batch 4: a full and a partial batch).
    let opts = CaptureOptions {
        batch_size: 4,
        ..Default::default()
    };
    let acts = capture_prompts(model, &chat, &[Position::LAST], &opts, |_, _, _| {})
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!((acts.n_layers, acts.n, acts.d), (n_layers, 6, 896));
    assert!(acts.counts.iter().all(|c| *c == 1));
    let mut worst: f64 = 0.0;
    for (l, layer) in resid.iter().enumerate() {
        for (i, want) in layer.iter().enumerate() {
            let e = rel_l2(acts.row(l, i), want);
            worst = worst.max(e);
            assert!(e < 1e-3, "layer {l} prompt {i}: rel err {e:.2e}");
        }
    }
    eprintln!("last-token capture: worst rel err {worst:.2e}");

    // refusal_candidates on 3 harmful + 3 harmless = the reference direction at every layer.
    let sets = refusal_candidates(
        model,
        &prompts[..3],
        &prompts[3..],
        &[Position::LAST],
        &opts,
    )
    .unwrap();
    assert_eq!(sets.len(), 1);
    let set = &sets[0];
    assert_eq!((set.n_layers(), set.d_model()), (n_layers, 896));
    let mut worst: f64 = 0.0;
    for (l, want) in direction.iter().enumerate() {
        let e = rel_l2(set.layer(l).unwrap(), want);
        worst = worst.max(e);
        assert!(e < 1e-3, "direction layer {l}: rel err {e:.2e}");
    }
    eprintln!("refusal direction: worst rel err {worst:.2e}");
    let m = &set.meta;
    assert_eq!(m.method, "diff-in-means");
    assert_eq!(m.position, "last");
    assert_eq!((m.n_pos, m.n_neg), (3, 3));
    assert_eq!(m.architecture, "qwen2");
    assert_eq!(
        m.model_sha256.as_deref(),
        Some(r["model_sha256"].as_str().unwrap())
    );
    assert_eq!(
        m.prompt_set_sha256.as_deref(),
        Some(prompt_set_sha256(&chat[..3], &chat[3..]).as_str())
    );

    // Difference in means is the manual computation on the captured rows.
    let side = |range: std::ops::Range<usize>| {
        let mut data = Vec::new();
        for l in 0..n_layers {
            for i in range.clone() {
                data.extend_from_slice(acts.row(l, i));
            }
        }
        persona_gate::directions::capture::Activations {
            n: range.len(),
            data,
            counts: vec![1; range.len()],
            ..acts.clone()
        }
    };
    let (pos, neg) = (side(0..3), side(3..6));
    let (diff, _, _) = diff_in_means(&pos, &neg).unwrap();
    for l in 0..n_layers {
        for j in 0..896 {
            let manual = (acts.row(l, 0)[j] + acts.row(l, 1)[j] + acts.row(l, 2)[j]) as f64 / 3.0
                - (acts.row(l, 3)[j] + acts.row(l, 4)[j] + acts.row(l, 5)[j]) as f64 / 3.0;
            assert!((diff[l * 896 + j] as f64 - manual).abs() < 1e-4 * (1.0 + manual.abs()));
            assert!((set.layer(l).unwrap()[j] as f64 - manual).abs() < 1e-3 * (1.0 + manual.abs()));
        }
    }
    // Save and reload: the file is the same set.
    let p = std::env::temp_dir().join(format!("pgate-refusal-{}.safetensors", std::process::id()));
    set.save(&p).unwrap();
    assert_eq!(&DirectionSet::load(&p).unwrap(), set);
}

#[test]
fn post_instruction_mean_averages_the_template_tokens_after_the_message() {
    let model = q05();
    let (prompts, _) = fixture_prompts();
    let chat: Vec<ChatPrompt> = prompts.iter().take(4).map(ChatPrompt::new).collect();
    // ChatML: <|im_end|> \n <|im_start|> assistant \n
    for p in &chat {
        assert_eq!(post_instruction_len(model, p).unwrap(), 5);
    }
    let with_system =
        ChatPrompt::new("Write a haiku about the sea.").with_system(Some("You are a poet.".into()));
    assert_eq!(post_instruction_len(model, &with_system).unwrap(), 5);
    let positions = [
        Position::PostInstruction,
        Position::FromEnd(1),
        Position::FromEnd(2),
        Position::FromEnd(3),
        Position::FromEnd(4),
        Position::FromEnd(5),
    ];
    let acts = capture_prompts(
        model,
        &chat,
        &positions,
        &CaptureOptions::default(),
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(acts.len(), 6);
    assert!(acts[0].counts.iter().all(|c| *c == 5));
    for l in [0, 11, 23] {
        for i in 0..chat.len() {
            let mean: Vec<f32> = (0..896)
                .map(|j| (1..6).map(|k| acts[k].row(l, i)[j]).sum::<f32>() / 5.0)
                .collect();
            let e = rel_l2(acts[0].row(l, i), &mean);
            assert!(e < 1e-5, "layer {l} prompt {i}: {e:.2e}");
        }
    }
}

#[test]
fn ablation_from_a_direction_file_reproduces_reference_greedy() {
    // The fixture's `ablate` case: unit(direction[12]) projected out at blocks 16-19, all positions,
    // built here from the reference file through the --ablate spec.
    let model = q05();
    let (r, st) = common::fixture("q05");
    let ab = &r["ablate"];
    let layers: Vec<u64> = ab["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(layers, vec![16, 17, 18, 19]);
    let spec = DirectionSpec::parse_ablate(&format!("{}[12]@16-19", st.display())).unwrap();
    let mut b = PlanBuilder::new();
    b.spec(&spec).unwrap();
    let cfg = model.config();
    let plan = b
        .finish(cfg.n_layers, cfg.d_model)
        .unwrap()
        .compile(
            cfg.n_layers,
            cfg.d_model,
            model.decoder.dtype(),
            model.decoder.device(),
        )
        .unwrap();
    let plan = std::sync::Arc::new(plan);
    let ids = common::ids(&r["input_ids"]);
    let want = common::ids(&ab["greedy"]);
    let n_new = r["greedy_max_new_tokens"].as_u64().unwrap() as usize;
    let stop = model.tokenizer.stop_token_ids().to_vec();
    // Prompts 0 and 3 (one harmful, one harmless) keep the test short.
    let reqs: Vec<GenRequest> = [0usize, 3]
        .iter()
        .map(|&i| GenRequest {
            prompt: ids[i].clone(),
            max_new_tokens: n_new,
            sampling: Sampling::greedy(),
            stop: stop.clone(),
            plan: Some(plan.clone()),
        })
        .collect();
    let outs = Generator::new(&model.decoder, 2)
        .run(&reqs, None, |_, _| Ok(()))
        .unwrap();
    let margins = &r["greedy_margins"]["ablate"];
    for (o, &i) in outs.iter().zip(&[0usize, 3]) {
        let w = &want[i];
        let first = o.tokens.iter().zip(w).position(|(a, b)| a != b);
        match first {
            None => assert_eq!(o.tokens.len(), w.len(), "prompt {i}"),
            Some(k) => {
                let m = margins[i][k].as_f64().unwrap_or(f64::INFINITY);
                assert!(
                    m < 0.01,
                    "prompt {i}: greedy differs at step {k} (margin {m:.4})\n got  {:?}\n want {w:?}",
                    o.tokens
                );
            }
        }
    }
}
