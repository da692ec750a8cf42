//! The message box: Enter sends, Shift+Enter starts a new line.

use leptos::ev::{KeyboardEvent, SubmitEvent};
use leptos::prelude::*;

use super::state::ChatState;

#[component]
pub(super) fn Composer(chat: ChatState) -> impl IntoView {
    let text = RwSignal::new(String::new());
    let send = move || {
        let message = text.get_untracked();
        if !message.trim().is_empty() {
            text.set(String::new());
            chat.send(message);
        }
    };
    let on_submit = move |ev: SubmitEvent| {
        ev.prevent_default();
        send();
    };
    // Enter sends, Shift+Enter starts a new line, as chat apps do.
    let on_keydown = move |ev: KeyboardEvent| {
        if ev.key() == "Enter" && !ev.shift_key() && !ev.is_composing() {
            ev.prevent_default();
            send();
        }
    };
    view! {
        <form class="composer" on:submit=on_submit>
            <label for="message" class="sr-only">
                "Message"
            </label>
            <textarea
                id="message"
                rows="2"
                placeholder="Describe an image, or ask something…"
                prop:value=move || text.get()
                on:input=move |ev| text.set(event_target_value(&ev))
                on:keydown=on_keydown
            ></textarea>
            <button type="submit" disabled=move || text.with(|t| t.trim().is_empty())>
                "Send"
            </button>
        </form>
    }
}
