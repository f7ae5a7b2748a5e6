//! Typed reads of GGUF metadata and HF `config.json`, with errors that name the missing key.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::{Error, Result};

/// GGUF metadata of one architecture (keys are prefixed with `{arch}.`).
pub struct GgufMeta<'a> {
    pub md: &'a HashMap<String, Value>,
    pub arch: String,
}

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(&format!("{}.{key}", self.arch))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| Error::MissingMetadata {
            what: format!("GGUF metadata key '{}.{key}'", self.arch),
        })
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(match self.get(key) {
            None => None,
            Some(v) => Some(value_as_u64(v).ok_or_else(|| {
                Error::InvalidValue(format!("GGUF key '{}.{key}' is not an integer", self.arch))
            })? as usize),
        })
    }

    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(value_as_f64).map(|x| x as f32)
    }
}

pub fn value_as_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::I8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::I16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::I32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I64(x) => *x as u64,
        // Some converters write per-layer arrays (e.g. head counts); all supported models use one value.
        Value::Array(a) => return a.first().and_then(value_as_u64),
        _ => return None,
    })
}

pub fn value_as_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        other => return value_as_u64(other).map(|x| x as f64),
    })
}

/// HF `config.json`.
pub struct HfConfig<'a>(pub &'a serde_json::Value);

impl HfConfig<'_> {
    /// Multimodal gemma3 configs nest the text model under `text_config`.
    fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0
            .get(key)
            .or_else(|| self.0.get("text_config").and_then(|t| t.get(key)))
            .filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key).ok_or_else(|| Error::MissingMetadata {
            what: format!("config.json key '{key}'"),
        })
    }

    pub fn opt_usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(|v| v.as_u64()).map(|x| x as usize)
    }

    pub fn opt_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    pub fn raw(&self, key: &str) -> Option<&serde_json::Value> {
        self.get(key)
    }
}
