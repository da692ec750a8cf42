//! Bearer tokens: the server's own `--token` (an admin's: it sees everything), and users' API tokens
//! made by `studio token create` and kept hashed in the store (a user's sees that user's jobs and
//! conversations only; an `--admin` one sees all). With either configured, every request needs
//! `Authorization: Bearer <token>`; a WebSocket upgrade may carry it as `?token=<token>` instead, since
//! browsers cannot set headers there. With neither, the server is open and every request sees all.
//! Whose request it is reaches the handlers as a [`Viewer`] in its extensions ([`Caller`]).
//! The browser UI keeps it in the `studio_token` cookie (set by its token page, SameSite=Strict, so other
//! sites' pages cannot make the browser send it), which covers its images, downloads and streams too.
//! The UI's pages and files stay public: they hold no data, and a browser must load them to be asked.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::error::ApiError;
use crate::store::Viewer;

/// Whose request it is, as the token said.
pub struct Caller(pub Viewer);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Viewer>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::internal("authentication", "the request was not checked"))
    }
}

pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if is_ui_file(&request) {
        request.extensions_mut().insert(Viewer::All);
        return next.run(request).await;
    }
    let store = state.jobs.store().clone();
    let has_tokens = match store.call(|store| store.has_tokens()).await {
        Ok(has) => has,
        Err(err) => return ApiError::store("reading the API tokens", err).into_response(),
    };
    let expected = state.settings.token.clone();
    if expected.is_none() && !has_tokens {
        request.extensions_mut().insert(Viewer::All);
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
    let presented = from_header
        .or(from_query)
        .map(str::to_owned)
        .or_else(|| from_cookie.map(|t| t.into_owned()));
    let viewer = match presented {
        None => None,
        Some(token)
            if expected
                .as_ref()
                .is_some_and(|e| constant_time_eq(token.as_bytes(), e.expose().as_bytes())) =>
        {
            Some(Viewer::All)
        }
        // Looked up by hash: the comparison in the index reveals nothing of the token itself.
        Some(token) if has_tokens => match store.call(move |store| store.viewer_of(&token)).await {
            Ok(viewer) => viewer,
            Err(err) => return ApiError::store("reading the API tokens", err).into_response(),
        },
        Some(_) => None,
    };
    if let Some(viewer) = viewer {
        request.extensions_mut().insert(viewer);
        return next.run(request).await;
    }
    let mut response = ApiError::new(
        app::ErrorCode::Unauthorized,
        "this server needs `Authorization: Bearer <token>` (or `?token=` on WebSockets): the server's --token or a user's token from `studio token create`",
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
