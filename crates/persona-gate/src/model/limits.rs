//! Hard limits on what a model file, a spec or a study may ask for.
//!
//! Model files, plans, study files and presets can come from someone with a motive. A value such as
//! `block_count = 0xFFFFFFFF` or a layer range `0-999999999999` is a request to allocate until the
//! machine gives out; these limits turn it into a one-line error before anything is allocated.
//! Each limit is far above any model or study this crate is meant for (the largest open models
//! have ~130 layers, 16k-wide residual streams and 256k-token vocabularies).

/// Most decoder blocks a model may have; layer indices in specs and plans must be below it.
pub const MAX_LAYERS: usize = 1024;
/// Widest residual stream (`d_model`) accepted.
pub const MAX_D_MODEL: usize = 1 << 16;
/// Most attention heads (query or key/value) accepted.
pub const MAX_HEADS: usize = 1024;
/// Widest attention head accepted.
pub const MAX_HEAD_DIM: usize = 4096;
/// Widest MLP hidden layer accepted.
pub const MAX_D_FF: usize = 1 << 20;
/// Largest vocabulary accepted.
pub const MAX_VOCAB: usize = 1 << 22;
/// Longest context length accepted (tables sized by it are capped further by the decoder).
pub const MAX_CONTEXT: usize = 1 << 24;

/// Most tensors in one GGUF file.
pub const MAX_GGUF_TENSORS: u64 = 1 << 16;
/// Most metadata entries in one GGUF file.
pub const MAX_GGUF_KV: u64 = 1 << 16;
/// Longest GGUF metadata key or tensor name (the GGUF spec allows 65535 bytes for keys).
pub const MAX_GGUF_NAME: u64 = 1 << 16;
/// Most elements of one GGUF metadata array (a vocabulary of [`MAX_VOCAB`] tokens fits).
pub const MAX_GGUF_ARRAY: u64 = MAX_VOCAB as u64;
/// Most array elements over all GGUF metadata: each becomes a 32-byte value in memory, so this
/// bounds what a header of small elements can make the loader allocate (~256 MiB; a 256k-token
/// vocabulary with its scores and merges uses under 1M).
pub const MAX_GGUF_ARRAY_TOTAL: u64 = 1 << 23;
/// Deepest nesting of GGUF arrays (real files nest at most once).
pub const MAX_GGUF_DEPTH: usize = 4;
/// Largest GGUF `general.alignment`.
pub const MAX_GGUF_ALIGNMENT: u64 = 1 << 20;
/// Most tensors in one safetensors file.
pub const MAX_SAFETENSORS_TENSORS: usize = 1 << 16;

/// Most samples per prompt in a study.
pub const MAX_SAMPLES: usize = 1000;
/// Most values one sweep variable may take.
pub const MAX_SWEEP_VALUES: usize = 1000;
/// Most conditions a study may expand to (plain conditions plus sweep combinations).
pub const MAX_CONDITIONS: usize = 10_000;
/// Most work items (condition x prompt x sample) in one study.
pub const MAX_STUDY_ITEMS: usize = 1_000_000;
/// Most new tokens per answer in a study.
pub const MAX_NEW_TOKENS: usize = 1 << 20;
/// Largest decoding batch in a study.
pub const MAX_BATCH: usize = 4096;
/// Most bootstrap resamples in a study's statistics.
pub const MAX_BOOTSTRAP: usize = 1_000_000;

/// `text` with control characters (newlines included) escaped, at most `max` characters: for
/// error messages that quote user input, which must stay one line and short.
pub fn quote(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whitespace runs (newlines included) collapsed to one space: parser messages (TOML shows a
/// source snippet over several lines) as one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `e` with control characters escaped in the text it carries: parsers of untrusted files apply
/// it at their boundary, since messages quote names and values as written (a name with a newline
/// would otherwise split the CLI's one error line).
pub fn one_line_error(e: crate::Error) -> crate::Error {
    use crate::Error;
    let q = |s: String| quote(&s, usize::MAX);
    match e {
        Error::InvalidValue(m) => Error::InvalidValue(q(m)),
        Error::InvalidSpec { spec, reason } => Error::InvalidSpec {
            spec: q(spec),
            reason: q(reason),
        },
        Error::UnknownArchitecture(m) => Error::UnknownArchitecture(q(m)),
        Error::MissingMetadata { what } => Error::MissingMetadata { what: q(what) },
        Error::Unsupported(m) => Error::Unsupported(q(m)),
        Error::Empty(m) => Error::Empty(q(m)),
        Error::Tokenizer(m) => Error::Tokenizer(q(m)),
        Error::ChatTemplate(m) => Error::ChatTemplate(q(m)),
        Error::MissingTokenizer(m) => Error::MissingTokenizer(q(m)),
        Error::MissingTensor(m) => Error::MissingTensor(q(m)),
        Error::NotAModel { path, reason } => Error::NotAModel {
            path,
            reason: q(reason),
        },
        Error::CorruptModel { path, reason } => Error::CorruptModel {
            path,
            reason: q(reason),
        },
        other => other,
    }
}

/// What [`check_safetensors_bytes`] reads from a safetensors header.
#[derive(Debug, Clone, Default)]
pub struct SafetensorsSummary {
    pub names: Vec<String>,
    /// dtype name -> number of tensors
    pub types: std::collections::BTreeMap<String, usize>,
    pub n_params: u64,
}

/// Check a whole safetensors file in memory: the header (its length inside the file, valid JSON,
/// offsets that tile the data exactly, as the `safetensors` crate checks) and at most
/// [`MAX_SAFETENSORS_TENSORS`] tensors. What loading and the fuzz tests share.
pub fn check_safetensors_bytes(bytes: &[u8]) -> crate::Result<SafetensorsSummary> {
    let corrupt = |reason: String| crate::Error::CorruptModel {
        path: "<memory>".into(),
        reason,
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        corrupt(format!(
            "not a valid safetensors file ({})",
            one_line(&e.to_string())
        ))
    })?;
    let tensors = meta.tensors();
    if tensors.len() > MAX_SAFETENSORS_TENSORS {
        return Err(corrupt(format!(
            "{} tensors in one file (limit {})",
            tensors.len(),
            MAX_SAFETENSORS_TENSORS
        )));
    }
    let mut out = SafetensorsSummary::default();
    for (name, info) in tensors {
        *out.types.entry(format!("{:?}", info.dtype)).or_insert(0) += 1;
        let n = info
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        out.n_params = out.n_params.saturating_add(n.unwrap_or(u64::MAX));
        out.names.push(name);
    }
    Ok(out)
}

/// [`check_safetensors_bytes`] of the file at `p`, its errors naming the file.
pub fn check_safetensors_at(
    p: &std::path::Path,
    bytes: &[u8],
) -> crate::Result<SafetensorsSummary> {
    check_safetensors_bytes(bytes).map_err(|e| match e {
        crate::Error::CorruptModel { reason, .. } => crate::Error::CorruptModel {
            path: p.into(),
            reason,
        },
        other => other,
    })
}
