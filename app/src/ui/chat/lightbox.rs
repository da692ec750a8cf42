//! The full-size image over the page.

use leptos::ev::KeyboardEvent;
use leptos::prelude::*;

use super::state::ChatState;

#[component]
pub(super) fn Lightbox(chat: ChatState) -> impl IntoView {
    let close = NodeRef::<leptos::html::Button>::new();
    Effect::new(move |_| {
        if chat.lightbox.with(Option::is_some) {
            if let Some(button) = close.get() {
                let _ = button.focus();
            }
        }
    });
    view! {
        <Show when=move || chat.lightbox.with(Option::is_some)>
            <div
                class="lightbox"
                role="dialog"
                aria-modal="true"
                aria-label="Full-size image"
                on:click=move |_| chat.lightbox.set(None)
                on:keydown=move |ev: KeyboardEvent| {
                    if ev.key() == "Escape" {
                        chat.lightbox.set(None)
                    }
                }
            >
                <img src=move || chat.lightbox.get().unwrap_or_default() alt="Full-size image" />
                <button node_ref=close class="close" on:click=move |_| chat.lightbox.set(None)>
                    "Close"
                </button>
            </div>
        </Show>
    }
}
