//! OpenAI chat-completions request and response shapes, and the checks a request passes before it
//! reaches the model.
//!
//! Requests are parsed by hand from the body bytes (not by a framework extractor) so that every
//! malformed request gets a 4xx with an OpenAI-style error object naming the problem: bad JSON,
//! a field of the wrong type (with its path: `max_tokens: invalid type: string "x", expected ...`),
//! an unknown preset, too many tokens.

use persona_gate::model::limits::quote;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    pub fn status(mut self, s: u16) -> Self {
        self.status = s;
        self
    }

    pub fn kind(mut self, k: &'static str) -> Self {
        self.kind = k;
        self
    }

    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// Message content: a string, or a list of parts of which only `{"type": "text", "text": ...}` is
/// understood.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stop`: a string or a list of up to 4 strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The request fields pgate reads. Unknown fields are ignored (as OpenAI-compatible servers do);
/// known fields of the wrong type are errors.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// A preset name (see `GET /v1/models`), or the served model's own name for the default preset.
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<Stop>,
    /// pgate extension: pick a preset independently of `model`.
    #[serde(default)]
    pub preset: Option<String>,
}

/// Parse a request body, naming the problem precisely when it does not fit.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "request body must be a JSON object with 'model' and 'messages'",
        ));
    }
    for field in ["model", "messages"] {
        if v.get(field).is_none() {
            return Err(
                ApiError::bad_request(format!("missing required field '{field}'")).param(field),
            );
        }
    }
    serde_path_to_error::deserialize::<_, ChatRequest>(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        ApiError::bad_request(quote(&format!("invalid field '{path}': {inner}"), 1000)).param(path)
    })
}

/// A message list checked and flattened to (role, text).
pub fn flatten_messages(msgs: &[Message]) -> Result<Vec<(String, String)>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad_request("'messages' must not be empty").param("messages"));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role '{}' is not supported (system, developer, user, assistant)",
                    quote(other, 40)
                ))
                .param(format!("messages[{i}].role")))
            }
        };
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    if p.kind != "text" {
                        return Err(ApiError::bad_request(format!(
                            "messages[{i}].content[{j}] has type '{}': only text parts are supported",
                            quote(&p.kind, 40)
                        ))
                        .param(format!("messages[{i}].content")));
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        out.push((role.to_string(), text));
    }
    match out.last() {
        Some((r, t)) if r == "user" && !t.trim().is_empty() => {}
        Some((r, _)) if r == "user" => {
            return Err(
                ApiError::bad_request("the last message (user) has empty content")
                    .param("messages"),
            )
        }
        _ => {
            return Err(ApiError::bad_request(
                "the last message must come from the user (role 'user')",
            )
            .param("messages"))
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_json_and_wrong_types_are_named() {
        let e = parse_chat_request(b"{not json").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e =
            parse_chat_request(br#"{"model":"x","messages":[],"max_tokens":"many"}"#).unwrap_err();
        assert!(e.message.contains("max_tokens"), "{}", e.message);
        let e = parse_chat_request(br#"{"model":"x","messages":"hi"}"#).unwrap_err();
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = parse_chat_request(br#"{"messages":[]}"#).unwrap_err();
        assert!(e.message.contains("'model'"), "{}", e.message);
        let e = parse_chat_request(b"[1,2]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
    }

    #[test]
    fn messages_flatten_and_check() {
        let r = parse_chat_request(
            br#"{"model":"x","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        let m = flatten_messages(&r.messages).unwrap();
        assert_eq!(m[1], ("user".to_string(), "ab".to_string()));
        let r = parse_chat_request(br#"{"model":"x","messages":[{"role":"tool","content":"s"}]}"#)
            .unwrap();
        assert!(flatten_messages(&r.messages)
            .unwrap_err()
            .message
            .contains("tool"));
        let r = parse_chat_request(
            br#"{"model":"x","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
        )
        .unwrap();
        assert!(flatten_messages(&r.messages).is_err());
    }
}
