//! The access-token page: a studio started with `--token`, or with users' tokens, answers the API only to
//! requests that carry one.
//! The page keeps the token in the `studio_token` cookie (SameSite=Strict: other sites' pages cannot make
//! the browser send it), which every later call, image, download and stream of this UI then carries.
//! Any API call answered 401 brings the user here (`api::ask_for_token`), and back afterwards.

use leptos::ev::SubmitEvent;
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::use_query_map;
use wasm_bindgen::JsCast;

/// Where the token page sends the user afterwards: a path of this site only.
fn safe_next(next: Option<String>) -> String {
    next.filter(|n| n.starts_with('/') && !n.starts_with("//"))
        .unwrap_or_else(|| "/".into())
}

#[component]
pub fn TokenPage() -> impl IntoView {
    let query = use_query_map();
    let token = RwSignal::new(String::new());
    let save = move |ev: SubmitEvent| {
        ev.prevent_default();
        let value = token.get_untracked();
        let encoded = String::from(js_sys::encode_uri_component(value.trim()));
        let document = window()
            .document()
            .and_then(|d| d.dyn_into::<web_sys::HtmlDocument>().ok());
        if let Some(document) = document {
            let _ = document.set_cookie(&format!(
                "studio_token={encoded}; path=/; SameSite=Strict; max-age=31536000"
            ));
        }
        // A full load, so every part of the page starts again with the token.
        let next = safe_next(query.get_untracked().get("next"));
        let _ = window().location().set_href(&next);
    };
    view! {
        <Title text="Access token · FLUX studio" />
        <section class="page narrow">
            <h1>"This studio needs its access token"</h1>
            <p class="lead">
                "Its operator started it with " <code>"--token"</code>
                " (or STUDIO_TOKEN), or gave you a token of your own ("
                <code>"studio token create"</code>
                "). Enter that token; this browser keeps it for this site only."
            </p>
            <form class="token-form" on:submit=save>
                <label>
                    "Access token"
                    <input
                        type="password"
                        name="token"
                        required
                        autocomplete="current-password"
                        prop:value=move || token.get()
                        on:input=move |ev| token.set(event_target_value(&ev))
                    />
                </label>
                <button type="submit" class="primary">
                    "Continue"
                </button>
            </form>
        </section>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn only_paths_of_this_site_are_followed() {
        assert_eq!(
            safe_next(Some("/studio/jobs?x=1".into())),
            "/studio/jobs?x=1"
        );
        assert_eq!(safe_next(Some("//evil.example/".into())), "/");
        assert_eq!(safe_next(Some("https://evil.example/".into())), "/");
        assert_eq!(safe_next(None), "/");
    }
}
