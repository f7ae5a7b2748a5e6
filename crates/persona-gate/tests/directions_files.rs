//! Direction values without a model: files (safetensors, llama.cpp control-vector GGUF), arithmetic,
//! geometry, random controls, trait files, difference in means, spec and plan parsing, and the
//! errors bad input must give.

mod common;

use std::path::PathBuf;

use persona_gate::directions::capture::{Activations, Position};
use persona_gate::directions::geometry::{cosine, random_abs_cos};
use persona_gate::directions::spec::ops_from_direction;
use persona_gate::directions::{
    diff_in_means, export_control_vector, import_control_vector, paired_pc1, random_directions,
    DirectionMeta, DirectionSet, DirectionSpec, ExportOptions, GeometryReport, Method, PlanBuilder,
    RandomOptions, TraitSpec, BUILTIN_TRAITS,
};
use persona_gate::intervene::{LayerSet, OpKind, Positions};
use persona_gate::Error;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-directions-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A deterministic set: layer l, entry j = sin(1 + l * 0.37 + j * 0.11) * (l + 1).
fn sample_set(name: &str, n_layers: usize, d: usize) -> DirectionSet {
    let rows: Vec<Vec<f32>> = (0..n_layers)
        .map(|l| {
            (0..d)
                .map(|j| ((1.0 + l as f32 * 0.37 + j as f32 * 0.11).sin()) * (l as f32 + 1.0))
                .collect()
        })
        .collect();
    let mut meta = DirectionMeta::new(name, "diff-in-means", n_layers, d);
    meta.model = "Test Model".into();
    meta.architecture = "qwen2".into();
    meta.model_sha256 = Some("ab".repeat(32));
    meta.position = "last".into();
    meta.prompt_set_sha256 = Some("cd".repeat(32));
    meta.n_pos = 3;
    meta.n_neg = 4;
    meta.seed = Some(42);
    meta.extra.insert("trait".into(), "compliant".into());
    DirectionSet::from_rows(meta, rows).unwrap()
}

fn acts(n_layers: usize, rows: Vec<Vec<f32>>) -> Activations {
    // Same rows at every layer, scaled by (layer + 1).
    let n = rows.len();
    let d = rows[0].len();
    let mut data = Vec::new();
    for l in 0..n_layers {
        for r in &rows {
            data.extend(r.iter().map(|x| x * (l as f32 + 1.0)));
        }
    }
    Activations {
        n_layers,
        n,
        d,
        data,
        counts: vec![1; n],
        position: Position::LAST,
        responses: None,
    }
}

#[test]
fn safetensors_round_trip_keeps_vectors_metadata_and_means() {
    let mut s = sample_set("refusal", 5, 16);
    s.pos_mean = Some(vec![0.5; 5 * 16]);
    s.neg_mean = Some(vec![-0.25; 5 * 16]);
    let p = tmp("rt.safetensors");
    s.save(&p).unwrap();
    let back = DirectionSet::load(&p).unwrap();
    assert_eq!(back, s, "vectors, metadata and means survive the file");
    assert_eq!(back.meta.tool_version, env!("CARGO_PKG_VERSION"));
    assert!(back.meta.created.ends_with('Z'));
    // The file also holds the unit form, readable by any safetensors reader.
    let t = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
    let unit = t["unit"].to_vec2::<f32>().unwrap();
    for (l, row) in unit.iter().enumerate() {
        let n: f64 = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "unit row {l} has norm {n}");
        let c = cosine(row, s.layer(l).unwrap()).unwrap();
        assert!((c - 1.0).abs() < 1e-6);
    }
}

#[test]
fn loads_the_fixture_reference_file_as_a_direction_set() {
    let (r, st) = common::fixture("q05");
    let s = DirectionSet::load(&st).unwrap();
    assert_eq!(s.n_layers(), r["n_layers"].as_u64().unwrap() as usize);
    assert_eq!(s.d_model(), r["d_model"].as_u64().unwrap() as usize);
    assert_eq!(s.name(), "reference");
    assert_eq!(s.meta.method, "unknown");
}

#[test]
fn gguf_control_vector_round_trip() {
    let s = sample_set("compliant", 6, 32);
    let p = tmp("cv.gguf");
    let summary = export_control_vector(&s, &p, &ExportOptions::default()).unwrap();
    // llama.cpp cannot steer the output of block 0.
    assert!(summary.skipped_layer0);
    assert_eq!(summary.layers, vec![1, 2, 3, 4, 5]);
    // The file is what llama.cpp reads: controlvector architecture, direction.N f32 1-D tensors.
    let mut f = std::fs::File::open(&p).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        c.metadata["general.architecture"].to_string().unwrap(),
        "controlvector"
    );
    assert_eq!(
        c.metadata["controlvector.model_hint"].to_string().unwrap(),
        "qwen2"
    );
    assert_eq!(c.metadata["controlvector.layer_count"].to_u32().unwrap(), 5);
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "direction.1",
            "direction.2",
            "direction.3",
            "direction.4",
            "direction.5"
        ]
    );
    for (n, ti) in &c.tensor_infos {
        assert_eq!(ti.shape.dims(), &[32], "{n}");
        assert_eq!(ti.ggml_dtype, candle_core::quantized::GgmlDType::F32);
    }
    let back = import_control_vector(&p, None).unwrap();
    assert_eq!(back.n_layers(), 6);
    assert_eq!(back.d_model(), 32);
    assert!(back.layer(0).unwrap().iter().all(|x| *x == 0.0));
    for l in 1..6 {
        assert_eq!(back.layer(l).unwrap(), s.layer(l).unwrap(), "layer {l}");
    }
    assert_eq!(back.name(), "compliant");
    assert_eq!(back.meta.model_sha256, s.meta.model_sha256);
    assert_eq!(back.meta.extra["layers_present"], "1,2,3,4,5");

    // Scaled unit export of chosen layers.
    let p2 = tmp("cv2.gguf");
    let opts = ExportOptions {
        coeff: 3.0,
        unit: true,
        layers: Some(LayerSet::parse("2-3").unwrap()),
    };
    let summary = export_control_vector(&s, &p2, &opts).unwrap();
    assert_eq!(summary.layers, vec![2, 3]);
    assert!(!summary.skipped_layer0);
    let back = import_control_vector(&p2, Some(24)).unwrap();
    assert_eq!(back.n_layers(), 24);
    let n = back.norms();
    assert!((n[2] - 3.0).abs() < 1e-5 && (n[3] - 3.0).abs() < 1e-5);
    assert_eq!(n[1], 0.0);
    // A model with fewer layers than the file steers is an error.
    let e = import_control_vector(&p2, Some(3)).unwrap_err().to_string();
    assert!(e.contains("direction.3"), "{e}");
    // Layer out of range on export.
    let bad = ExportOptions {
        layers: Some(LayerSet::parse("9").unwrap()),
        ..Default::default()
    };
    assert!(matches!(
        export_control_vector(&s, &tmp("x.gguf"), &bad),
        Err(Error::LayerOutOfRange { layer: 9, .. })
    ));
    // A model file is not a control vector.
    let not_cv = tmp("model-like.gguf");
    {
        use candle_core::quantized::gguf_file::{write, Value};
        let t = candle_core::quantized::QTensor::quantize(
            &candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        let arch = Value::String("llama".into());
        let mut f = std::fs::File::create(&not_cv).unwrap();
        write(
            &mut f,
            &[("general.architecture", &arch)],
            &[("direction.1", &t)],
        )
        .unwrap();
    }
    let e = import_control_vector(&not_cv, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not 'controlvector'"), "{e}");
}

#[test]
fn arithmetic_like_repeng() {
    let a = sample_set("a", 3, 8);
    let b = sample_set("b", 3, 8).scale(0.5).unwrap();
    let c = (&a - &b).unwrap();
    for l in 0..3 {
        for (j, x) in c.layer(l).unwrap().iter().enumerate() {
            let want = a.layer(l).unwrap()[j] * 0.5;
            assert!((x - want).abs() < 1e-6);
        }
    }
    let d = (&(0.5 * &a).unwrap() + &(0.5 * &a).unwrap()).unwrap();
    assert_eq!(d.as_flat(), a.as_flat());
    assert_eq!(d.meta.method, "arithmetic");
    assert!(d.meta.extra["expression"].contains('+'));
    let n = -&a;
    assert!(n.as_flat().iter().zip(a.as_flat()).all(|(x, y)| *x == -*y));
    let u = a.unit();
    for x in u.norms() {
        assert!((x - 1.0).abs() < 1e-6);
    }
    // Shapes must agree; factors must be finite.
    let other = sample_set("other", 4, 8);
    let e = (&a + &other).unwrap_err().to_string();
    assert!(e.contains("4 layers"), "{e}");
    assert!(a.scale(f32::NAN).is_err());
    assert!(a.scale(f32::INFINITY).is_err());
    // Non-finite values never enter a set.
    let meta = DirectionMeta::new("bad", "x", 1, 2);
    assert!(DirectionSet::from_rows(meta.clone(), vec![vec![1.0, f32::NAN]]).is_err());
    assert!(DirectionSet::from_rows(meta.clone(), vec![]).is_err());
    assert!(DirectionSet::from_rows(meta, vec![vec![1.0, 2.0], vec![1.0]]).is_err());
}

#[test]
fn geometry_cosines_norms_and_random_controls() {
    let v = sample_set("v", 4, 64);
    let neg = -&v;
    let r = GeometryReport::new(&[&v, &v, &neg], true).unwrap();
    assert_eq!(r.names, vec!["v", "v#2", "-v"]);
    for l in 0..4 {
        assert!((r.pairs[0].cos[l].unwrap() - 1.0).abs() < 1e-12, "cos(v,v)");
        assert!(
            (r.pairs[1].cos[l].unwrap() + 1.0).abs() < 1e-12,
            "cos(v,-v)"
        );
        assert!((r.norms[0][l] - v.norms()[l]).abs() < 1e-12);
        let m = r.across_layers.as_ref().unwrap();
        assert!((m[0][l][l].unwrap() - 1.0).abs() < 1e-12);
    }
    assert_eq!(r.adjacent[0].len(), 3);
    let csv = r.to_csv();
    assert!(csv.starts_with("kind,a,b,layer_a,layer_b,value\n"));
    assert!(csv.contains("cos,v,-v,2,2,-1.000000"));
    assert!(csv.contains("adjacent,v,v,0,1,"));
    let table = r.to_table();
    assert!(table.contains("cos(v,-v)"), "{table}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["pairs"][1]["cos"][0].as_f64().unwrap().round(), -1.0);

    // Random directions are near-orthogonal to the direction and to each other.
    let d = 896;
    let a = random_directions(
        8,
        d,
        &RandomOptions {
            seed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let b = random_directions(
        8,
        d,
        &RandomOptions {
            seed: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let again = random_directions(
        8,
        d,
        &RandomOptions {
            seed: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(a.as_flat(), again.as_flat(), "a seed names the set");
    assert_eq!(a.meta.seed, Some(1));
    let bound = 5.0 / (d as f64).sqrt();
    let mut mean_abs = 0.0;
    for c in a.cosines(&b).unwrap() {
        let c = c.unwrap();
        assert!(c.abs() < bound, "random cos {c}");
        mean_abs += c.abs() / 8.0;
    }
    assert!(mean_abs < 3.0 * random_abs_cos(d), "mean |cos| {mean_abs}");
    for n in a.norms() {
        assert!((n - 1.0).abs() < 1e-5);
    }
    // Orthogonal to and norm-matched with a given direction.
    let v = sample_set("refusal", 8, d);
    let c = random_directions(
        8,
        d,
        &RandomOptions {
            seed: 3,
            orthogonal_to: Some(&v),
            like: Some(&v),
        },
    )
    .unwrap();
    for (l, cs) in c.cosines(&v).unwrap().into_iter().enumerate() {
        assert!(cs.unwrap().abs() < 1e-5, "layer {l}: cos {cs:?}");
        assert!((c.norms()[l] / v.norms()[l] - 1.0).abs() < 1e-5);
    }
    assert_eq!(c.meta.extra["orthogonal_to"], "refusal");
    assert_eq!(c.meta.extra["norm_matched_to"], "refusal");
    assert_eq!(c.meta.model, "Test Model");
    // Shape mismatch is an error.
    assert!(random_directions(
        7,
        d,
        &RandomOptions {
            seed: 3,
            like: Some(&v),
            ..Default::default()
        }
    )
    .is_err());
    let small = sample_set("small", 8, 16);
    let e = GeometryReport::new(&[&v, &small], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different models"), "{e}");
}

#[test]
fn builtin_and_shared_trait_files_parse() {
    for name in BUILTIN_TRAITS {
        let t = TraitSpec::builtin(name).unwrap();
        assert_eq!(t.instruction.len(), 5, "{name}");
        assert!(t.questions.len() >= 20, "{name}");
        let judge = t.judge_prompt("Q?", "A.").unwrap();
        assert!(judge.contains("Q?") && judge.contains("A."), "{name}");
    }
    let c = TraitSpec::load("compliant").unwrap();
    assert_eq!(c.questions.len(), 40);
    assert_eq!(c.source, "builtin:compliant");
    // The persona-vectors / assistant-axis files of the paper's eight relational traits.
    let dir = common::shared_dir().join("data/traits");
    for name in [
        "evil",
        "nurturing",
        "callous",
        "supportive",
        "hostile",
        "patient",
        "arrogant",
        "diplomatic",
    ] {
        let p = dir.join(format!("{name}.json"));
        let t = TraitSpec::load(p.to_str().unwrap()).unwrap();
        assert_eq!(t.name, name);
        assert_eq!(t.instruction.len(), 5);
        assert_eq!(t.questions.len(), 40);
        assert!(t.eval_prompt.as_deref().unwrap().contains("{question}"));
        assert!(t.source.contains("sha256"));
    }
}

#[test]
fn bad_trait_files_give_clear_errors() {
    let ok_instr = r#""instruction": [{"pos": "be x", "neg": "be y"}]"#;
    let cases = [
        (
            r#"{"questions": ["q"]}"#.to_string(),
            "missing key 'instruction'",
        ),
        (
            r#"{"instructions": [{"pos": "a", "neg": "b"}], "questions": ["q"]}"#.to_string(),
            "found 'instructions'",
        ),
        (format!("{{{ok_instr}}}"), "missing key 'questions'"),
        (
            r#"{"instruction": [], "questions": ["q"]}"#.to_string(),
            "'instruction' is empty",
        ),
        (
            format!("{{{ok_instr}, \"questions\": []}}"),
            "'questions' is empty",
        ),
        (
            r#"{"instruction": [{"pos": "a"}], "questions": ["q"]}"#.to_string(),
            "no string 'neg'",
        ),
        (
            r#"{"instruction": [{"pos": "a", "neg": " "}], "questions": ["q"]}"#.to_string(),
            "empty 'neg'",
        ),
        (
            format!("{{{ok_instr}, \"questions\": [3]}}"),
            "question 0 is not a string",
        ),
        (
            format!("{{{ok_instr}, \"questions\": \"q\"}}"),
            "must be a list",
        ),
        ("[1, 2]".to_string(), "must be a JSON object"),
        ("{not json".to_string(), "not valid JSON"),
    ];
    for (text, want) in cases {
        let e = TraitSpec::parse("t", "test", &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text}: got '{e}', want '{want}'");
    }
    let p = tmp("broken_trait.json");
    std::fs::write(&p, r#"{"questions": ["q"]}"#).unwrap();
    let e = TraitSpec::load(p.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("broken_trait.json") && e.contains("instruction"),
        "{e}"
    );
    let e = TraitSpec::load("no-such-trait").unwrap_err().to_string();
    assert!(e.contains("compliant"), "{e}");
}

#[test]
fn diff_in_means_and_paired_pca() {
    let pos = acts(2, vec![vec![1.0, 2.0, 0.0], vec![3.0, 2.0, 1.0]]);
    let neg = acts(
        2,
        vec![
            vec![0.0, 0.0, 0.0],
            vec![1.0, 1.0, 1.0],
            vec![2.0, 2.0, 2.0],
        ],
    );
    let (diff, mp, mn) = diff_in_means(&pos, &neg).unwrap();
    // Layer 0: mean pos (2, 2, 0.5) - mean neg (1, 1, 1); layer 1 doubles.
    let want = [1.0, 1.0, -0.5, 2.0, 2.0, -1.0];
    for (g, w) in diff.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{diff:?}");
    }
    assert_eq!(&mp[..3], &[2.0, 2.0, 0.5]);
    assert_eq!(&mn[..3], &[1.0, 1.0, 1.0]);
    // Rows without activations (answers that stopped at once) are left out.
    let mut pos2 = pos.clone();
    pos2.counts[1] = 0;
    let (d2, _, _) = diff_in_means(&pos2, &neg).unwrap();
    assert_eq!(&d2[..3], &[0.0, 1.0, -1.0]);
    // One-sided sets are errors.
    let empty = Activations {
        n: 0,
        data: vec![],
        counts: vec![],
        ..pos.clone()
    };
    let e = diff_in_means(&pos, &empty).unwrap_err().to_string();
    assert!(e.contains("one-sided"), "{e}");
    let e = diff_in_means(&empty, &neg).unwrap_err().to_string();
    assert!(e.contains("one-sided"), "{e}");

    // Paired differences along a planted axis (plus small orthogonal noise): PC1 recovers it,
    // signed like the difference in means.
    let axis = [0.6f32, 0.0, 0.8, 0.0];
    let mut prow = Vec::new();
    let mut nrow = Vec::new();
    for i in 0..6 {
        let base: Vec<f32> = (0..4).map(|j| ((i * 4 + j) as f32 * 0.7).cos()).collect();
        let s = 2.0 + i as f32 * 0.3;
        let noise = [0.0, 0.05 * (i as f32 - 2.5), 0.0, 0.03];
        nrow.push(base.clone());
        prow.push(
            base.iter()
                .zip(axis)
                .zip(noise)
                .map(|((b, a), n)| b + s * a + n)
                .collect(),
        );
    }
    let (p, n) = (acts(1, prow), acts(1, nrow));
    let pc = paired_pc1(&p, &n).unwrap();
    let c = cosine(&pc, &axis).unwrap();
    assert!(c > 0.999, "pc1 cos with planted axis {c}");
    let (dm, _, _) = diff_in_means(&p, &n).unwrap();
    assert!(cosine(&pc, &dm).unwrap() > 0.99);
    // Unpaired sides are an error for PCA.
    assert!(paired_pc1(&pos, &neg).is_err());
    assert_eq!(Method::parse("pca").unwrap(), Method::PcaPaired);
    assert!(Method::parse("median").is_err());
}

#[test]
fn positions_parse() {
    assert_eq!(Position::parse("last").unwrap(), Position::LAST);
    assert_eq!(Position::parse("-3").unwrap(), Position::FromEnd(3));
    assert_eq!(
        Position::parse("post-instruction").unwrap(),
        Position::PostInstruction
    );
    assert_eq!(Position::parse("response").unwrap(), Position::Response);
    assert!(Position::parse("-0").is_err());
    assert!(Position::parse("middle").is_err());
    assert_eq!(Position::FromEnd(2).name(), "-2");
}

#[test]
fn cli_specs_parse_and_reject_malformed_input() {
    let s = DirectionSpec::parse_add("dirs/refusal.safetensors[12]:-8.5@0-3,7/generated").unwrap();
    assert_eq!(s.file, PathBuf::from("dirs/refusal.safetensors"));
    assert_eq!(s.pick, Some(12));
    assert_eq!(s.layers, LayerSet::parse("0,1,2,3,7").unwrap());
    assert_eq!(s.positions, Positions::Generated);
    assert_eq!(
        s.kind,
        OpKind::Add {
            coeff: -8.5,
            raw: false
        }
    );
    let s = DirectionSpec::parse_add_raw("c.safetensors:2@5").unwrap();
    assert_eq!(
        s.kind,
        OpKind::Add {
            coeff: 2.0,
            raw: true
        }
    );
    assert_eq!(s.pick, None);
    let s = DirectionSpec::parse_ablate("r.safetensors@10-12").unwrap();
    assert_eq!(s.kind, OpKind::Ablate);
    let s = DirectionSpec::parse_cap("axis.safetensors:-4:@10").unwrap();
    assert_eq!(
        s.kind,
        OpKind::Cap {
            lo: Some(-4.0),
            hi: None
        }
    );
    let s = DirectionSpec::parse_cap("axis.safetensors[3]:-1:2.5@10").unwrap();
    assert_eq!(
        s.kind,
        OpKind::Cap {
            lo: Some(-1.0),
            hi: Some(2.5)
        }
    );
    let bad = [
        ("add", "r.safetensors:8", "missing '@LAYERS'"),
        ("add", "r.safetensors@12", "missing ':COEFF'"),
        ("add", "r.safetensors:eight@12", "not a number"),
        ("add", "r.safetensors:NaN@12", "not finite"),
        ("add", "r.safetensors:inf@12", "not finite"),
        ("add", "r.safetensors:1@", "no layers"),
        ("add", "r.safetensors:1@5-2", "backwards"),
        ("add", "r.safetensors:1@x", "integers"),
        ("add", ":1@3", "no direction file"),
        ("add", "r.safetensors[x]:1@3", "layer number"),
        ("add", "r.safetensors:1@3/middle", "positions"),
        ("cap", "r.safetensors::@3", "LO, HI or both"),
        ("cap", "r.safetensors:5:1@3", "reversed"),
        ("cap", "r.safetensors:1@3", "missing ':LO:HI'"),
        ("ablate", "r.safetensors", "missing '@LAYERS'"),
    ];
    for (kind, spec, want) in bad {
        let r = match kind {
            "add" => DirectionSpec::parse_add(spec),
            "cap" => DirectionSpec::parse_cap(spec),
            _ => DirectionSpec::parse_ablate(spec),
        };
        let e = r.unwrap_err();
        assert!(matches!(e, Error::InvalidSpec { .. }), "{spec}: {e}");
        let e = e.to_string();
        assert!(e.contains(want), "{spec}: got '{e}', want '{want}'");
        assert!(
            e.contains(spec),
            "{spec}: message should quote the spec: {e}"
        );
    }
}

#[test]
fn plans_from_direction_files() {
    let s = sample_set("refusal", 6, 16);
    let p = tmp("plan_dir.safetensors");
    s.save(&p).unwrap();
    let path = p.to_str().unwrap();
    // Per-layer vectors: one op per layer, each with its layer's vector.
    let mut b = PlanBuilder::new();
    b.spec(&DirectionSpec::parse_ablate(&format!("{path}@2-4")).unwrap())
        .unwrap();
    b.spec(&DirectionSpec::parse_add(&format!("{path}[5]:4@0,1")).unwrap())
        .unwrap();
    let plan = b.finish(6, 16).unwrap();
    assert_eq!(plan.ops.len(), 4);
    for (i, l) in [2usize, 3, 4].iter().enumerate() {
        assert_eq!(plan.ops[i].layers, LayerSet::single(*l));
        assert_eq!(plan.ops[i].direction, s.layer(*l).unwrap());
        assert_eq!(plan.ops[i].direction_name, format!("refusal@{l}"));
    }
    assert_eq!(plan.ops[3].layers, LayerSet::parse("0,1").unwrap());
    assert_eq!(plan.ops[3].direction, s.layer(5).unwrap());
    plan.compile(6, 16, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();

    // Wrong width for the model.
    let e = b.finish(6, 32).unwrap_err().to_string();
    assert!(e.contains("width 16") && e.contains("width 32"), "{e}");
    // Layer out of range for the model.
    assert!(matches!(
        b.finish(3, 16),
        Err(Error::LayerOutOfRange {
            layer: 3,
            n_layers: 3
        })
    ));
    // Layer out of range for the file.
    let e = PlanBuilder::new()
        .spec(&DirectionSpec::parse_ablate(&format!("{path}@4-9")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 6 is out of range") && e.contains("6 layers"),
        "{e}"
    );
    let e = PlanBuilder::new()
        .spec(&DirectionSpec::parse_ablate(&format!("{path}[7]@1")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 7 is out of range"), "{e}");
    // A missing file names the spec and the path.
    let e = PlanBuilder::new()
        .spec(&DirectionSpec::parse_ablate("/nonexistent/r.safetensors@1").unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/r.safetensors"), "{e}");
    // A zero vector cannot be ablated (imported control vectors have zero rows).
    let z = DirectionSet::from_rows(
        DirectionMeta::new("z", "x", 2, 4),
        vec![vec![0.0; 4], vec![1.0; 4]],
    )
    .unwrap();
    let e = ops_from_direction(
        &z,
        "z",
        &OpKind::Ablate,
        None,
        &LayerSet::parse("0-1").unwrap(),
        Positions::All,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("zero at layer 0"), "{e}");
    // Raw adds of zero rows are fine (they do nothing).
    ops_from_direction(
        &z,
        "z",
        &OpKind::Add {
            coeff: 1.0,
            raw: true,
        },
        None,
        &LayerSet::parse("0-1").unwrap(),
        Positions::All,
    )
    .unwrap();
}

#[test]
fn toml_and_json_plan_files() {
    let s = sample_set("persona", 4, 8);
    let dir = tmp("plans");
    std::fs::create_dir_all(&dir).unwrap();
    s.save(&dir.join("persona.safetensors")).unwrap();
    let toml_plan = dir.join("plan.toml");
    std::fs::write(
        &toml_plan,
        r#"
[[ops]]
op = "ablate"
layers = "1-2"
direction = { file = "persona.safetensors" }

[[ops]]
op = "add"
coeff = 6.0
layers = 3
positions = "generated"
direction = { file = "persona.safetensors", layer = 1 }

[[ops]]
op = "cap"
hi = 2.5
layers = [0, 3]
direction = "persona.safetensors[2]"

[[ops]]
op = "add"
coeff = 1.0
raw = true
layers = "0"
name = "inline"
direction = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]
"#,
    )
    .unwrap();
    let mut b = PlanBuilder::new();
    b.plan_file(&toml_plan).unwrap();
    let plan = b.finish(4, 8).unwrap();
    assert_eq!(plan.ops.len(), 5);
    assert_eq!(plan.ops[0].direction, s.layer(1).unwrap());
    assert_eq!(plan.ops[1].direction, s.layer(2).unwrap());
    assert_eq!(plan.ops[2].positions, Positions::Generated);
    assert_eq!(plan.ops[2].direction, s.layer(1).unwrap());
    assert_eq!(plan.ops[3].layers, LayerSet::parse("0,3").unwrap());
    assert_eq!(
        plan.ops[3].kind,
        OpKind::Cap {
            lo: None,
            hi: Some(2.5)
        }
    );
    assert_eq!(plan.ops[4].direction_name, "inline");

    // The engine's JSON plan form still works (inline vectors).
    let json_plan = dir.join("plan.json");
    std::fs::write(
        &json_plan,
        r#"{"ops": [{"op": "add", "coeff": 8.0, "layers": "2", "positions": "all", "direction": [0,0,0,0,0,0,0,1]}]}"#,
    )
    .unwrap();
    let mut b = PlanBuilder::new();
    b.plan_file(&json_plan).unwrap();
    assert_eq!(b.finish(4, 8).unwrap().ops.len(), 1);

    // Errors name the file and the op.
    let bad = [
        (
            "op = 1",
            r#"[[ops]]
op = "add"
layers = "1"
direction = { file = "persona.safetensors" }
"#,
            "add needs 'coeff'",
        ),
        (
            "unknown op",
            r#"[[ops]]
op = "steer"
layers = "1"
direction = { file = "persona.safetensors" }
"#,
            "unknown op 'steer'",
        ),
        (
            "typo",
            r#"[[ops]]
op = "ablate"
layer = "1"
direction = { file = "persona.safetensors" }
"#,
            "unknown field",
        ),
        (
            "nan",
            r#"[[ops]]
op = "add"
coeff = nan
layers = "1"
direction = { file = "persona.safetensors" }
"#,
            "not finite",
        ),
    ];
    for (what, text, want) in bad {
        let p = dir.join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let mut b = PlanBuilder::new();
        let e = match b.plan_file(&p) {
            Err(e) => e.to_string(),
            Ok(b) => b.finish(4, 8).unwrap_err().to_string(),
        };
        assert!(e.contains(want), "{what}: got '{e}', want '{want}'");
    }
}
