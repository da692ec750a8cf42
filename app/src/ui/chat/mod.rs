//! Chat and generate: every message is classified by `POST /classify/`; an image request becomes a
//! generation over `/ws/generate` with live step previews, anything else is answered by the language
//! model over `/ws/chat`, streamed as it is written (in a stored conversation the next answer continues). The thread lives for the whole visit (not just this page), so a generation keeps going
//! and stays visible while the user looks at the gallery or the jobs.

mod composer;
mod edit;
mod editor;
mod form;
mod generation;
mod lightbox;
mod message;
mod progress;
mod settings;
mod socket;
mod state;

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::use_query_map;

use super::api::{self, Load};
use crate::HealthResponse;

use composer::Composer;
use editor::{accept_file, first_file, EditDialog};
use lightbox::Lightbox;
use message::EntryView;
use settings::SettingsPanel;
pub use state::ChatState;

#[component]
pub fn ChatPage() -> impl IntoView {
    let chat = expect_context::<ChatState>();
    let query = use_query_map();
    let dropping = RwSignal::new(false);
    Effect::new(move |_| {
        // Once per visit: the lists the settings offer, and what this server can do.
        if matches!(chat.models.get_untracked(), Load::Loading) {
            api::load_into("/models/".into(), chat.models);
        }
        api::load_into("/loras/".into(), chat.loras);
        chat.load_conversations();
        leptos::task::spawn_local(async move {
            if let Ok(health) = api::get::<HealthResponse>("/health").await {
                chat.health.set(Some(health));
            }
        });
        // "Generate with this LoRA" links here with ?lora=<model_id>.
        if let Some(lora) = query.get_untracked().get("lora") {
            chat.settings.lora.set(lora);
        }
    });
    view! {
        <Title text="Chat · FLUX studio" />
        <div class="chat-layout">
            <section
                class="chat"
                aria-label="Chat"
                class:dropping=move || dropping.get()
                on:dragover=move |ev: leptos::ev::DragEvent| {
                    ev.prevent_default();
                    dropping.set(true);
                }
                on:dragleave=move |_| dropping.set(false)
                on:drop=move |ev: leptos::ev::DragEvent| {
                    ev.prevent_default();
                    dropping.set(false);
                    if let Some(file) = first_file(ev.data_transfer()) {
                        accept_file(chat, file);
                    }
                }
            >
                <Conversations chat />
                <Thread chat />
                <Composer chat />
            </section>
            <SettingsPanel chat />
        </div>
        <Lightbox chat />
        <EditDialog chat />
    }
    .into_any()
}

#[component]
pub(super) fn Thread(chat: ChatState) -> impl IntoView {
    let end = NodeRef::<leptos::html::Div>::new();
    Effect::new(move |_| {
        chat.thread.with(Vec::len);
        if let Some(end) = end.get() {
            end.scroll_into_view();
        }
    });
    view! {
        <div class="thread" aria-live="polite">
            <Show when=move || chat.thread.with(Vec::is_empty)>
                <Welcome chat />
            </Show>
            <For
                each=move || chat.thread.get()
                key=|item| item.id
                children=move |item| view! { <EntryView chat entry=item.entry /> }
            />
            <div node_ref=end></div>
        </div>
    }
}

/// The stored conversations: reopen one (the next answers continue it) or delete it.
#[component]
pub(super) fn Conversations(chat: ChatState) -> impl IntoView {
    view! {
        <details class="conversations">
            <summary>"Conversations"</summary>
            {move || match chat.conversations.get() {
                Load::Loading => view! { <p>"loading…"</p> }.into_any(),
                Load::Failed(message) => view! { <crate::ui::ErrorBox message /> }.into_any(),
                Load::Ready(list) if list.is_empty() => {
                    view! { <p>"No conversation yet."</p> }.into_any()
                }
                Load::Ready(list) => view! {
                    <ul>
                        {list
                            .into_iter()
                            .map(|c| {
                                let (open, forget) = (c.id.clone(), c.id.clone());
                                view! {
                                    <li>
                                        <button class="link" on:click=move |_| chat.reopen(open.clone())>
                                            {c.title}
                                        </button>
                                        <button
                                            class="secondary"
                                            aria-label="Delete conversation"
                                            on:click=move |_| chat.forget(forget.clone())
                                        >
                                            "Delete"
                                        </button>
                                    </li>
                                }
                            })
                            .collect_view()}
                    </ul>
                }
                .into_any(),
            }}
        </details>
    }
}

#[component]
pub(super) fn Welcome(chat: ChatState) -> impl IntoView {
    let examples = [
        "a lighthouse on a cliff at dusk, oil painting",
        "portrait of an old sailor, 35mm photo",
        "what can you do?",
    ];
    view! {
        <div class="welcome">
            <h1>"What shall we make?"</h1>
            <p>
                "Describe an image and the studio draws it, showing each step as it sharpens. "
                "Ask anything else and its language model answers."
            </p>
            <div class="examples">
                {examples
                    .into_iter()
                    .map(|text| {
                        view! {
                            <button class="chip" on:click=move |_| chat.send(text.to_owned())>
                                {text}
                            </button>
                        }
                    })
                    .collect_view()}
            </div>
        </div>
    }
}
