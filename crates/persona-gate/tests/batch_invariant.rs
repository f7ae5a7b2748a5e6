//! Batch-invariant mode on a real model (Qwen2.5-Coder-0.5B, q mode): a prompt's next-token logits are
//! bit-identical alone and left-padded among other prompts of different lengths, and greedy
//! generation gives the same tokens at batch 1 and batch 5. This is what lets an audit compare a
//! served model with the same model run locally and expect *identical* labels (issue 7). Without the
//! mode the logits differ in the last bits (the test reports by how much).

mod common;

use std::sync::Arc;

use persona_gate::generate::{encode_chat, generate_chat, ChatPrompt, GenSettings, Sampling};
use persona_gate::intervene::{InterventionPlan, LayerSet};
use persona_gate::model::{LoadOptions, Model};
use persona_gate::refusal::last_logits;

const PROMPTS: &[&str] = &[
    "How do I make a bomb at home?",
    "Write a short poem about the sea.",
    "Explain, step by step and in detail, how a car engine works, including the ignition, the pistons and the exhaust.",
    "hi",
    "What is the capital of France? Answer in one word.",
];

fn load(invariant: bool) -> Model {
    let p = common::model_path("q05");
    let mut m = Model::load(p.to_str().unwrap(), &LoadOptions::default()).unwrap();
    m.decoder.set_batch_invariant(invariant).unwrap();
    m
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn logits_do_not_depend_on_the_batch() {
    for invariant in [false, true] {
        let model = load(invariant);
        let ids: Vec<Vec<u32>> = PROMPTS
            .iter()
            .map(|p| encode_chat(&model, &ChatPrompt::new(*p)).unwrap())
            .collect();
        let batched = last_logits(&model, &ids, None, ids.len())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut worst = 0f32;
        for (i, one) in ids.iter().enumerate() {
            let alone = last_logits(&model, std::slice::from_ref(one), None, 1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let d = max_abs_diff(&alone[0], &batched[i]);
            worst = worst.max(d);
            if invariant {
                assert!(
                    alone[0]
                        .iter()
                        .zip(&batched[i])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "prompt {i}: batch-invariant logits differ alone vs batched (max |diff| {d})"
                );
            }
        }
        eprintln!("batch_invariant={invariant}: max |logit alone - logit batched| = {worst:e}");
    }
}

/// Greedy tokens at batch 1 and batch 5, plain and under an add + project-out plan (the hooks'
/// per-row projections must not reintroduce batch dependence).
#[test]
fn greedy_tokens_do_not_depend_on_the_batch() {
    let model = load(true);
    let cfg = model.config().clone();
    let prompts: Vec<ChatPrompt> = PROMPTS.iter().map(|p| ChatPrompt::new(*p)).collect();
    // A fixed pseudo-random unit direction.
    let mut dir: Vec<f32> = (0..cfg.d_model)
        .map(|i| ((i as f32 * 12.9898).sin() * 43758.547).fract() - 0.5)
        .collect();
    let norm = dir.iter().map(|x| x * x).sum::<f32>().sqrt();
    dir.iter_mut().for_each(|x| *x /= norm);
    let plan = InterventionPlan::new()
        .add(LayerSet::single(6), dir.clone(), 4.0)
        .ablate(LayerSet((12..16).collect()), dir);
    let plan = Arc::new(
        plan.compile(
            cfg.n_layers,
            cfg.d_model,
            model.decoder.dtype(),
            model.decoder.device(),
        )
        .unwrap(),
    );
    for plan in [None, Some(plan)] {
        let run = |batch_size: usize| {
            let settings = GenSettings {
                max_new_tokens: 24,
                sampling: Sampling::greedy(),
                batch_size,
            };
            let (out, _) =
                generate_chat(&model, &prompts, &settings, plan.clone(), |_, _| Ok(())).unwrap();
            out.into_iter().map(|c| c.tokens).collect::<Vec<_>>()
        };
        let one = run(1);
        let all = run(prompts.len());
        for (i, (a, b)) in one.iter().zip(&all).enumerate() {
            assert_eq!(
                a,
                b,
                "prompt {i} (plan: {}): greedy tokens differ at batch 1 and batch {}",
                plan.is_some(),
                prompts.len()
            );
        }
    }
}
