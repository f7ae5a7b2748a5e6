//! Prefill in chunks (issue 17: a 4k-token prompt prefilled in one forward built full attention
//! scores, 2.3 GB): the same prompts fed a few columns at a time, under a steering plan, give the
//! same next-token logits as one forward, and the next decode step agrees too.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use persona_gate::generate::{encode_chat, left_padded, ChatPrompt, ChunkedPrefill};
use persona_gate::intervene::{CompiledPlan, PlanHook, RowCtx};
use persona_gate::model::{KvCache, LoadOptions, LogitsAt, Model};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn plan(model: &Model) -> Arc<CompiledPlan> {
    common::add_ablate_plan(model, 4.0)
}

fn decode_once(
    model: &Model,
    cache: &mut KvCache,
    next: &[u32],
    plans: &[Option<Arc<CompiledPlan>>],
    lens: &[usize],
) -> Tensor {
    let b = next.len();
    let rows: Vec<RowCtx> = (0..b)
        .map(|i| RowCtx {
            seq: i,
            chunk_pad: 0,
            start_pos: cache.next_position(i),
            prompt_len: lens[i],
        })
        .collect();
    let tokens = Tensor::from_vec(next.to_vec(), (b, 1), &Device::Cpu).unwrap();
    let mut hook = PlanHook::new(plans, model.decoder.n_layers());
    model
        .decoder
        .forward(&tokens, &rows, cache, Some(&mut hook), LogitsAt::Last)
        .unwrap()
        .unwrap()
}

#[test]
fn chunked_prefill_matches_one_forward() {
    let path = common::model_path("smollm2");
    let opts = LoadOptions {
        dtype: persona_gate::model::DTypeMode::F32,
        ..Default::default()
    };
    let model = Model::load(path.to_str().unwrap(), &opts).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "Explain, step by step and in detail, how a car engine works, including the ignition.",
        "hi",
        "Write a short poem about the sea.",
    ]
    .iter()
    .map(|p| encode_chat(&model, &ChatPrompt::new(*p)).unwrap())
    .collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let plans: Vec<Option<Arc<CompiledPlan>>> = vec![Some(plan(&model)), None, Some(plan(&model))];
    let n_layers = model.decoder.n_layers();

    let (tokens, rows) = left_padded(&prompts, &Device::Cpu).unwrap();
    let mut one = KvCache::new(n_layers);
    let mut hook = PlanHook::new(&plans, n_layers);
    let whole = model
        .decoder
        .forward(&tokens, &rows, &mut one, Some(&mut hook), LogitsAt::Last)
        .unwrap()
        .unwrap();

    for budget in [3, 20, 64] {
        let mut g = ChunkedPrefill::new(prompts.clone(), n_layers).unwrap();
        let mut last = None;
        let mut chunks = 0;
        while !g.is_done() {
            let cols = g.chunk_columns(budget);
            let c = g.next_chunk(cols, &Device::Cpu).unwrap();
            let mut hook = PlanHook::new(&plans, n_layers);
            let at = if c.last {
                LogitsAt::Last
            } else {
                LogitsAt::None
            };
            last = model
                .decoder
                .forward(&c.tokens, &c.rows, g.cache_mut(), Some(&mut hook), at)
                .unwrap();
            g.advance(cols);
            chunks += 1;
        }
        let chunked = last.expect("logits from the last chunk");
        let d = max_abs_diff(&whole, &chunked);
        eprintln!("budget {budget}: {chunks} chunks, max |logit diff| {d:.2e}");
        assert!(chunks > 1);
        assert!(d < 2e-3, "budget {budget}: logits differ by {d}");

        // The filled caches give the same next step.
        let next: Vec<u32> = whole.argmax(1).unwrap().to_vec1().unwrap();
        let mut a = one.clone();
        let mut b = g.into_cache();
        let da = decode_once(&model, &mut a, &next, &plans, &lens);
        let db = decode_once(&model, &mut b, &next, &plans, &lens);
        assert!(max_abs_diff(&da, &db) < 2e-3);
    }
}

/// The batch engine feeds prompts longer than its column cap in chunks (prefill memory linear in
/// the prompt): a 1,300-token prompt gives the same greedy tokens and last-token residuals as one
/// whole-prompt forward, under a plan, beside a short prompt.
#[test]
fn batch_engine_chunks_long_prompts_with_the_same_results() {
    use persona_gate::generate::{Engine, EngineConfig, EngineEvent, SeqSpec};
    let path = common::model_path("smollm2");
    let opts = LoadOptions {
        dtype: persona_gate::model::DTypeMode::F32,
        ..Default::default()
    };
    let model = Model::load(path.to_str().unwrap(), &opts).unwrap();
    let long = "Tell me about the history of the river and its bridges. ".repeat(110);
    let prompts: Vec<Vec<u32>> = [long.as_str(), "Write a short poem about the sea."]
        .iter()
        .map(|p| encode_chat(&model, &ChatPrompt::new(*p)).unwrap())
        .collect();
    assert!(prompts[0].len() > 1024 + 200, "{}", prompts[0].len());
    let run = |cfg: EngineConfig| {
        let mut e = Engine::new(&model.decoder, cfg);
        for p in &prompts {
            e.submit(SeqSpec {
                plan: Some(plan(&model)),
                capture_layers: vec![3, 20],
                ..SeqSpec::new(p.clone(), 6)
            });
        }
        let mut toks = vec![Vec::new(); prompts.len()];
        let mut caps = vec![Vec::new(); prompts.len()];
        while !e.is_idle() {
            for ev in e.step(None) {
                match ev {
                    EngineEvent::Token { id, token } => toks[id].push(token),
                    EngineEvent::Prefilled { id, captures, .. } => caps[id] = captures,
                    EngineEvent::Failed { error, .. } => panic!("{error}"),
                    _ => {}
                }
            }
        }
        (toks, caps)
    };
    let chunked = run(EngineConfig::batch(4));
    let whole = run(EngineConfig {
        max_chunk_columns: usize::MAX,
        ..EngineConfig::batch(4)
    });
    assert_eq!(chunked.0, whole.0, "greedy tokens differ");
    for (a, b) in chunked.1.iter().zip(&whole.1) {
        for l in [3, 20] {
            let (a, b) = (a[l].as_ref().unwrap(), b[l].as_ref().unwrap());
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
            assert!(
                d <= 1e-3 * scale.max(1.0),
                "layer {l}: residuals differ by {d}"
            );
        }
    }
}

/// A caller's hook that fails on a decode step (an interrupt, say) ends the run with its error
/// instead of being retried row by row without the hook, forever.
#[test]
fn a_failing_extra_hook_ends_the_run() {
    use persona_gate::generate::{GenRequest, Generator, Sampling};
    use persona_gate::intervene::{HookCtx, ResidualHook};
    struct FailOnDecode;
    impl ResidualHook for FailOnDecode {
        fn wants(&self, layer: usize) -> bool {
            layer == 0
        }
        fn on_block_output(
            &mut self,
            _h: &Tensor,
            ctx: &HookCtx<'_>,
        ) -> persona_gate::Result<Option<Tensor>> {
            if ctx.chunk_len == 1 {
                return Err(persona_gate::Error::InvalidValue("interrupted".into()));
            }
            Ok(None)
        }
    }
    let path = common::model_path("smollm2");
    let model = Model::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let reqs: Vec<GenRequest> = ["hi", "Write a short poem about the sea."]
        .iter()
        .map(|p| GenRequest {
            prompt: encode_chat(&model, &ChatPrompt::new(*p)).unwrap(),
            max_new_tokens: 8,
            sampling: Sampling::greedy(),
            stop: Vec::new(),
            plan: None,
        })
        .collect();
    let mut hook = FailOnDecode;
    let r = Generator::new(&model.decoder, 2).run(&reqs, Some(&mut hook), |_, _| Ok(()));
    let e = r
        .expect_err("the hook's error should end the run")
        .to_string();
    assert!(e.contains("interrupted"), "{e}");
}

/// `pgate logits --last-by-decode` (what `scripts/gpu/flash_ab.py` uses to check the GPU's decode
/// attention kernel): the last position run as a decode step gives the prefill's logits.
#[test]
fn last_position_by_decode_matches_prefill() {
    let path = common::model_path("smollm2");
    let opts = LoadOptions {
        dtype: persona_gate::model::DTypeMode::F32,
        ..Default::default()
    };
    let model = Model::load(path.to_str().unwrap(), &opts).unwrap();
    let prompts: Vec<Vec<u32>> = vec![(1..40).collect(), (7..20).collect(), vec![5, 9]];
    let p = Some(plan(&model));
    let a = persona_gate::bench::last_token_logits(&model, &prompts, p.clone()).unwrap();
    let b = persona_gate::bench::last_token_logits_by_decode(&model, &prompts, p).unwrap();
    for (x, y) in a.iter().zip(&b) {
        let worst = x
            .iter()
            .zip(y)
            .map(|(u, v)| (u - v).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "decode-step logits differ by {worst}");
    }
    let one = persona_gate::bench::last_token_logits_by_decode(&model, &[vec![3]], None);
    assert!(one.unwrap_err().to_string().contains("at least 2 tokens"));
}
