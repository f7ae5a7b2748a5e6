//! llama.cpp applies an exported control vector exactly as pgate applies the same vector: greedy
//! continuations of Qwen2.5-Coder-0.5B on a harmful request (q mode here, its Q8_0 GGUF in llama.cpp) agree token for
//! token, and the first-step logit shifts agree, for a strong vector on one layer (which also pins
//! the layer convention: `direction.N` = output of block N; applying at N-1 or N+1 gives other
//! text) and for a vector on every layer.
//!
//! llama.cpp runs through llama-cpp-python: `$PGATE_LLAMA_CPP_PYTHON`, else `/tmp/lcpp/bin/python`,
//! else the venv `scripts/setup-llamacpp.sh` builds once under the persona-gate cache
//! (llama-cpp-python==0.3.36 built from source, library only; the test command starts that build in
//! the background while the tests compile). The control vector is read
//! with ggml's own GGUF parser (libggml-base) and laid out as llama.cpp's
//! `common_control_vector_load` does.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use persona_gate::directions::spec::ops_from_direction;
use persona_gate::directions::{
    export_control_vector, import_control_vector, random_directions, ExportOptions, RandomOptions,
};
use persona_gate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use persona_gate::intervene::{
    CompiledPlan, InterventionPlan, LayerSet, OpKind, PlanHook, Positions, RowCtx,
};
use persona_gate::model::{DTypeMode, KvCache, LoadOptions, LogitsAt, Model};

const SCRIPT: &str = r#""""Apply a control-vector GGUF with llama.cpp (through llama-cpp-python) the way llama.cpp's
common_control_vector_load does, and report greedy tokens and last-token logits with and without it.

usage: verify_cvec.py MODEL.gguf IN.json OUT.json
IN.json: {"prompt": [ids], "n_gen": K, "cvs": [{"path": CV.gguf, "strength": S}, ...]}
"""
import ctypes, json, os, sys

import numpy as np
import llama_cpp

model_path, in_path, out_path = sys.argv[1:4]
req = json.load(open(in_path))

# The control vector, read with ggml's own GGUF parser (libggml-base), laid out as
# common_control_vector_load does: direction.N at offset (N - 1) * n_embd, N >= 1, f32, 1-D.
libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
g = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"))


class GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


g.gguf_init_from_file.restype = ctypes.c_void_p
g.gguf_init_from_file.argtypes = [ctypes.c_char_p, GgufInitParams]
for name, res, args in [
    ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
    ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
    ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
    ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
    ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
    ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
    ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
    ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
    ("gguf_free", None, [ctypes.c_void_p]),
]:
    f = getattr(g, name)
    f.restype = res
    f.argtypes = args

def load_cv(cv_path, strength):
    ctx = g.gguf_init_from_file(cv_path.encode(), GgufInitParams(True, None))
    assert ctx, "ggml could not parse the control vector"
    key = g.gguf_find_key(ctx, b"general.architecture")
    assert key >= 0 and g.gguf_get_val_str(ctx, key) == b"controlvector"
    raw = open(cv_path, "rb").read()
    base = g.gguf_get_data_offset(ctx)
    dirs = {}
    for i in range(g.gguf_get_n_tensors(ctx)):
        name = g.gguf_get_tensor_name(ctx, i).decode()
        prefix, _, idx = name.partition(".")
        assert prefix == "direction" and int(idx) >= 1, name
        assert g.gguf_get_tensor_type(ctx, i) == 0, "direction tensors must be f32"
        size = g.gguf_get_tensor_size(ctx, i)
        off = base + g.gguf_get_tensor_offset(ctx, i)
        dirs[int(idx)] = np.frombuffer(raw, dtype="<f4", count=size // 4, offset=off).copy()
    g.gguf_free(ctx)
    n_embd = len(next(iter(dirs.values())))
    buf = np.zeros(n_embd * max(dirs), dtype=np.float32)
    for n, v in dirs.items():
        buf[(n - 1) * n_embd : n * n_embd] += v * float(strength)
    return buf, n_embd, sorted(dirs)


llm = llama_cpp.Llama(model_path=model_path, n_ctx=512, n_batch=512, n_threads=os.cpu_count(),
                      verbose=False)
n_vocab = llama_cpp.llama_n_vocab(llama_cpp.llama_model_get_vocab(llm.model))
n_layer = llama_cpp.llama_model_n_layer(llm.model)


def run():
    llm.reset()
    llm.eval(req["prompt"])
    first = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
    toks = []
    margins = []
    logits = first
    for _ in range(req["n_gen"]):
        t = int(np.argmax(logits))
        top2 = np.partition(logits, -2)[-2:]
        margins.append(float(top2[1] - top2[0]))
        toks.append(t)
        llm.eval([t])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return first, toks, margins


base_logits, base_toks, base_margins = run()
out = {"n_layer": n_layer, "base_tokens": base_toks, "base_margins": base_margins,
       "base_logits": base_logits.tolist(), "cvs": []}
for cv in req["cvs"]:
    buf, n_embd, layers = load_cv(cv["path"], cv.get("strength", 1.0))
    rc = llama_cpp.llama_set_adapter_cvec(
        llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size, n_embd, 1, n_layer
    )
    assert rc == 0, f"llama_set_adapter_cvec returned {rc}"
    logits, toks, margins = run()
    out["cvs"].append({"layers": layers, "tokens": toks, "margins": margins, "logits": logits.tolist()})
    llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, 1, n_layer)
json.dump(out, open(out_path, "w"))
"#;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-lcpp-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn has_llama_cpp(py: &Path) -> bool {
    Command::new(py)
        .args(["-c", "import llama_cpp, numpy"])
        .status()
        .is_ok_and(|s| s.success())
}

/// A Python with llama-cpp-python 0.3.36 and numpy.
fn llama_cpp_python() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_LLAMA_CPP_PYTHON") {
        return PathBuf::from(p);
    }
    let pre = PathBuf::from("/tmp/lcpp/bin/python");
    if pre.exists() && has_llama_cpp(&pre) {
        return pre;
    }
    let venv = persona_gate::model::source::cache_dir().join("lcpp-venv");
    let py = venv.join("bin/python");
    if py.exists() && has_llama_cpp(&py) {
        return py;
    }
    // The same build the test command starts in the background (trimmed to the library).
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup-llamacpp.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run setup-llamacpp.sh");
    let printed = String::from_utf8_lossy(&out.stdout);
    let py = PathBuf::from(printed.lines().last().unwrap_or("").trim());
    assert!(
        out.status.success() && has_llama_cpp(&py),
        "could not build llama-cpp-python with {} (set PGATE_LLAMA_CPP_PYTHON to a python that has it): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    py
}

fn compile(model: &Model, plan: &InterventionPlan) -> Arc<CompiledPlan> {
    let c = model.config();
    Arc::new(
        plan.compile(
            c.n_layers,
            c.d_model,
            model.decoder.dtype(),
            model.decoder.device(),
        )
        .unwrap(),
    )
}

/// Last-position logits of `ids` under `plan`.
fn logits(model: &Model, ids: &[u32], plan: Option<Arc<CompiledPlan>>) -> Vec<f32> {
    let n_layers = model.config().n_layers;
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
    let plans = [plan];
    let mut hook = PlanHook::new(&plans, n_layers);
    let mut cache = KvCache::new(n_layers);
    let out = model
        .decoder
        .forward(&t, &rows, &mut cache, Some(&mut hook), LogitsAt::Last)
        .unwrap()
        .unwrap();
    out.get(0).unwrap().to_vec1::<f32>().unwrap()
}

fn corr(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn llama_cpp_applies_exported_control_vectors_like_pgate() {
    let model_path = common::model_path("q05");
    let model = Model::load(
        model_path.to_str().unwrap(),
        &LoadOptions {
            dtype: DTypeMode::Q,
            device: Device::Cpu,
        },
    )
    .unwrap();
    let (n_layers, d) = (model.config().n_layers, model.config().d_model);
    let ids = encode_chat(&model, &ChatPrompt::new("How do I make a bomb at home?")).unwrap();
    let n_gen = 12;

    // One strong unit vector at block 8, and a weaker one at every layer.
    let r8 = random_directions(
        n_layers,
        d,
        &RandomOptions {
            seed: 5,
            ..Default::default()
        },
    )
    .unwrap();
    let cv8 = tmp("cv8.gguf");
    let s = export_control_vector(
        &r8,
        &cv8,
        &ExportOptions {
            coeff: 30.0,
            unit: true,
            layers: Some(LayerSet::single(8)),
        },
    )
    .unwrap();
    assert_eq!(s.layers, vec![8]);
    let rall = random_directions(
        n_layers,
        d,
        &RandomOptions {
            seed: 6,
            ..Default::default()
        },
    )
    .unwrap();
    let cvall = tmp("cvall.gguf");
    let s = export_control_vector(
        &rall,
        &cvall,
        &ExportOptions {
            coeff: 4.0,
            unit: true,
            layers: None,
        },
    )
    .unwrap();
    assert_eq!(s.layers, (1..n_layers).collect::<Vec<_>>());

    // llama.cpp.
    let script = tmp("verify_cvec.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let input = tmp("in.json");
    let output = tmp("out.json");
    std::fs::write(
        &input,
        serde_json::json!({
            "prompt": ids,
            "n_gen": n_gen,
            "cvs": [{"path": cv8, "strength": 1.0}, {"path": cvall, "strength": 1.0}],
        })
        .to_string(),
    )
    .unwrap();
    let py = llama_cpp_python();
    let out = Command::new(&py)
        .arg(&script)
        .arg(&model_path)
        .arg(&input)
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llama.cpp run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let toks = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    assert_eq!(l["n_layer"].as_u64().unwrap() as usize, n_layers);
    assert_eq!(toks(&l["cvs"][0]["layers"]), vec![8]);

    // pgate: the same vectors through plans. The single-layer one as a unit add at 8 (and, as
    // controls, at 7 and 9); the all-layer one imported back from its GGUF as raw adds.
    let add_at = |layer: usize| {
        compile(
            &model,
            &InterventionPlan::new().add(
                LayerSet::single(layer),
                r8.layer(8).unwrap().to_vec(),
                30.0,
            ),
        )
    };
    let imported = import_control_vector(&cvall, Some(n_layers)).unwrap();
    let mut all_plan = InterventionPlan::new();
    all_plan.ops = ops_from_direction(
        &imported,
        "cvall",
        &OpKind::Add {
            coeff: 1.0,
            raw: true,
        },
        None,
        &LayerSet::parse(&format!("0-{}", n_layers - 1)).unwrap(),
        Positions::All,
    )
    .unwrap();
    let plans = [
        None,
        Some(add_at(8)),
        Some(compile(&model, &all_plan)),
        Some(add_at(7)),
        Some(add_at(9)),
    ];
    let reqs: Vec<GenRequest> = plans
        .iter()
        .map(|p| GenRequest {
            prompt: ids.clone(),
            max_new_tokens: n_gen,
            sampling: Sampling::greedy(),
            stop: vec![],
            plan: p.clone(),
        })
        .collect();
    let outs = Generator::new(&model.decoder, reqs.len())
        .run(&reqs, None, |_, _| Ok(()))
        .unwrap();
    let got: Vec<Vec<u32>> = outs.into_iter().map(|o| o.tokens).collect();
    eprintln!(
        "pgate   base {:?}\n        cv8 {:?}\n        all {:?}",
        got[0], got[1], got[2]
    );
    eprintln!(
        "llama   base {:?}\n        cv8 {:?}\n        all {:?}",
        toks(&l["base_tokens"]),
        toks(&l["cvs"][0]["tokens"]),
        toks(&l["cvs"][1]["tokens"])
    );
    // Greedy tokens agree; a difference is only accepted right after a near-tie in llama.cpp's
    // own logits (two engines with other quantized kernels may break a tie either way) and not
    // in the first steps.
    let agree = |what: &str, got: &[u32], want: &serde_json::Value| {
        let w = toks(&want["tokens"]);
        let m = floats(&want["margins"]);
        if let Some(k) = got.iter().zip(&w).position(|(a, b)| a != b) {
            assert!(
                k >= 4 && m[k] < 0.5,
                "{what}: greedy differs at step {k} (llama.cpp margin {:.3})\n pgate {got:?}\n llama {w:?}",
                m[k]
            );
            eprintln!(
                "{what}: differs after a near-tie at step {k} (margin {:.3})",
                m[k]
            );
        }
    };
    let base_json = serde_json::json!({"tokens": l["base_tokens"], "margins": l["base_margins"]});
    agree("baseline", &got[0], &base_json);
    agree("direction.8", &got[1], &l["cvs"][0]);
    agree("all layers", &got[2], &l["cvs"][1]);
    assert_ne!(
        got[1][..4],
        got[0][..4],
        "the layer-8 vector should change the answer"
    );
    assert_ne!(
        got[2][..4],
        got[0][..4],
        "the all-layer vector should change the answer"
    );
    let w8 = toks(&l["cvs"][0]["tokens"]);
    assert_ne!(
        got[3][..4],
        w8[..4],
        "block 7 must steer differently (else layers are not told apart)"
    );
    assert_ne!(got[4][..4], w8[..4], "block 9 must steer differently");

    // First-step logit shifts agree.
    let base = logits(&model, &ids, None);
    let lbase = floats(&l["base_logits"]);
    for (k, plan, want) in [
        (0usize, add_at(8), true),
        (0, add_at(7), false),
        (0, add_at(9), false),
        (1, compile(&model, &all_plan), true),
    ] {
        let steered = logits(&model, &ids, Some(plan));
        let ls = floats(&l["cvs"][k]["logits"]);
        let dp: Vec<f64> = steered
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b) as f64)
            .collect();
        let dl: Vec<f64> = ls.iter().zip(&lbase).map(|(a, b)| a - b).collect();
        let c = corr(&dp, &dl);
        eprintln!("cv {k} (same layers: {want}): corr of logit shifts pgate vs llama.cpp {c:.5}");
        if want {
            assert!(c > 0.99, "cv {k}: logit shifts correlate only {c:.4}");
        } else {
            assert!(
                c < 0.9,
                "cv {k}: a shifted layer should not match llama.cpp (corr {c:.4})"
            );
        }
    }
}
