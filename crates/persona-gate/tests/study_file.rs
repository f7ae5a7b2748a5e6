//! Study files: bad input fails with an error that names the problem; sweeps expand as
//! documented; hashes cover what changes outputs and nothing else. No model is loaded.

use std::path::{Path, PathBuf};

use persona_gate::study::{Study, StudyFile};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-study-file-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const HEAD: &str = r#"
version = 1
name = "t"
[model]
spec = "smollm2"
[prompts]
harmful = { source = "demo_harmful", n = 4 }
"#;

fn parse(body: &str) -> persona_gate::Result<StudyFile> {
    StudyFile::parse(&format!("{HEAD}{body}"), Path::new("."))
}

fn err(body: &str) -> String {
    match parse(body) {
        Ok(_) => panic!("study should not parse:\n{body}"),
        Err(e) => e.to_string(),
    }
}

fn assert_err(body: &str, needles: &[&str]) {
    let e = err(body);
    for n in needles {
        assert!(e.contains(n), "error lacks '{n}': {e}");
    }
    assert!(!e.contains('\n'), "error should be one line: {e}");
}

/// A real (tiny) direction file, so resolution can hash it.
fn direction_file(dir: &Path) -> PathBuf {
    use persona_gate::directions::{DirectionMeta, DirectionSet};
    let p = dir.join("compliant.safetensors");
    let rows: Vec<Vec<f32>> = (0..4).map(|l| vec![1.0 + l as f32, 0.5, -0.25]).collect();
    DirectionSet::from_rows(DirectionMeta::new("compliant", "test", 4, 3), rows)
        .unwrap()
        .save(&p)
        .unwrap();
    p
}

#[test]
fn unknown_direction_name() {
    assert_err(
        "[directions]\nrefusal = \"r.safetensors\"\n[[condition]]\nname = \"s\"\nadd = [\"compliantt:8@12\"]\n",
        &["condition 's'", "compliantt:8@12", "unknown direction 'compliantt'", "refusal"],
    );
}

#[test]
fn malformed_spec() {
    assert_err(
        "[directions]\nc = \"c.safetensors\"\n[[condition]]\nname = \"s\"\nadd = [\"c:8\"]\n",
        &["condition 's'", "add = \"c:8\"", "missing '@LAYERS'"],
    );
    assert_err(
        "[directions]\nc = \"c.safetensors\"\n[[condition]]\nname = \"s\"\nablate = [\"c@12-4\"]\n",
        &["ablate", "backwards"],
    );
}

#[test]
fn nan_coefficient() {
    assert_err(
        "[directions]\nc = \"c.safetensors\"\n[[condition]]\nname = \"s\"\nadd = [\"c:NaN@12\"]\n",
        &["condition 's'", "c:NaN@12", "not finite"],
    );
    // A NaN that arrives through a sweep variable.
    assert_err(
        "[directions]\nc = \"c.safetensors\"\n[[sweep]]\nname = \"s{x}\"\nadd = \"c:{x}@3\"\nx = [1.0, nan]\n",
        &["'x'", "non-finite"],
    );
}

#[test]
fn empty_prompt_set() {
    let e = StudyFile::parse(
        "version = 1\n[model]\nspec = \"smollm2\"\n[prompts]\nh = { source = \"demo_harmful\", n = 0 }\n[[condition]]\nname = \"b\"\n",
        Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("prompt set 'h' is empty"), "{e}");
    // Skipping past the end is found when the set is loaded.
    let f = StudyFile::parse(
        "version = 1\n[model]\nspec = \"smollm2\"\n[prompts]\nh = { source = \"demo_harmful\", skip = 1000 }\n[[condition]]\nname = \"b\"\n",
        Path::new("."),
    )
    .unwrap();
    let e = Study::resolve(f).unwrap_err().to_string();
    assert!(
        e.contains("prompt set 'h'") && e.contains("leaves none"),
        "{e}"
    );
    // A file with no prompts.
    let dir = tmpdir("empty");
    std::fs::write(dir.join("none.jsonl"), "\n").unwrap();
    let f = StudyFile::parse(
        "version = 1\n[model]\nspec = \"smollm2\"\n[prompts]\nh = \"none.jsonl\"\n[[condition]]\nname = \"b\"\n",
        &dir,
    )
    .unwrap();
    let e = Study::resolve(f).unwrap_err().to_string();
    assert!(e.contains("prompt set 'h'"), "{e}");
    // No prompt sets at all.
    let e = StudyFile::parse(
        "version = 1\n[model]\nspec = \"smollm2\"\n[[condition]]\nname = \"b\"\n",
        Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no prompt sets"), "{e}");
}

#[test]
fn unknown_persona() {
    assert_err(
        "[[condition]]\nname = \"p\"\npersona = \"frendly\"\n",
        &[
            "condition 'p'",
            "unknown persona 'frendly'",
            "friendly",
            "companion",
        ],
    );
    // Study personas are known, and shadow nothing else.
    let f = parse("[personas]\npirate = \"You are a pirate.\"\n[[condition]]\nname = \"p\"\npersona = \"pirate\"\n").unwrap();
    let c = f.conditions().unwrap();
    assert_eq!(c[0].system.as_deref(), Some("You are a pirate."));
}

#[test]
fn other_errors_are_named() {
    assert_err(
        "[[condition]]\nname = \"a\"\nsytem = \"x\"\n",
        &["unknown field", "sytem"],
    );
    assert_err("", &["no conditions"]);
    assert_err(
        "[[condition]]\nname = \"a\"\n[[condition]]\nname = \"a\"\n",
        &["two conditions are named 'a'"],
    );
    let e = StudyFile::parse(
        &format!("baseline = \"nope\"\n{HEAD}[[condition]]\nname = \"a\"\n"),
        Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("baseline 'nope'"), "{e}");
    assert_err(
        "[[condition]]\nname = \"a\"\nprompts = [\"harmles\"]\n",
        &["prompt set 'harmles'"],
    );
    assert_err(
        "[[condition]]\nname = \"a\"\npersona = \"friendly\"\nsystem = \"x\"\n",
        &["persona or system, not both"],
    );
    assert_err(
        "[generation]\nsamples = 3\n[[condition]]\nname = \"a\"\n",
        &["samples = 3", "temperature"],
    );
    assert_err(
        "[directions]\nc = \"c.safetensors\"\n[[sweep]]\nname = \"s\"\nadd = \"c:8@{layr}\"\nlayer = [1, 2]\n",
        &["'{layr}' is not a variable", "layer"],
    );
    assert_err(
        "[directions]\nc = \"c.safetensors\"\n[[sweep]]\nadd = \"c:8@3\"\nlayer = [1, 2]\n",
        &["variable 'layer' is used nowhere"],
    );
    assert_err(
        "[[judge]]\nkind = \"http\"\nmodel = \"m\"\n",
        &["judge 'http'", "base_url"],
    );
    let e = StudyFile::parse(
        "version = 2\n[model]\nspec = \"x\"\n[prompts]\nh = \"demo_harmful\"\n",
        Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("version 2"), "{e}");
}

#[test]
fn sweeps_expand_and_hashes_are_stable() {
    let dir = tmpdir("sweep");
    direction_file(&dir);
    let text = r#"
version = 1
name = "s"
[model]
spec = "smollm2"
[directions]
compliant = "compliant.safetensors"
ctl = { random = 3, orthogonal_to = "compliant" }
[prompts]
harmful = { source = "demo_harmful", n = 3 }
harmless = { source = "demo_harmless", n = 2 }
[[condition]]
name = "baseline"
[[condition]]
name = "steer"
add = ["compliant:8@1"]
prompts = ["harmful"]
[[sweep]]
base = "steer"
name = "readd-L{layer}-c{coeff}"
add = "compliant[2]:{coeff}@{layer}"
coeff = [4, 0.5]
layer = { range = [0, 3], step = 3 }
[[sweep]]
base = "steer"
ablate = "ctl@{w}"
w = { windows = [0, 3], width = 2, step = 2 }
"#;
    let f = StudyFile::parse(text, &dir).unwrap();
    let conds = f.conditions().unwrap();
    let names: Vec<&str> = conds.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "steer",
            "readd-L0-c4",
            "readd-L3-c4",
            "readd-L0-c0.5",
            "readd-L3-c0.5",
            "steer[w=0-1]",
            "steer[w=2-3]"
        ]
    );
    // Variables vary in name order, the first slowest. Base ops first, then the sweep's; prompt
    // sets inherited from the base.
    let r = &conds[4];
    assert_eq!(r.ops.len(), 2);
    assert_eq!(r.ops[0].text, "compliant:8@1");
    assert_eq!(r.ops[1].text, "compliant[2]:0.5@0");
    assert_eq!(r.prompts, ["harmful"]);
    assert_eq!(r.vars["coeff"], "0.5");

    let study = Study::resolve(f).unwrap();
    assert_eq!(study.conditions.len(), 8);
    // 3 harmful x 8 conditions + 2 harmless x baseline.
    assert_eq!(study.items().len(), 3 * 8 + 2);
    let hashes: std::collections::BTreeSet<&str> =
        study.conditions.iter().map(|c| c.hash.as_str()).collect();
    assert_eq!(hashes.len(), 8);

    // Renaming a condition or reordering keys changes no condition hash; a coefficient does.
    let renamed = text
        .replace("name = \"steer\"", "name = \"steer2\"")
        .replace("base = \"steer\"", "base = \"steer2\"");
    let s2 = Study::resolve(StudyFile::parse(&renamed, &dir).unwrap()).unwrap();
    assert_eq!(s2.conditions[1].hash, study.conditions[1].hash);
    assert_ne!(s2.hash, study.hash, "the study hash covers names");
    let recoeff = text.replace("compliant:8@1", "compliant:8.5@1");
    let s3 = Study::resolve(StudyFile::parse(&recoeff, &dir).unwrap()).unwrap();
    assert_eq!(s3.conditions[0].hash, study.conditions[0].hash);
    assert_ne!(s3.conditions[1].hash, study.conditions[1].hash);
    // The same text resolves to the same hashes (deterministic), and items keep their keys.
    let again = Study::resolve(StudyFile::parse(text, &dir).unwrap()).unwrap();
    assert_eq!(again.hash, study.hash);
    assert_eq!(again.items(), study.items());
    // Seeds do not depend on the condition (common random numbers across conditions).
    let items = study.items();
    let first: Vec<_> = items
        .iter()
        .filter(|i| i.set == 0 && i.prompt == 0)
        .collect();
    assert!(first.windows(2).all(|w| w[0].seed == w[1].seed));
    // A changed direction file changes the hash of the conditions using it, not the baseline's.
    use persona_gate::directions::{DirectionMeta, DirectionSet};
    let rows: Vec<Vec<f32>> = (0..4).map(|_| vec![9.0, 0.5, -0.25]).collect();
    DirectionSet::from_rows(DirectionMeta::new("compliant", "test", 4, 3), rows)
        .unwrap()
        .save(&dir.join("compliant.safetensors"))
        .unwrap();
    let s4 = Study::resolve(StudyFile::parse(text, &dir).unwrap()).unwrap();
    assert_eq!(s4.conditions[0].hash, study.conditions[0].hash);
    assert_ne!(s4.conditions[1].hash, study.conditions[1].hash);
}

#[test]
fn duplicate_conditions_are_caught() {
    let e = Study::resolve(
        parse("[[condition]]\nname = \"a\"\n[[condition]]\nname = \"b\"\npersona = \"direct\"\n[[condition]]\nname = \"c\"\npersona = \"direct\"\n")
            .unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("'b' and 'c' are identical"), "{e}");
}

#[test]
fn missing_direction_file() {
    let dir = tmpdir("missing");
    let f = StudyFile::parse(
        &format!("{HEAD}[directions]\nc = \"nothere.safetensors\"\n[[condition]]\nname = \"s\"\nadd = \"c:1@0\"\n"),
        &dir,
    )
    .unwrap();
    let e = Study::resolve(f).unwrap_err().to_string();
    assert!(
        e.contains("direction 'c'") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn examples_parse() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["demo_study.toml", "paper_study.toml"] {
        let f = StudyFile::load(&root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!f.conditions().unwrap().is_empty());
    }
    // The demo needs no files: it resolves completely.
    let s = Study::load(&root.join("demo_study.toml")).unwrap();
    assert!(s.items().len() > 10);
}
