//! The browser studio: Leptos pages rendered on the server (`ssr`) and hydrated in the browser (`hydrate`).
//! Every page talks to the same public JSON API and WebSockets that curl uses (docs/server.md); nothing
//! here reaches the server any other way. The API keeps the original service's paths (`/train/`, `/jobs/`),
//! so every page but the chat at `/` lives under `/studio/` and no page answers a path the API owns.
//! Data is fetched after hydration: the server renders each page's frame with its loading state, and the
//! browser fills it in. Pages and large panels end in `.into_any()`, so that their deeply nested view types
//! are laid out here (under this crate's raised recursion limit) and not in the server or the wasm crate.

mod api;
mod chart;
mod chat;
mod gallery;
mod jobs;
mod reply;
mod sizes;
mod token;
mod training;

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, Title};
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::path;

/// The whole HTML document, for the server's renderer.
#[cfg(feature = "ssr")]
pub fn shell(options: LeptosOptions) -> impl IntoView {
    use leptos::hydration::HydrationScripts;
    use leptos_meta::MetaTags;
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <meta name="color-scheme" content="dark light" />
                <link rel="icon" type="image/svg+xml" href="/favicon.svg" />
                <link rel="stylesheet" href="/pkg/studio.css" />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    chat::ChatState::provide();
    // Flipped once the wasm runs: the browser tests wait for it, and styles may use it.
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));
    view! {
        <Title text="FLUX studio" />
        <Router>
            <a class="skip" href="#main">
                "Skip to content"
            </a>
            <div class="studio" data-hydrated=move || hydrated.get().to_string()>
                <header class="topbar">
                    <a class="brand" href="/">
                        <span class="logo" aria-hidden="true">
                            "◆"
                        </span>
                        "FLUX studio"
                    </a>
                    <nav aria-label="Main">
                        <A href="/" exact=true>
                            "Chat"
                        </A>
                        <A href="/studio/train">"Train"</A>
                        <A href="/studio/gallery">"Gallery"</A>
                        <A href="/studio/jobs">"Jobs"</A>
                    </nav>
                </header>
                <main id="main">
                    <Routes fallback=NotFound>
                        <Route path=path!("/") view=chat::ChatPage />
                        <Route path=path!("/studio/train") view=training::TrainPage />
                        <Route path=path!("/studio/train/:id") view=training::TrainingRunPage />
                        <Route path=path!("/studio/gallery") view=gallery::GalleryPage />
                        <Route path=path!("/studio/jobs") view=jobs::JobsPage />
                        <Route path=path!("/studio/token") view=token::TokenPage />
                    </Routes>
                </main>
            </div>
        </Router>
    }
}

#[component]
fn NotFound() -> impl IntoView {
    view! {
        <Title text="Not found · FLUX studio" />
        <section class="page narrow">
            <h1>"No such page"</h1>
            <p>
                "The studio has a " <a href="/">"chat"</a> ", a " <a href="/studio/train">"training page"</a>
                ", a " <a href="/studio/gallery">"gallery"</a> " and a " <a href="/studio/jobs">"job list"</a>
                ". The JSON API is described at " <a href="/docs">"/docs"</a> "."
            </p>
        </section>
    }
}

/// A failure, shown where the data would have been, with what the user can do in its text.
#[component]
fn ErrorBox(#[prop(into)] message: String) -> impl IntoView {
    view! {
        <div class="error" role="alert">
            {message}
        </div>
    }
}

/// Shown while a request is on its way.
#[component]
fn Loading(#[prop(into)] what: String) -> impl IntoView {
    view! {
        <p class="loading" aria-busy="true">
            <span class="spinner" aria-hidden="true"></span>
            {what}
        </p>
    }
}

/// The first block of a UUID: enough to tell a user's LoRAs and jobs apart.
pub fn short_id(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

/// A recipe as the UI lists it under an image (the gallery's cards, training's samples): model and size,
/// steps and seed, guidance, each LoRA with its scale, the input image, the studio's version.
pub fn recipe_lines(recipe: &crate::Recipe) -> Vec<String> {
    let mut lines = vec![
        format!("{} · {}×{}", recipe.model, recipe.width, recipe.height),
        format!("{} steps · seed {}", recipe.steps, recipe.seed),
        format!("guidance {}", recipe.guidance),
    ];
    for lora in &recipe.loras {
        lines.push(format!("LoRA {} × {}", short_id(&lora.name), lora.scale));
    }
    if let Some(input) = &recipe.input {
        let from = match &input.job_id {
            Some(job) => format!("from image {}", short_id(job)),
            None => "from an uploaded image".into(),
        };
        let masked = if input.masked { " · inpainted" } else { "" };
        lines.push(format!("{from} · strength {}{masked}", input.strength));
    }
    if let Some(studio) = &recipe.studio {
        lines.push(studio.clone());
    }
    lines
}
