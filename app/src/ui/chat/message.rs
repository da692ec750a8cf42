//! One entry of the thread: the user's message with its verdict, the language model's answer, a reply,
//! an offer to generate anyway.

use leptos::prelude::*;

use super::edit::EditTarget;
use super::generation::GenerationView;
use super::state::{ChatState, Draft, Entry};
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
                // Stop sits above the text, so that it stays put while the tokens stream in below it.
                {move || {
                    answer.end.with(Option::is_none).then(|| view! {
                        <button
                            class="secondary stop"
                            disabled=move || answer.stop.get()
                            on:click=move |_| answer.stop.set(true)
                        >
                            "Stop"
                        </button>
                    })
                }}
                <p class="answer-text">{move || answer.text.get()}</p>
                {move || {
                    let sources = answer.sources.get();
                    (!sources.is_empty())
                        .then(|| view! { <p class="sources">"From the studio's docs: " {sources.join("; ")}</p> })
                }}
                {move || match answer.end.get() {
                    None => ().into_any(),
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
        Entry::Draft { draft, target } => view! { <DraftView chat draft target /> }.into_any(),
    }
}

/// Prompt help's card: the prompt the language model wrote, in an editor, drawn with Generate.
#[component]
fn DraftView(chat: ChatState, draft: RwSignal<Draft>, target: Option<EditTarget>) -> impl IntoView {
    let target = StoredValue::new(target);
    let edited = RwSignal::new(String::new());
    Effect::new(move |_| {
        if let Draft::Ready { prompt, .. } = draft.get() {
            edited.set(prompt);
        }
    });
    let draw = move |prompt: String| {
        draft.set(Draft::Drawn(prompt.clone()));
        chat.draw(target.get_value().as_ref(), prompt);
    };
    view! {
        <div class="msg studio prompt-help" aria-label="Prompt help">
            {move || match draft.get() {
                Draft::Writing => view! {
                    <p class="status">
                        <span class="spinner" aria-hidden="true"></span>
                        " Writing a detailed prompt…"
                    </p>
                }
                .into_any(),
                Draft::Ready { previous, .. } => view! {
                    <p class="draft-head">
                        {if previous.is_some() { "The last prompt, changed:" } else { "A detailed prompt:" }}
                    </p>
                    <textarea
                        aria-label="Prompt to draw"
                        rows="4"
                        prop:value=move || edited.get()
                        on:input=move |ev| edited.set(event_target_value(&ev))
                    ></textarea>
                    {previous.map(|p| view! { <small class="previous">"Was: " {p}</small> })}
                    <div class="actions">
                        <button
                            class="primary"
                            disabled=move || edited.with(|t| t.trim().is_empty())
                            on:click=move |_| draw(edited.get_untracked())
                        >
                            "Generate"
                        </button>
                        <button class="secondary" on:click=move |_| draft.set(Draft::Cancelled)>
                            "Cancel"
                        </button>
                    </div>
                }
                .into_any(),
                Draft::Failed { message, fallback } => view! {
                    <ErrorBox message=format!("Prompt help failed: {message}") />
                    <button class="secondary" on:click=move |_| draw(fallback.clone())>
                        "Draw it without help"
                    </button>
                }
                .into_any(),
                Draft::Drawn(prompt) => view! { <p class="prompt">"Drawing: " {prompt}</p> }.into_any(),
                Draft::Cancelled => view! { <p class="verdict">"Not drawn"</p> }.into_any(),
            }}
        </div>
    }
}
