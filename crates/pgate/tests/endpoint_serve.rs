//! An endpoint study against `pgate serve` over HTTP gives the same labels and the same texts as
//! the same conditions run locally: StrongREJECT prompts x built-in persona modes, greedy, on
//! Qwen2.5-Coder-0.5B, with batch-invariant kernels on both sides (the local run decodes its batch
//! of 6 together, the server batches whatever requests are in flight; without the mode, greedy
//! continuations may part after a few tokens). A small subset for CI time; the full run is in
//! `examples/results/audit_q15.md`.
//! Both studies write to one results database; the endpoint run is interrupted with `--limit`
//! and continued; `status` shows the endpoint, the model name the server reported and the usage;
//! steering on an endpoint study is an error at `study check`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use persona_gate::study::Store;

const MODEL: &str = "q05";
const PROMPTS: usize = 5;
const MAX_NEW: usize = 16;

fn pgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(args)
        .output()
        .expect("run pgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pgate_ok(args: &[&str]) -> String {
    let (ok, so, se) = pgate(args);
    assert!(ok, "pgate {args:?} failed:\n{so}\n{se}");
    so + &se
}

/// `pgate serve` on a free port; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args([
            "serve",
            model,
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--max-batch",
            "8",
            "--batch-invariant",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pgate serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(u) = line.trim().strip_prefix("listening on ") {
                let _ = tx.send(u.to_string());
            }
        }
    });
    let url = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(u) => u,
        Err(_) => {
            let _ = child.kill();
            panic!("pgate serve {model} did not say 'listening on' within 300 s");
        }
    };
    Server { child, url }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The shared part of both study files: prompts, generation, the persona-mode conditions.
fn body() -> String {
    format!(
        r#"[prompts]
sr = {{ source = "strongreject", n = {PROMPTS} }}
[generation]
max_new_tokens = {MAX_NEW}
batch_size = 6
temperature = 0.0
[[condition]]
name = "friendly"
persona = "friendly"
[[condition]]
name = "direct"
persona = "direct"
"#
    )
}

#[test]
fn served_model_gives_the_same_labels_as_local() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("endpoint-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("results.sqlite");
    let db_s = db.display().to_string();

    // Steering on an endpoint study is refused before anything runs.
    let bad = write(
        &dir,
        "bad.toml",
        "version = 1\nname = \"bad\"\n[model]\nendpoint = { base_url = \"http://127.0.0.1:9/v1\", model = \"default\" }\n[prompts]\nh = \"demo_harmful\"\n[[condition]]\nname = \"steer\"\nadd = [\"compliant.safetensors:8@12\"]\n",
    );
    let (ok, so, se) = pgate(&["study", "check", bad.to_str().unwrap()]);
    assert!(!ok, "{so}{se}");
    assert!(
        se.contains("condition 'steer'") && se.contains("steering needs the model's weights"),
        "{se}"
    );
    assert_eq!(se.trim().lines().count(), 1, "one error line: {se}");
    let bad = write(
        &dir,
        "bad2.toml",
        "version = 1\nname = \"bad2\"\n[model]\nbatch_invariant = true\nendpoint = { base_url = \"http://127.0.0.1:9/v1\", model = \"default\" }\n[prompts]\nh = \"demo_harmful\"\n[[condition]]\nname = \"base\"\n",
    );
    let (ok, so, se) = pgate(&["study", "check", bad.to_str().unwrap()]);
    assert!(!ok, "{so}{se}");
    assert!(se.contains("pgate serve --batch-invariant"), "{se}");

    // Local run.
    let local = write(
        &dir,
        "local.toml",
        &format!(
            "version = 1\nname = \"local\"\n[model]\nspec = \"{MODEL}\"\ndtype = \"q\"\nbatch_invariant = true\n{}",
            body()
        ),
    );
    pgate_ok(&[
        "study",
        "run",
        "--quiet",
        "--db",
        &db_s,
        local.to_str().unwrap(),
    ]);

    // The same conditions through pgate serve.
    let server = serve(MODEL);
    let served = write(
        &dir,
        "served.toml",
        &format!(
            "version = 1\nname = \"served\"\n[model]\nendpoint = {{ base_url = \"{}/v1\", model = \"default\", concurrency = 4, price_input_per_mtok = 0.5, price_output_per_mtok = 1.5 }}\n{}",
            server.url,
            body()
        ),
    );
    let out = pgate_ok(&["study", "check", served.to_str().unwrap()]);
    assert!(
        out.contains("endpoint http://127.0.0.1:") && out.contains("black box"),
        "{out}"
    );
    // Interrupted after 2 items, then continued: no duplicates.
    let out = pgate_ok(&[
        "study",
        "run",
        "--quiet",
        "--limit",
        "2",
        "--db",
        &db_s,
        served.to_str().unwrap(),
    ]);
    assert!(out.contains("wrote 2 results"), "{out}");
    let out = pgate_ok(&[
        "study",
        "run",
        "--quiet",
        "--db",
        &db_s,
        served.to_str().unwrap(),
    ]);
    let total = 2 * PROMPTS;
    assert!(
        out.contains(&format!(
            "{total} items: 2 stored, {} to request",
            total - 2
        )),
        "{out}"
    );
    assert!(out.contains("0 failed (recorded)"), "{out}");
    let status = pgate_ok(&["study", "status", "--db", &db_s, "--study", "served"]);
    assert!(status.contains("(100%)"), "{status}");
    assert!(
        status.contains("target: endpoint http://127.0.0.1:")
            && status.contains("server reported model default")
            && status.contains("white-box fields do not apply")
            && status.contains("estimated cost"),
        "{status}"
    );
    drop(server);

    // Same outputs, same labels, item by item.
    let store = Store::open_read(&db).unwrap();
    assert_eq!(store.count_duplicate_keys().unwrap(), 0);
    let rows = |name: &str| {
        let rec = store.find_study(Some(name)).unwrap();
        let mut v: Vec<(String, String, String, String)> = store
            .rows(&rec.hash)
            .unwrap()
            .into_iter()
            .map(|r| (r.condition, r.prompt_id, r.label, r.output))
            .collect();
        v.sort();
        (rec, v)
    };
    let (_, l) = rows("local");
    let (srec, s) = rows("served");
    assert_eq!(l.len(), total);
    assert_eq!(s.len(), total);
    // Batch-invariant kernels on both sides: the same labels and the same text, item by item,
    // although the local run decodes its batch of 6 together and the server batches whatever
    // requests are in flight.
    for (a, b) in l.iter().zip(&s) {
        assert_eq!((&a.0, &a.1), (&b.0, &b.1));
        assert_eq!(
            a.2, b.2,
            "label of {} / {}: local {:?} served {:?}",
            a.0, a.1, a.3, b.3
        );
        assert_eq!(
            a.3, b.3,
            "output of {} / {} differs between local and served",
            a.0, a.1
        );
    }
    eprintln!("{total} items: same labels, same outputs");
    // Token counts: the server's usage equals what the local run counted.
    let t = store.target(&srec.hash).unwrap().unwrap();
    assert_eq!(t.reported_models, ["default"]);
    assert_eq!(t.target["white_box"], false);
    let usage = store.endpoint_usage(&srec.hash).unwrap();
    assert_eq!(usage.iter().map(|u| u.rows).sum::<u64>(), total as u64);
    assert!(usage
        .iter()
        .all(|u| u.completion_tokens > 0 && u.rows_without_usage == 0));
}
