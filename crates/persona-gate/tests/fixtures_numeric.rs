//! The engine against independent PyTorch references (../shared/fixtures): per-layer residuals,
//! last-token logits, and greedy continuations with and without interventions, in f32 mode.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use persona_gate::generate::{FixedSlot, GenRequest, Generator, Sampling};
use persona_gate::intervene::{InterventionPlan, LastTokenCapture, LayerSet, RowCtx};
use persona_gate::model::{DTypeMode, KvCache, LoadOptions, LogitsAt, Model};

fn load(short: &str) -> Model {
    let p = common::model_path(short);
    Model::load(
        p.to_str().unwrap(),
        &LoadOptions {
            dtype: DTypeMode::F32,
            device: Device::Cpu,
        },
    )
    .expect("load model")
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Residuals at every layer and logits at the last prompt token, one prompt at a time.
fn check_residuals_and_logits(short: &str, fixture: &str) {
    let (r, st) = common::fixture(fixture);
    let refs = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let model = load(short);
    let n_layers = model.config().n_layers;
    assert_eq!(n_layers, r["n_layers"].as_u64().unwrap() as usize);
    let resid = refs["resid_last_token"].to_vec3::<f32>().unwrap(); // [layers, 6, d]
    let logits_ref = refs["last_logits"].to_vec2::<f32>().unwrap();
    let inputs = common::ids(&r["input_ids"]);
    let mut worst_resid: f64 = 0.0;
    let mut worst_logit: f64 = 0.0;
    for (pi, ids) in inputs.iter().enumerate() {
        let mut cap = LastTokenCapture::all(n_layers);
        let mut cache = KvCache::new(n_layers);
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let rows = [RowCtx {
            seq: 0,
            chunk_pad: 0,
            start_pos: 0,
            prompt_len: ids.len(),
        }];
        let logits = model
            .decoder
            .forward(&t, &rows, &mut cache, Some(&mut cap), LogitsAt::Last)
            .unwrap()
            .unwrap();
        let got = cap.take();
        for l in 0..n_layers {
            let g = got[l]
                .as_ref()
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let e = rel_l2(&g, &resid[l][pi]);
            worst_resid = worst_resid.max(e);
            assert!(
                e < 1e-3,
                "{fixture} prompt {pi} layer {l}: residual rel err {e:.2e}"
            );
        }
        let g = logits.get(0).unwrap().to_vec1::<f32>().unwrap();
        let e = rel_l2(&g, &logits_ref[pi]);
        worst_logit = worst_logit.max(e);
        assert!(e < 1e-3, "{fixture} prompt {pi}: logits rel err {e:.2e}");
    }
    eprintln!("{fixture}: worst residual rel err {worst_resid:.2e}, worst logits rel err {worst_logit:.2e}");
}

/// Compare greedy continuations; a difference right after a reference near-tie (margin < 0.01) is
/// not evidence of a bug (see the fixtures README), so the comparison stops there.
fn same_greedy(
    fixture: &str,
    case: &str,
    got: &[Vec<u32>],
    want: &[Vec<u32>],
    margins: &serde_json::Value,
) {
    for (pi, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        let first = g
            .iter()
            .zip(w)
            .position(|(a, b)| a != b)
            .unwrap_or(g.len().min(w.len()));
        let m = margins[case][pi][first].as_f64().unwrap_or(f64::INFINITY);
        assert!(
            m < 0.01,
            "{fixture} {case} prompt {pi}: greedy differs at step {first} (ref margin {m:.4})\n got  {g:?}\n want {w:?}"
        );
        eprintln!("{fixture} {case} prompt {pi}: differs after a near-tie at step {first} (margin {m:.4})");
    }
}

fn check_greedy(short: &str, fixture: &str) {
    let (r, st) = common::fixture(fixture);
    let refs = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let model = load(short);
    let cfg = model.config().clone();
    let inputs = common::ids(&r["input_ids"]);
    let max_new = r["greedy_max_new_tokens"].as_u64().unwrap() as usize;
    let stop = model.tokenizer.stop_token_ids().to_vec();
    let margins = &r["greedy_margins"];

    let steer = &r["steer"];
    let steer_layers: Vec<usize> = steer["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let coeff = steer["coeff"].as_f64().unwrap() as f32;
    let random_unit = refs["random_unit"].to_vec1::<f32>().unwrap();
    let mut steer_plan = InterventionPlan::new();
    for l in &steer_layers {
        steer_plan = steer_plan.add(LayerSet::single(*l), random_unit.clone(), coeff);
    }
    let ablate = &r["ablate"];
    let ab_layers: Vec<usize> = ablate["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let row: usize = ablate["direction"]
        .as_str()
        .unwrap()
        .split("row ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap();
    let dir = refs["direction"]
        .get(row)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ab_set = LayerSet(ab_layers.iter().copied().collect());
    let ablate_plan = InterventionPlan::new().ablate(ab_set, dir);

    let dev = Device::Cpu;
    let compile = |p: &InterventionPlan| {
        Arc::new(
            p.compile(cfg.n_layers, cfg.d_model, model.decoder.dtype(), &dev)
                .unwrap(),
        )
    };
    for (case, plan, want) in [
        ("baseline", None, common::ids(&r["greedy_baseline"])),
        (
            "steer",
            Some(compile(&steer_plan)),
            common::ids(&steer["greedy"]),
        ),
        (
            "ablate",
            Some(compile(&ablate_plan)),
            common::ids(&ablate["greedy"]),
        ),
    ] {
        let reqs: Vec<GenRequest> = inputs
            .iter()
            .map(|p| GenRequest {
                prompt: p.clone(),
                max_new_tokens: max_new,
                sampling: Sampling::greedy(),
                stop: stop.clone(),
                plan: plan.clone(),
            })
            .collect();
        // Batched (left-padded, all six at once)...
        let batched: Vec<Vec<u32>> = Generator::new(&model.decoder, 6)
            .run(&reqs, None, |_, _| Ok(()))
            .unwrap()
            .into_iter()
            .map(|o| o.tokens)
            .collect();
        same_greedy(fixture, case, &batched, &want, margins);
        // ...and one at a time: identical tokens (batch composition must not matter).
        let single: Vec<Vec<u32>> = Generator::new(&model.decoder, 1)
            .run(&reqs, None, |_, _| Ok(()))
            .unwrap()
            .into_iter()
            .map(|o| o.tokens)
            .collect();
        assert_eq!(
            batched, single,
            "{fixture} {case}: batched and single greedy tokens differ"
        );
        // A batch of 4 refilled as sequences finish, in another order.
        let mut rev = reqs.clone();
        rev.reverse();
        let mut refill: Vec<Vec<u32>> = Generator::new(&model.decoder, 4)
            .run(&rev, None, |_, _| Ok(()))
            .unwrap()
            .into_iter()
            .map(|o| o.tokens)
            .collect();
        refill.reverse();
        assert_eq!(batched, refill, "{fixture} {case}: refilled batch differs");
        // The fixed-slot decode step (device-held slot, position and mask: what CUDA graphs
        // replay), run eagerly here, refilling a batch of 4: the reference tokens again.
        if model.decoder.supports_fixed_slot() {
            let mut g = Generator::new(&model.decoder, 4);
            g.fixed_slot = FixedSlot::Always;
            let fixed: Vec<Vec<u32>> = g
                .run(&reqs, None, |_, _| Ok(()))
                .unwrap()
                .into_iter()
                .map(|o| o.tokens)
                .collect();
            same_greedy(
                fixture,
                &format!("{case} (fixed-slot)"),
                &fixed,
                &want,
                margins,
            );
        }
    }
}

#[test]
fn smollm2_residuals_and_logits_match_reference() {
    check_residuals_and_logits("smollm2", "smollm2");
}

#[test]
fn qwen05_residuals_and_logits_match_reference() {
    check_residuals_and_logits("q05", "q05");
}

#[test]
fn gemma3_residuals_and_logits_match_reference() {
    check_residuals_and_logits("gemma3", "gemma3");
}

#[test]
fn smollm2_greedy_baseline_steer_ablate_match_reference() {
    check_greedy("smollm2", "smollm2");
}

#[test]
fn qwen05_greedy_baseline_steer_ablate_match_reference() {
    check_greedy("q05", "q05");
}

#[test]
fn gemma3_greedy_baseline_steer_ablate_match_reference() {
    check_greedy("gemma3", "gemma3");
}
