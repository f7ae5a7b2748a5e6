//! The library's error type. Every variant names the problem in words a user can act on; the binary
//! prints the `Display` form as one line and exits non-zero.

use std::path::PathBuf;

/// Errors raised by persona-gate. Kept as values (no panics across the API) so the CLI, the server and
/// the Python bindings can each decide how to report them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a model file: {reason}")]
    NotAModel { path: PathBuf, reason: String },

    #[error("{path}: truncated or corrupt model file: {reason}")]
    CorruptModel { path: PathBuf, reason: String },

    #[error("unknown architecture '{0}' (supported: llama, mistral, qwen2, gemma3)")]
    UnknownArchitecture(String),

    #[error("model is missing {what}")]
    MissingMetadata { what: String },

    #[error("missing tensor '{0}' in the model weights")]
    MissingTensor(String),

    #[error("no tokenizer found: {0}")]
    MissingTokenizer(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("layer {layer} is out of range: the model has {n_layers} layers (0..={max})", max = n_layers.saturating_sub(1))]
    LayerOutOfRange { layer: usize, n_layers: usize },

    #[error("direction has width {got}, but the model's residual stream has width {want}")]
    WidthMismatch { got: usize, want: usize },

    #[error("invalid value: {0}")]
    InvalidValue(String),

    #[error("invalid spec '{spec}': {reason}")]
    InvalidSpec { spec: String, reason: String },

    #[error("empty input: {0}")]
    Empty(String),

    #[error("model '{repo}' is not available offline and could not be downloaded: {reason}")]
    Hub { repo: String, reason: String },

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),

    #[error("json: {0}")]
    Json(#[from] serde_json::Error),

    /// A receipt bundle's signature is missing, made with another key, or no longer covers its
    /// files (`pgate receipt verify --pubkey`, `pgate check --pubkey`).
    #[error("signature: {0}")]
    Signature(String),

    /// A sequence failed inside the stepping engine (the engine reports failures as text, per
    /// sequence, so that one failure cannot take the others down).
    #[error("generation failed: {0}")]
    Generation(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line (`a: b: c`), leaving out a cause whose text already ends
/// the line: a library message includes its source ("x.gguf: no such file"), so printing the
/// source again would repeat it. What `pgate` prints after `error: `.
pub fn chain_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(c) = next {
        let s = c.to_string();
        if !out.ends_with(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        next = c.source();
    }
    out.replace('\n', " ")
}

impl Error {
    /// Attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_line_leaves_out_a_cause_that_ends_the_line() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            chain_line(&Error::io("x.gguf", io())),
            "x.gguf: no such file"
        );
        let inner = Error::InvalidValue("two\nlines".into());
        let outer = std::io::Error::other(inner);
        assert_eq!(chain_line(&outer), "invalid value: two lines");
        let wrapped = Error::io(
            "creating out.jsonl",
            std::io::Error::other(Error::Empty("x".into())),
        );
        assert_eq!(chain_line(&wrapped), "creating out.jsonl: empty input: x");
    }
}
