//! One entry of the thread: the user's message with its verdict, a reply, an offer to generate anyway.

use leptos::prelude::*;

use super::generation::GenerationView;
use super::state::{ChatState, Entry};
use crate::ui::ErrorBox;
use crate::Label;

#[component]
pub(super) fn EntryView(chat: ChatState, entry: Entry) -> impl IntoView {
    match entry {
        Entry::User { text, verdict } => view! {
            <div class="msg user">
                <p>{text}</p>
                <span class="verdict">
                    {move || match verdict.get() {
                        None => "reading…".to_string(),
                        Some(Ok(v)) => {
                            let label = match v.label {
                                Label::ImageRequest => "image request",
                                Label::Conversation => "conversation",
                            };
                            format!("{label} · {:.0}%", v.confidence * 100.0)
                        }
                        Some(Err(())) => "not classified".to_string(),
                    }}
                </span>
            </div>
        }
        .into_any(),
        Entry::Reply(paragraphs) => view! {
            <div class="msg studio reply">
                {paragraphs.into_iter().map(|p| view! { <p>{p}</p> }).collect_view()}
            </div>
        }
        .into_any(),
        Entry::Unclassified { prompt, message } => view! {
            <div class="msg studio">
                <ErrorBox message />
                <button class="secondary" on:click=move |_| chat.generate(prompt.clone())>
                    "Generate it as an image"
                </button>
            </div>
        }
        .into_any(),
        Entry::Generation { request, state } => {
            view! { <GenerationView chat request state /> }.into_any()
        }
    }
}
