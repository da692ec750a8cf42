//! The HTTP surface: the router, its shared state, and the extractors that turn every rejection into the
//! API's JSON error.

mod auth;
mod chat;
mod classify;
mod docs;
mod downloads;
mod generate;
mod info;
mod jobs;
mod recipe;
mod train;
mod ui;
mod ws;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::http::{header, HeaderValue, Method};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tower::Layer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::normalize_path::{NormalizePath, NormalizePathLayer};

use crate::config::{CorsOrigin, Secret};
use crate::error::ApiError;
use crate::files::JobId;
use crate::jobs::Jobs;

pub use docs::openapi;
pub use ui::options as ui_options;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub jobs: Jobs,
    pub settings: Arc<HttpSettings>,
    /// Where the browser UI's built files are, and how its pages load them.
    pub leptos: leptos::config::LeptosOptions,
}

/// The HTTP layer's part of the configuration.
pub struct HttpSettings {
    pub token: Option<Secret>,
    pub json_limit: usize,
    pub upload_limit: usize,
    /// Classification requests in flight at once.
    pub classify_slots: Arc<tokio::sync::Semaphore>,
    /// Chat answers waiting or in progress at once.
    pub chat_slots: Arc<tokio::sync::Semaphore>,
    /// The most new tokens an answer may have.
    pub chat_max_tokens: u32,
    /// Browser origins other than our own that may call the API.
    pub cors_origins: Vec<CorsOrigin>,
}

/// A JSON body whose rejections answer in the API's error shape.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// A path parameter whose rejections answer in the API's error shape.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Ids in paths: anything that is not one of ours is simply not found.
pub fn job_id(s: &str) -> Result<JobId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::not_found(format!("no job {s:?}")))
}

/// Lets the configured origins' pages call every route (preflight answered before the token check, as
/// browsers send no credentials on it); with none configured, no CORS headers at all.
fn cors(origins: &[CorsOrigin]) -> CorsLayer {
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let allow = if origins.contains(&CorsOrigin::Any) {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| match o {
            CorsOrigin::Exact(origin) => HeaderValue::from_str(origin).ok(),
            CorsOrigin::Any => None,
        }))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
}

/// The whole service: routes, limits, auth, JSON errors for unknown paths, wrong methods and panics, and
/// paths answered with or without a trailing slash (the original's scripts use `/generate/`).
pub fn app(state: AppState) -> NormalizePath<Router> {
    let json = DefaultBodyLimit::max(state.settings.json_limit);
    let upload = DefaultBodyLimit::max(state.settings.upload_limit);
    let router = Router::new()
        .route("/generate", post(generate::generate).layer(json))
        .route("/recipe", post(recipe::read).layer(json))
        .route("/classify", post(classify::classify).layer(json))
        .route("/chat", post(chat::chat).layer(json))
        .route("/chat/prompt", post(chat::prompt).layer(json))
        .route(
            "/chat/conversations",
            get(chat::list).post(chat::create).layer(json),
        )
        .route(
            "/chat/conversations/{id}",
            get(chat::show).delete(chat::delete),
        )
        .route(
            "/chat/conversations/{id}/images",
            post(chat::add_image).layer(json),
        )
        .route("/train", post(train::train).layer(upload))
        .route("/train/status/{model_id}", get(train::status))
        .route("/train/{model_id}/resume", post(train::resume))
        .route("/train/{model_id}/samples/{file}", get(downloads::sample))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{job_id}", get(jobs::show))
        .route("/jobs/{job_id}/cancel", post(jobs::cancel))
        .route("/images/{job_id}", get(downloads::image))
        .route("/images/{job_id}/{index}", get(downloads::image_at))
        .route("/loras", get(downloads::list_loras))
        .route("/loras/{model_id}", get(downloads::lora))
        .route("/models", get(info::models))
        .route("/health", get(info::health))
        .route(
            "/settings",
            get(info::settings).put(info::update_settings).layer(json),
        )
        .route("/ws/generate", get(ws::generation))
        .route("/ws/train/{model_id}", get(ws::training))
        .route("/ws/chat", get(ws::chat))
        .route("/openapi.json", get(docs::openapi_json))
        .route("/docs", get(docs::page));
    let router = ui::add(router, &state)
        .fallback(ui::not_found)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                app::ErrorCode::MethodNotAllowed,
                "this route does not take that method; see /docs",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(cors(&state.settings.cors_origins))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                app::ErrorCode::Internal,
                "the request failed inside the server; see the server log",
            )
            .into_response()
        }))
        .with_state(state);
    NormalizePathLayer::trim_trailing_slash().layer(router)
}
