//! How commands print their results: the text form, or JSON with `--json`; JSON files.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// `value` as pretty JSON with `--json`, else its text form (printed as it is).
pub fn show(json: bool, value: &impl Serialize, text: impl FnOnce() -> String) -> Result<()> {
    match json {
        true => println!("{}", serde_json::to_string_pretty(value)?),
        false => print!("{}", text()),
    }
    Ok(())
}

/// [`show`] with the JSON's keys sorted (through `serde_json::Value`): the key order the study
/// commands have always printed.
pub fn show_sorted(
    json: bool,
    value: &impl Serialize,
    text: impl FnOnce() -> String,
) -> Result<()> {
    match json {
        true => show(true, &serde_json::to_value(value)?, text),
        false => show(false, &(), text),
    }
}

/// Write `value` as pretty JSON to `path` (the `--json FILE`, `--scores FILE`, `--report FILE`
/// outputs).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Exit status 1 (a check failed) once the report is printed.
pub fn fail_unless(ok: bool) {
    if !ok {
        std::process::exit(1);
    }
}
