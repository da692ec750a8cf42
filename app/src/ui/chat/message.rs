//! One entry of the thread: the user's message with its verdict, the language model's answer, a reply,
//! an offer to generate anyway.

use leptos::prelude::*;

use super::generation::GenerationView;
use super::state::{ChatState, Entry};
use crate::ui::ErrorBox;
use crate::{ChatFinish, ChatRole, Label};

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
        Entry::Past {
            role,
            text,
            image_job,
        } => {
            let class = match role {
                ChatRole::User => "msg user past",
                ChatRole::Assistant => "msg studio past",
            };
            match image_job {
                Some(job) => view! {
                    <div class=class>
                        <img src=format!("/images/{job}") alt=text.clone() />
                        <p>{text}</p>
                    </div>
                }
                .into_any(),
                None => view! {
                    <div class=class>
                        <p class="answer-text">{text}</p>
                    </div>
                }
                .into_any(),
            }
        }
        Entry::Answer(answer) => view! {
            <div class="msg studio answer" data-testid="chat-answer">
                <p class="answer-text">{move || answer.text.get()}</p>
                {move || match answer.end.get() {
                    None => view! {
                        <button
                            class="secondary stop"
                            disabled=move || answer.stop.get()
                            on:click=move |_| answer.stop.set(true)
                        >
                            "Stop"
                        </button>
                    }
                    .into_any(),
                    Some(Ok(ChatFinish::Cancelled)) => view! { <span class="verdict">"stopped"</span> }.into_any(),
                    Some(Ok(_)) => ().into_any(),
                    Some(Err(message)) => view! { <ErrorBox message /> }.into_any(),
                }}
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
