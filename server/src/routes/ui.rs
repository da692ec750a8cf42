//! The browser studio's routes: its pages, rendered on the server by Leptos (`app::ui`), and the files
//! `scripts/build-web` puts in the site folder (the wasm, its JS glue, the stylesheet, the icon). The pages
//! hold no data: the browser fetches it from the public API after hydrating.

use std::path::Path;

use axum::extract::{FromRef, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use leptos::config::LeptosOptions;
use leptos_axum::{generate_route_list, LeptosRoutes};
use tower_http::services::{ServeDir, ServeFile};

use super::AppState;
use crate::error::ApiError;

/// The name `scripts/build-web` gives the wasm-bindgen output: `pkg/frontend.js`, `pkg/frontend_bg.wasm`.
const OUTPUT_NAME: &str = "frontend";
const PKG_DIR: &str = "pkg";

/// Leptos' settings for a site folder.
pub fn options(site_dir: &Path) -> LeptosOptions {
    let wasm = site_dir
        .join(PKG_DIR)
        .join(format!("{OUTPUT_NAME}_bg.wasm"));
    if !wasm.is_file() {
        tracing::warn!(
            "the browser UI is not built ({} is missing): pages render but stay static; run scripts/build-web",
            wasm.display()
        );
    }
    LeptosOptions::builder()
        .output_name(OUTPUT_NAME)
        .site_root(site_dir.to_string_lossy().as_ref())
        .site_pkg_dir(PKG_DIR)
        .build()
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> LeptosOptions {
        state.leptos.clone()
    }
}

/// Adds the pages (every route of `app::ui::App`) and the site's static files.
pub fn add(router: Router<AppState>, state: &AppState) -> Router<AppState> {
    let options = state.leptos.clone();
    let site = Path::new(&*options.site_root).to_path_buf();
    let pages = generate_route_list(app::ui::App);
    router
        .leptos_routes(state, pages, move || app::ui::shell(options.clone()))
        .nest_service("/pkg", ServeDir::new(site.join(PKG_DIR)))
        .route_service("/favicon.svg", ServeFile::new(site.join("favicon.svg")))
}

/// Unknown paths: a browser asking for a page gets the UI's "no such page" (status 404); anything else,
/// curl and scripts included, the API's JSON error.
pub async fn not_found(State(state): State<AppState>, request: Request) -> Response {
    let wants_page = request.method() == Method::GET
        && request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"));
    if !wants_page {
        return ApiError::not_found("no such route; see /docs").into_response();
    }
    let options = state.leptos.clone();
    let render = leptos_axum::render_app_to_stream(move || app::ui::shell(options.clone()));
    let mut response = render(request).await;
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}
