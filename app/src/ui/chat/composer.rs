//! The message box: Enter sends, Shift+Enter starts a new line; an image pasted into it becomes the next
//! message's input (or restores the settings its recipe holds). The pending input image sits above it.

use leptos::ev::{KeyboardEvent, SubmitEvent};
use leptos::prelude::*;

use super::editor::{accept_file, first_file, InputChip};
use super::state::ChatState;

#[component]
pub(super) fn Composer(chat: ChatState) -> impl IntoView {
    let text = chat.draft;
    let send = move || {
        let message = text.get_untracked();
        if !message.trim().is_empty() {
            text.set(String::new());
            chat.notice.set(None);
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
    let on_paste = move |ev: leptos::ev::ClipboardEvent| {
        if let Some(file) = first_file(ev.clipboard_data()) {
            ev.prevent_default();
            accept_file(chat, file);
        }
    };
    view! {
        {move || chat.notice.get().map(|n| view! { <p class="notice" role="status">{n}</p> })}
        <InputChip chat />
        <form class="composer" on:submit=on_submit>
            <label for="message" class="sr-only">
                "Message"
            </label>
            <textarea
                id="message"
                rows="2"
                placeholder=move || {
                    if chat.input.with(Option::is_some) {
                        "Describe the change to the input image…"
                    } else {
                        "Describe an image, or ask something… (drop or paste an image to edit it)"
                    }
                }
                prop:value=move || text.get()
                on:input=move |ev| text.set(event_target_value(&ev))
                on:keydown=on_keydown
                on:paste=on_paste
            ></textarea>
            <button type="submit" disabled=move || text.with(|t| t.trim().is_empty())>
                "Send"
            </button>
        </form>
    }
}
