//! Slot reuse in the serving engine (issue 18's burst test): sequences that join a running batch
//! are placed into the cache rows of ended ones, so the fixed-slot stepper (a CUDA graph on the
//! GPU; the same code eagerly here) keeps stepping instead of being rebuilt at every join. Their
//! greedy tokens must be those of the same sequences run alone.

mod common;

use std::sync::Arc;

use persona_gate::generate::{encode_chat, ChatPrompt};
use persona_gate::generate::{Engine, EngineConfig, EngineEvent, FixedSlot, GenStats, SeqSpec};
use persona_gate::intervene::CompiledPlan;
use persona_gate::model::{DTypeMode, LoadOptions, Model};

fn plan(model: &Model) -> Arc<CompiledPlan> {
    common::add_ablate_plan(model, 2.0)
}

const PROMPTS: [&str; 6] = [
    "Write a haiku about rain.",
    "What is the capital of France?",
    "List three prime numbers.",
    "Say hello in Spanish.",
    "Name a color of the sky at dusk.",
    "Give me one word that rhymes with cat.",
];

/// Runs `specs` through an engine under `cfg`: each spec joins once the step count reaches its
/// arrival step. Returns every sequence's tokens and the engine's counters.
fn run(model: &Model, cfg: EngineConfig, specs: &[(usize, SeqSpec)]) -> (Vec<Vec<u32>>, GenStats) {
    let mut e = Engine::new(&model.decoder, cfg);
    let mut toks = vec![Vec::new(); specs.len()];
    let mut ids = vec![usize::MAX; specs.len()];
    let mut step = 0;
    loop {
        for (i, (at, s)) in specs.iter().enumerate() {
            if *at == step {
                ids[i] = e.submit(s.clone());
            }
        }
        if e.is_idle() && specs.iter().all(|(at, _)| *at < step) {
            break;
        }
        for ev in e.step(None) {
            match ev {
                EngineEvent::Token { id, token } => {
                    let i = ids.iter().position(|&x| x == id).unwrap();
                    toks[i].push(token);
                }
                EngineEvent::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
        step += 1;
        assert!(step < 500, "engine did not finish");
    }
    (toks, e.finish_stats().clone())
}

#[test]
fn joining_sequences_take_ended_rows_and_keep_their_tokens() {
    let path = common::model_path("smollm2");
    let opts = LoadOptions {
        dtype: DTypeMode::F32,
        ..Default::default()
    };
    let model = Model::load(path.to_str().unwrap(), &opts).unwrap();
    let steer = plan(&model);
    // Four start together (short budgets end early), two arrive while the rest decode.
    let budgets = [3, 14, 4, 16, 10, 9];
    let arrivals = [0, 0, 0, 0, 6, 7];
    let specs: Vec<(usize, SeqSpec)> = PROMPTS
        .iter()
        .zip(budgets.iter().zip(arrivals))
        .map(|(p, (&n, at))| {
            let ids = encode_chat(&model, &ChatPrompt::new(*p)).unwrap();
            (
                at,
                SeqSpec {
                    plan: Some(steer.clone()),
                    ..SeqSpec::new(ids, n)
                },
            )
        })
        .collect();
    let serving = |reuse: bool| EngineConfig {
        fixed_slot: FixedSlot::Always,
        reuse_slots: reuse,
        ..EngineConfig::serving(4)
    };
    let (reused, with) = run(&model, serving(true), &specs);
    let (plain, without) = run(&model, serving(false), &specs);
    // Alone: each sequence by itself, in a batch job.
    for (i, (_, s)) in specs.iter().enumerate() {
        let (alone, _) = run(&model, EngineConfig::batch(1), &[(0, s.clone())]);
        assert_eq!(
            reused[i], alone[0],
            "sequence {i}: placed into a hole, tokens differ"
        );
        assert_eq!(plain[i], alone[0], "sequence {i}: appended, tokens differ");
        assert_eq!(reused[i].len(), budgets[i]);
    }
    eprintln!("reuse: {with:?}\nappend: {without:?}");
    assert!(with.slots_reused >= 2, "{with:?}");
    assert!(
        with.steppers < without.steppers,
        "slot reuse should rebuild the stepper less often: {} vs {}",
        with.steppers,
        without.steppers
    );
}
