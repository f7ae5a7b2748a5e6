//! `pgate label`'s rows: JSONL objects with `prompt` and `output` (optional `system`, `id`, and any
//! other fields, which are written back untouched) in, the same objects with the label added out.

use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value};

use super::{LabelInput, LabelVerdict, LabelerId};
use crate::{Error, Result};

/// Rows read from a file: the inputs and the original objects (written back with labels).
pub struct Rows {
    pub inputs: Vec<LabelInput>,
    pub objects: Vec<Map<String, Value>>,
}

/// Read JSONL rows. A row without a string `prompt` or `output`, a line that is not a JSON object,
/// and a file with no rows are errors naming the line.
pub fn read(path: &Path) -> Result<Rows> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.into(),
        source: e,
    })?;
    parse(&text, &path.display().to_string())
}

/// [`read`] on text (`origin` names it in errors).
pub fn parse(text: &str, origin: &str) -> Result<Rows> {
    let mut rows = Rows {
        inputs: Vec::new(),
        objects: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::InvalidValue(format!("{origin} line {}: not JSON: {e}", i + 1)))?;
        let Value::Object(o) = v else {
            return Err(Error::InvalidValue(format!(
                "{origin} line {}: not a JSON object",
                i + 1
            )));
        };
        let field = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(prompt), Some(output)) = (field("prompt"), field("output")) else {
            let missing: Vec<&str> = ["prompt", "output"]
                .into_iter()
                .filter(|k| field(k).is_none())
                .collect();
            return Err(Error::InvalidValue(format!(
                "{origin} line {}: row has no string '{}' (each row needs 'prompt' and 'output')",
                i + 1,
                missing.join("' or '")
            )));
        };
        let id = o.get("id").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        rows.inputs.push(LabelInput {
            id,
            prompt,
            output,
            system: field("system"),
        });
        rows.objects.push(o);
    }
    if rows.inputs.is_empty() {
        return Err(Error::Empty(format!("{origin} has no rows")));
    }
    Ok(rows)
}

/// One row's object with the label fields added: `label`, `labeler`, `reason`, `scores` and, for
/// every labeler that was run, its verdict under `verdicts`.
pub fn labeled(
    mut o: Map<String, Value>,
    chosen: (&LabelerId, &LabelVerdict),
    others: &[(LabelerId, LabelVerdict)],
) -> Map<String, Value> {
    let (id, v) = chosen;
    o.insert("label".into(), Value::String(v.label.name().into()));
    o.insert("labeler".into(), Value::String(id.to_string()));
    o.insert("reason".into(), Value::String(v.reason.clone()));
    o.insert(
        "scores".into(),
        serde_json::to_value(&v.scores).unwrap_or(Value::Null),
    );
    let mut all = Map::new();
    for (lid, lv) in others {
        all.insert(
            lid.to_string(),
            serde_json::to_value(lv).unwrap_or(Value::Null),
        );
    }
    if !all.is_empty() {
        o.insert("verdicts".into(), Value::Object(all));
    }
    o
}

/// Write objects as JSONL, atomically (a temporary file renamed into place).
pub fn write(path: &Path, objects: &[Map<String, Value>]) -> Result<()> {
    let tmp = path.with_extension("jsonl.partial");
    let io = |e| Error::Io {
        path: tmp.clone(),
        source: e,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    for o in objects {
        serde_json::to_writer(&mut f, o).map_err(|e| Error::InvalidValue(e.to_string()))?;
        f.write_all(b"\n").map_err(io)?;
    }
    f.flush().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::Io {
        path: path.into(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_rows_are_named() {
        let e = parse(
            "{\"prompt\":\"a\",\"output\":\"b\"}\n{\"prompt\":\"a\"}\n",
            "x.jsonl",
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("x.jsonl line 2"), "{e}");
        assert!(e.to_string().contains("'output'"), "{e}");
        assert!(parse("\n\n", "empty.jsonl")
            .err()
            .unwrap()
            .to_string()
            .contains("no rows"));
        assert!(parse("[1]", "l.jsonl")
            .err()
            .unwrap()
            .to_string()
            .contains("not a JSON object"));
        let ok = parse(
            "{\"prompt\":\"a\",\"output\":\"b\",\"id\":7,\"extra\":1}",
            "x",
        )
        .unwrap();
        assert_eq!(ok.inputs[0].id.as_deref(), Some("7"));
    }
}
