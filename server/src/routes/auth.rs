//! The optional bearer token. With one configured, every request needs `Authorization: Bearer <token>`;
//! a WebSocket upgrade may carry it as `?token=<token>` instead, since browsers cannot set headers there.
//! The browser UI keeps it in the `studio_token` cookie (set by its token page, SameSite=Strict, so other
//! sites' pages cannot make the browser send it), which covers its images, downloads and streams too.
//! The UI's pages and files stay public: they hold no data, and a browser must load them to be asked.

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::ApiError;

pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.settings.token else {
        return next.run(request).await;
    };
    if is_ui_file(&request) {
        return next.run(request).await;
    }
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let is_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let from_query = is_upgrade
        .then(|| request.uri().query())
        .flatten()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("token=")));
    let from_cookie = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(&format!("{TOKEN_COOKIE}=")))
        .map(|v| percent_encoding::percent_decode_str(v).decode_utf8_lossy());
    let matches = |token: &str| constant_time_eq(token.as_bytes(), expected.expose().as_bytes());
    if from_header.or(from_query).is_some_and(matches) || from_cookie.is_some_and(|t| matches(&t)) {
        return next.run(request).await;
    }
    let mut response = ApiError::new(
        app::ErrorCode::Unauthorized,
        "this server needs `Authorization: Bearer <token>` (or `?token=` on WebSockets)",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// The cookie the UI's token page sets (URI-encoded, as `encodeURIComponent` writes it).
const TOKEN_COOKIE: &str = "studio_token";

/// A page of the UI (`/`, `/studio/...`) or one of its built files.
fn is_ui_file(request: &Request) -> bool {
    let path = request.uri().path().trim_end_matches('/');
    matches!(*request.method(), Method::GET | Method::HEAD)
        && (path.is_empty()
            || path == "/studio"
            || path.starts_with("/studio/")
            || path.starts_with("/pkg/")
            || path == "/favicon.svg")
}

/// Compares without an early exit, so response times do not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
