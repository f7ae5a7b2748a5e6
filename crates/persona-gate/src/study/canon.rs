//! Canonical JSON and the hashes built on it.
//!
//! Hashes must not change with map order, whitespace or serde_json features, so values are
//! written by hand: object keys sorted bytewise, no whitespace, strings escaped by serde_json
//! (deterministic), numbers as serde_json prints them. Callers put floats in as strings formatted
//! from the `f32` they parsed ([`f32_text`]): widening `0.1f32` to `f64` would print
//! `0.10000000149011612`, which is stable but unreadable in stored specs.

use serde_json::Value;

/// Canonical text of a JSON value.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write(v, &mut out);
    out
}

fn write(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// sha256 (hex) of the canonical text of `v`.
pub fn hash_json(v: &Value) -> String {
    crate::hash::sha256_bytes(canonical_json(v).as_bytes())
}

/// Shortest text that parses back to the same `f32` (`8`, `0.5`, `-2.25`).
pub fn f32_text(x: f32) -> String {
    format!("{x}")
}

/// The first 8 bytes of a hex sha256 as a number (shards, seeds).
pub fn hex_u64(hex: &str) -> u64 {
    u64::from_str_radix(hex.get(..16).unwrap_or("0"), 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sorted_and_compact() {
        let a: Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, "x"], "x": null}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a": {"x": null, "y": [1, "x"]}, "b": 1}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,"x"]},"b":1}"#);
        assert_eq!(hash_json(&a), hash_json(&b));
        assert_eq!(f32_text(8.0), "8");
        assert_eq!(f32_text(0.1), "0.1");
    }
}
