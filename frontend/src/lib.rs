//! The wasm entry point: `scripts/build-web` compiles this crate for `wasm32-unknown-unknown` and the page's
//! hydration script calls `hydrate()`, which attaches the UI of `app::ui` to the server-rendered HTML.
#![cfg(target_arch = "wasm32")]
// The pages' view types are deeply nested generics; hydrating them needs more than the default 128.
#![recursion_limit = "256"]

#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::ui::App);
}
