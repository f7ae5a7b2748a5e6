//! Direction extraction on real models, small and fast: refusal candidates from the refusal_splits
//! prompt sets (held-out prompts separate along them), batched capture equals one-at-a-time capture,
//! persona-vector extraction from a built-in trait with response means, and the post-instruction
//! span of a model without a chat template.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use persona_gate::directions::capture::{capture_prompts, post_instruction_len, CaptureOptions};
use persona_gate::directions::geometry::cosine;
use persona_gate::directions::{
    extract_trait, refusal_candidates, DirectionSet, Method, Position, TraitOptions, TraitSpec,
};
use persona_gate::generate::ChatPrompt;
use persona_gate::model::{DTypeMode, LoadOptions, Model};

fn load_as(short: &str, dtype: DTypeMode) -> Model {
    let p = common::model_path(short);
    Model::load(
        p.to_str().unwrap(),
        &LoadOptions {
            dtype,
            device: Device::Cpu,
        },
    )
    .expect("load model")
}

fn load(short: &str) -> Model {
    load_as(short, DTypeMode::Q)
}

/// First `n` instructions of a refusal_splits file.
fn split(name: &str, n: usize) -> Vec<String> {
    let p: PathBuf = common::shared_dir()
        .join("data/refusal_splits")
        .join(format!("{name}.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("refusal split")).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .take(n)
        .map(|x| x["instruction"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn refusal_candidates_separate_held_out_prompts() {
    // f32: batched prefill runs faster through dense matmuls than quantized ones on CPU.
    let model = load_as("q05", DTypeMode::F32);
    let n_layers = model.config().n_layers;
    let (harmful, harmless) = (split("harmful_train", 8), split("harmless_train", 8));
    let opts = CaptureOptions::default();
    let sets = refusal_candidates(
        &model,
        &harmful,
        &harmless,
        &[Position::LAST, Position::PostInstruction],
        &opts,
    )
    .unwrap();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].meta.position, "last");
    assert_eq!(sets[1].meta.position, "post-instruction");
    for s in &sets {
        assert_eq!((s.n_layers(), s.meta.n_pos, s.meta.n_neg), (n_layers, 8, 8));
        assert_eq!(s.meta.extra["pos_side"], "harmful");
        assert!(s.pos_mean.is_some() && s.neg_mean.is_some());
    }
    // Held-out prompts: harmful ones project higher on the direction than harmless ones at most
    // layers past the first third, and the two sets are cleanly split at the best layer.
    let val_h: Vec<ChatPrompt> = split("harmful_val", 8)
        .into_iter()
        .map(ChatPrompt::new)
        .collect();
    let val_n: Vec<ChatPrompt> = split("harmless_val", 8)
        .into_iter()
        .map(ChatPrompt::new)
        .collect();
    let mut all = val_h.clone();
    all.extend(val_n.clone());
    let acts = capture_prompts(&model, &all, &[Position::LAST], &opts, |_, _, _| {})
        .unwrap()
        .pop()
        .unwrap();
    let dir = &sets[0];
    let mut separated = 0;
    let mut best_gap = f64::NEG_INFINITY;
    for l in n_layers / 3..n_layers {
        let u = dir.unit();
        let v = u.layer(l).unwrap();
        let proj = |i: usize| -> f64 {
            acts.row(l, i)
                .iter()
                .zip(v)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        let h: Vec<f64> = (0..8).map(proj).collect();
        let n: Vec<f64> = (8..16).map(proj).collect();
        let mh = h.iter().sum::<f64>() / 8.0;
        let mn = n.iter().sum::<f64>() / 8.0;
        if mh > mn {
            separated += 1;
        }
        let gap = h.iter().cloned().fold(f64::INFINITY, f64::min)
            - n.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        best_gap = best_gap.max(gap);
    }
    let considered = n_layers - n_layers / 3;
    eprintln!("held-out: {separated}/{considered} layers separate the means; best min-max gap {best_gap:.3}");
    assert!(separated * 10 >= considered * 9, "{separated}/{considered}");
    assert!(
        best_gap > 0.0,
        "no layer splits held-out harmful from harmless"
    );
}

#[test]
fn batched_capture_equals_one_at_a_time() {
    // f32: quantized matmuls may take other kernels for other batch shapes.
    let model = load_as("smollm2", DTypeMode::F32);
    // Prompts of different lengths so batches are padded.
    let mut prompts: Vec<ChatPrompt> = split("harmful_val", 3)
        .into_iter()
        .chain(split("harmless_val", 3))
        .map(ChatPrompt::new)
        .collect();
    prompts.push(ChatPrompt::new("Hi").with_system(Some("You are terse.".into())));
    let positions = [
        Position::LAST,
        Position::FromEnd(3),
        Position::PostInstruction,
    ];
    let run = |bs: usize| {
        capture_prompts(
            &model,
            &prompts,
            &positions,
            &CaptureOptions {
                batch_size: bs,
                ..Default::default()
            },
            |_, _, _| {},
        )
        .unwrap()
    };
    let (one, many) = (run(1), run(8));
    for (k, (a, b)) in one.iter().zip(&many).enumerate() {
        assert_eq!(a.counts, b.counts);
        for l in 0..a.n_layers {
            for i in 0..a.n {
                let (x, y) = (a.row(l, i), b.row(l, i));
                let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
                let den: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
                let e = (num / den.max(1e-30)).sqrt();
                assert!(
                    e < 1e-4,
                    "position {k} layer {l} prompt {i}: rel err {e:.2e}"
                );
            }
        }
    }
    // Post-instruction spans: the ChatML tokens after the message.
    let suffix = model
        .tokenizer
        .encode("<|im_end|>\n<|im_start|>assistant\n")
        .unwrap()
        .len();
    assert!(suffix >= 5);
    assert!(
        many[2].counts.iter().all(|c| *c == suffix),
        "{:?} vs {suffix}",
        many[2].counts
    );
}

#[test]
fn persona_vector_from_a_builtin_trait() {
    let model = load("smollm2");
    let spec = TraitSpec::builtin("compliant").unwrap();
    let opts = TraitOptions {
        position: Position::Response,
        method: Method::DiffInMeans,
        max_questions: Some(4),
        max_pairs: Some(2),
        capture: CaptureOptions {
            batch_size: 8,
            max_new_tokens: 12,
            ..Default::default()
        },
        hash_model: false,
    };
    let mut calls = 0;
    let ex = extract_trait(&model, &spec, &opts, |_, _, _| calls += 1).unwrap();
    assert_eq!(calls, 16, "progress after each of 16 answers");
    let (n_layers, d) = (model.config().n_layers, model.config().d_model);
    assert_eq!((ex.set.n_layers(), ex.set.d_model()), (n_layers, d));
    assert_eq!(ex.pos_prompts.len(), 8);
    assert_eq!(
        ex.pos_prompts[5].system.as_deref(),
        Some(spec.instruction[1].pos.as_str())
    );
    assert_eq!(
        ex.neg_prompts[5].system.as_deref(),
        Some(spec.instruction[1].neg.as_str())
    );
    assert_eq!(ex.neg_prompts[5].user, spec.questions[1]);
    let answers = ex.pos.responses.as_ref().unwrap();
    assert_eq!(answers.len(), 8);
    assert!(answers.iter().all(|a| !a.trim().is_empty()));
    // Every answer averaged over its fed-back tokens (at most 11 of 12).
    assert!(ex
        .pos
        .counts
        .iter()
        .chain(&ex.neg.counts)
        .all(|c| (1..=11).contains(c)));
    let m = &ex.set.meta;
    assert_eq!(
        (m.method.as_str(), m.position.as_str()),
        ("diff-in-means", "response")
    );
    assert_eq!(m.extra["trait"], "compliant");
    assert_eq!(m.extra["trait_source"], "builtin:compliant");
    assert_eq!(m.extra["max_new_tokens"], "12");
    assert_eq!(m.model_sha256.as_deref().map(str::len), Some(64));
    assert!(ex.set.norms().iter().all(|n| *n > 0.0 && n.is_finite()));
    // The two sides sit apart along the vector: the positive side projects higher at every layer.
    for (l, (p, n)) in ex.separation().into_iter().enumerate() {
        assert!(p.unwrap() > n.unwrap(), "layer {l}");
    }
    // The paired principal component points the same way.
    let pc = persona_gate::directions::paired_pc1(&ex.pos, &ex.neg).unwrap();
    for (l, row) in pc.chunks(d).enumerate() {
        let c = cosine(row, ex.set.layer(l).unwrap()).unwrap();
        assert!(c > 0.0, "layer {l}: pc1 cos with diff-in-means {c}");
    }
    // Saved and loaded, the vector keeps its provenance.
    let p = std::env::temp_dir().join(format!("pgate-trait-{}.safetensors", std::process::id()));
    ex.set.save(&p).unwrap();
    let back = DirectionSet::load(&p).unwrap();
    assert_eq!(back, ex.set);
    // Activations file: [layers, n, d].
    let ap = p.with_extension("acts.safetensors");
    ex.pos.save(&ap).unwrap();
    let t = candle_core::safetensors::load(&ap, &Device::Cpu).unwrap();
    assert_eq!(t["activations"].dims(), &[n_layers, 8, d]);
    let back = persona_gate::directions::Activations::load(&ap).unwrap();
    assert_eq!(back.data, ex.pos.data);
    assert_eq!(back.counts, ex.pos.counts);
    assert_eq!(back.position, Position::Response);
}

#[test]
fn models_without_a_chat_template_use_the_last_token() {
    let model = load("gemma3");
    assert!(!model.tokenizer.has_chat_template());
    let p = ChatPrompt::new("Tell me about the sea.");
    assert_eq!(post_instruction_len(&model, &p).unwrap(), 1);
    // One-sided or empty prompt sets are errors, not empty directions.
    let e = refusal_candidates(
        &model,
        &[],
        &["Hello".into()],
        &[Position::LAST],
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("one-sided"), "{e}");
    let e = refusal_candidates(
        &model,
        &["Hello".into()],
        &[],
        &[Position::LAST],
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("one-sided"), "{e}");
    // A position beyond the prompt is an error naming the prompt.
    let e = capture_prompts(
        &model,
        &[ChatPrompt::new("Hi")],
        &[Position::FromEnd(50)],
        &Default::default(),
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("-50"), "{e}");
}

/// A selection in which no candidate passes the filters (here forced with a KL limit below zero)
/// fails with one line, unless a fallback layer is given: then the candidate at that layer is
/// taken and its metadata says so (drift uses the old version's layer for a version that lost
/// refusal). A fallback layer beyond the model is a one-line error.
#[test]
fn refusal_selection_falls_back_to_a_given_layer() {
    use persona_gate::refusal::{select_refusal_direction, SelectOptions};
    let model = load("smollm2");
    let n_layers = model.config().n_layers;
    let (harmful, harmless) = (split("harmful_train", 4), split("harmless_train", 4));
    let (hv, sv) = (split("harmful_val", 2), split("harmless_val", 2));
    let strict = SelectOptions {
        kl_max: -1.0,
        layer_stride: n_layers,
        batch_size: 4,
        ..Default::default()
    };
    let select = |o: &SelectOptions| {
        select_refusal_direction(&model, &harmful, &harmless, &hv, &sv, o, |_| {})
    };
    let e = select(&strict).unwrap_err().to_string();
    assert!(e.contains("no refusal-direction candidate passed"), "{e}");
    let fb = SelectOptions {
        fallback_layer: Some(5),
        ..strict.clone()
    };
    let sel = select(&fb).expect("fallback");
    assert_eq!(sel.layer, 5);
    assert_eq!(sel.direction.meta.extra["selected_layer"], "5");
    assert!(
        sel.direction.meta.extra["selection"].starts_with("fallback"),
        "{:?}",
        sel.direction.meta.extra
    );
    let out = SelectOptions {
        fallback_layer: Some(n_layers),
        ..strict
    };
    let e = select(&out).unwrap_err().to_string();
    assert!(e.contains("out of range") && !e.contains('\n'), "{e}");
}
