//! The message box: Enter sends, Shift+Enter starts a new line; an image pasted into it becomes the next
//! message's input (or restores the settings its recipe holds). The pending input image sits above it;
//! beside it the prompt help switch, remembered by the browser.

use leptos::ev::{KeyboardEvent, SubmitEvent};
use leptos::prelude::*;

use super::editor::{accept_file, first_file, InputChip};
use super::state::ChatState;

/// Where the browser remembers the prompt help switch.
const PROMPT_HELP_KEY: &str = "studio.promptHelp";

fn storage() -> Option<web_sys::Storage> {
    window().local_storage().ok().flatten()
}

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
    // Effects run in the browser only, where the remembered choice is.
    Effect::new(move |_| {
        if let Some(on) = storage().and_then(|s| s.get_item(PROMPT_HELP_KEY).ok().flatten()) {
            chat.prompt_help.set(on == "on");
        }
    });
    let toggle = move |ev| {
        let on = event_target_checked(&ev);
        chat.prompt_help.set(on);
        if let Some(storage) = storage() {
            let _ = storage.set_item(PROMPT_HELP_KEY, if on { "on" } else { "off" });
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
            <label
                class="prompt-help-switch"
                title="The language model turns a short image request into a detailed prompt, shown to edit before it is drawn"
            >
                <input type="checkbox" prop:checked=move || chat.prompt_help.get() on:change=toggle />
                "Help with prompts"
            </label>
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
