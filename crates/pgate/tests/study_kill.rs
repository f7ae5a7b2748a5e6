//! `pgate study run` survives being killed: SIGKILL in the middle (twice) and Ctrl-C (SIGINT)
//! leave only complete rows, and running again finishes with exactly one row per work item, none
//! recomputed. Then `status`, `table` and `export` read the finished database.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use persona_gate::study::Store;

fn models_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_MODELS_DIR") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    std::env::var_os("PGATE_CACHE")
        .map(PathBuf::from)
        .unwrap_or(home.join(".cache/persona-gate"))
        .join("models")
}

fn smollm2() -> PathBuf {
    let p = models_dir().join("smollm2.gguf");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup-models.sh smollm2",
        p.display()
    );
    p
}

fn count(db: &std::path::Path) -> usize {
    Store::open_read(db)
        .and_then(|s| s.count_results())
        .unwrap_or(0)
}

fn start(study: &std::path::Path, db: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(["study", "run", "--quiet", "--wave", "2", "--db"])
        .arg(db)
        .arg(study)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgate study run")
}

/// Wait until the database holds at least `n` rows; fail if the run ends or stalls first.
fn wait_for(child: &mut Child, db: &std::path::Path, n: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(240);
    loop {
        let c = count(db);
        if c >= n {
            return c;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("run ended ({status}) with {c} rows before reaching {n}: {err}");
        }
        assert!(
            Instant::now() < end,
            "no progress: {c} rows, waiting for {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(args)
        .output()
        .expect("run pgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn killed_runs_continue_without_duplicates() {
    let t0 = Instant::now();
    let dir = std::env::temp_dir().join(format!("pgate-study-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let study = dir.join("kill.toml");
    std::fs::write(
        &study,
        format!(
            r#"version = 1
name = "kill-test"
[model]
spec = "{}"
dtype = "q"
[prompts]
harmful = {{ source = "demo_harmful", n = 6 }}
[generation]
max_new_tokens = 12
batch_size = 2
[[condition]]
name = "baseline"
[[condition]]
name = "direct"
persona = "direct"
"#,
            smollm2().display()
        ),
    )
    .unwrap();
    let db = dir.join("kill.sqlite");
    let total = 2 * 6;

    // SIGKILL once some rows exist.
    let mut c = start(&study, &db);
    let seen = wait_for(&mut c, &db, 2);
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    let after1 = count(&db);
    assert!(
        after1 >= seen && after1 < total,
        "killed in the middle: {after1}/{total}"
    );

    // Ctrl-C: the current wave is written, then a clean exit with status 130.
    let mut c = start(&study, &db);
    wait_for(&mut c, &db, after1 + 1);
    let pid = c.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("Ctrl-C") && err.contains("interrupted"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let after2 = count(&db);
    assert!(after2 > after1, "{after2} > {after1}");

    // SIGKILL again (unless the interrupted run already left little to do).
    if after2 + 1 < total {
        let mut c = start(&study, &db);
        let seen = wait_for(&mut c, &db, after2 + 1);
        c.kill().unwrap();
        c.wait().unwrap();
        let after3 = count(&db);
        assert!(after3 >= seen && after3 <= total);
    }
    let before_last = count(&db);

    // Run to completion: nothing stored is recomputed, nothing is duplicated.
    let out = start(&study, &db).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{total} items: {before_last} stored, {} to generate",
            total - before_last
        )),
        "{err}"
    );
    let store = Store::open_read(&db).unwrap();
    assert_eq!(store.count_results().unwrap(), total);
    assert_eq!(store.count_duplicate_keys().unwrap(), 0);
    drop(store);

    // The finished database through the other commands.
    let d = db.to_str().unwrap();
    let (code, out, err) = pgate(&["study", "status", "--db", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("12/12") && out.contains("100%"), "{out}");
    let (code, out, err) = pgate(&["study", "status", "--db", d, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["done"].as_u64(), v["total"].as_u64()),
        (Some(12), Some(12))
    );
    let csv = dir.join("table.csv");
    let (code, out, err) = pgate(&["study", "table", "--db", d, "--csv", csv.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("baseline") && out.contains("direct") && out.contains("McNemar"),
        "{out}"
    );
    assert!(std::fs::read_to_string(&csv)
        .unwrap()
        .starts_with("condition,"));
    let jl = dir.join("rows.jsonl");
    let (code, out, err) = pgate(&[
        "study",
        "export",
        "--db",
        d,
        "--format",
        "jsonl",
        "-o",
        jl.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("12 rows"), "{out}");
    assert_eq!(std::fs::read_to_string(&jl).unwrap().lines().count(), total);
    // Bad input: one clear error line.
    let (code, _, err) = pgate(&["study", "export", "--db", d, "--format", "xls", "-o", "x"]);
    assert_ne!(code, 0);
    assert!(
        err.trim().lines().count() == 1 && err.contains("xls"),
        "{err}"
    );
    let (code, _, err) = pgate(&[
        "study",
        "status",
        "--db",
        dir.join("none.sqlite").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no results database"), "{err}");
    eprintln!("study_kill: {:.1} s", t0.elapsed().as_secs_f64());
}
