//! The middleware around every route: a request id, a catch-panic layer, and OpenAI error objects
//! for error responses that did not come from a handler.
//!
//! A handler bug must not cost the client its answer (an empty reply, a cut connection) nor go
//! unnoticed: a panic becomes a 500 with an OpenAI error object naming the request id, and one log
//! line with the method, path and id. Errors that axum itself produces (405 for a wrong method,
//! 400/422 from an extractor) are plain text; clients of an OpenAI API parse `{"error": {...}}`,
//! so every 4xx/5xx that is not already JSON is rewritten into that shape.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::FutureExt;

use crate::metrics::Metrics;
use crate::openai::ApiError;

/// The id of one request (`x-request-id` on its response), for log lines about it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An OpenAI error object response; 429 carries `Retry-After`.
pub fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 429 {
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    r
}

/// The error object for a status that reached the client without one.
pub fn error_for_status(status: StatusCode, detail: &str) -> ApiError {
    let reason = status.canonical_reason().unwrap_or("error");
    let (kind, code) = match status.as_u16() {
        401 => ("authentication_error", "invalid_api_key"),
        404 => ("invalid_request_error", "not_found"),
        405 => ("invalid_request_error", "method_not_allowed"),
        408 => ("invalid_request_error", "request_timeout"),
        413 => ("invalid_request_error", "request_too_large"),
        415 => ("invalid_request_error", "unsupported_media_type"),
        431 => ("invalid_request_error", "headers_too_large"),
        s if s >= 500 => ("server_error", "server_error"),
        _ => ("invalid_request_error", "invalid_request"),
    };
    let detail = detail.trim();
    let message = if detail.is_empty() {
        reason.to_string()
    } else {
        format!("{reason}: {detail}")
    };
    ApiError::bad_request(message)
        .status(status.as_u16())
        .kind(kind)
        .code(code)
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// Log a caught panic on one line, count it, and return the 500 to answer it with.
pub fn panic_error(
    metrics: &Metrics,
    what: &str,
    id: &str,
    p: &(dyn std::any::Any + Send),
) -> ApiError {
    metrics.panics.fetch_add(1, Ordering::Relaxed);
    let msg = panic_text(p).replace('\n', " ");
    eprintln!("[pgate serve] handler panic on {what} (request {id}): {msg}");
    ApiError::bad_request(format!(
        "internal error while handling the request (request id {id}); it was logged"
    ))
    .status(500)
    .kind("server_error")
    .code("internal_error")
}

/// Request id, catch-panic and error shapes, outermost around the router.
pub async fn guard(State(metrics): State<Arc<Metrics>>, mut req: Request, next: Next) -> Response {
    let id = format!("req-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let what = format!("{} {}", req.method(), req.uri().path());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut res = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => openai_shaped(r).await,
        Err(p) => {
            metrics.request("-", 500);
            error_response(&panic_error(&metrics, &what, &id, p.as_ref()))
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// A 4xx/5xx that is not JSON (axum's own rejections) as an OpenAI error object.
async fn openai_shaped(r: Response) -> Response {
    let status = r.status();
    let is_json = r
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let (parts, body) = r.into_parts();
    // These bodies are short messages; a long one is cut, not read whole.
    let detail = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut out = error_response(&error_for_status(status, &detail));
    for (k, v) in parts.headers.iter() {
        if k != CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    fn app(metrics: Arc<Metrics>) -> Router {
        async fn boom() -> &'static str {
            let v: Vec<u8> = Vec::new();
            // A handler bug: index out of bounds.
            let i = v.len() + 3;
            if v[i] == 0 {
                "unreachable"
            } else {
                "also unreachable"
            }
        }
        Router::new()
            .route("/boom", get(boom))
            .route("/ok", get(|| async { "fine" }))
            .layer(axum::middleware::from_fn_with_state(metrics, guard))
    }

    async fn call(r: Router, method: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let res = r.oneshot(req).await.unwrap();
        let status = res.status();
        assert!(res.headers().contains_key("x-request-id"));
        let b = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    fn assert_error_object(v: &serde_json::Value) {
        let e = &v["error"];
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error object lacks {k}: {v}");
        }
    }

    #[tokio::test]
    async fn catch_panic_turns_a_handler_bug_into_an_openai_500() {
        let m = Arc::new(Metrics::default());
        let (s, v) = call(app(m.clone()), "GET", "/boom").await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_error_object(&v);
        assert_eq!(v["error"]["type"], "server_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("request id req-"),
            "{v}"
        );
        assert_eq!(m.panics.load(Ordering::Relaxed), 1);
        assert_eq!(m.count_status(500), 1);
        // The service still answers after the panic.
        let r = app(m.clone())
            .oneshot(Request::builder().uri("/ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn axum_rejections_become_openai_error_objects() {
        let m = Arc::new(Metrics::default());
        let (s, v) = call(app(m), "POST", "/ok").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_error_object(&v);
        assert_eq!(v["error"]["code"], "method_not_allowed");
    }
}
