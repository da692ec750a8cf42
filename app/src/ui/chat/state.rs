//! The chat's state for the whole visit: the thread, the settings and the generations it started.

use leptos::prelude::*;

use super::form::Settings;
use super::progress::GenState;
use super::socket::{stream_chat, stream_generation, AnswerState};
use crate::prompt::{follow_up_change, merge_follow_up};
use crate::ui::api::{self, Load};
use crate::ui::reply::reply;
use crate::{
    ChatRequest, ChatRole, ClassifyRequest, ClassifyResponse, ContextTurn, Conversation,
    ConversationSummary, GenerateRequest, HealthResponse, Label, LoraList, ModelsResponse,
    PromptHelpRequest, PromptHelpResponse, TurnKind, TurnRole,
};

/// Turns sent with each message to `/classify/`: enough for it to know what the last answer was.
const CONTEXT_TURNS: usize = 6;

#[derive(Clone)]
pub(super) enum Entry {
    /// The user's message and, once classified, what the classifier said.
    User {
        text: String,
        verdict: RwSignal<Option<Result<ClassifyResponse, ()>>>,
    },
    Reply(Vec<String>),
    /// A message of a reopened conversation, as it was stored.
    Past {
        role: ChatRole,
        text: String,
        image_job: Option<String>,
    },
    /// The language model's answer, streamed as it is written.
    Answer(AnswerState),
    /// The message could not be classified; offers to generate anyway.
    Unclassified {
        prompt: String,
        message: String,
    },
    Generation {
        request: GenerateRequest,
        state: RwSignal<GenState>,
    },
    /// Prompt help's rewrite of an image request, shown to edit before it is drawn.
    Draft(RwSignal<Draft>),
}

/// Prompt help's card: the language model writing, then the prompt to edit and draw (or not).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Draft {
    Writing,
    /// The prompt to show in the editor; `previous` is the prompt a follow-up changed.
    Ready {
        prompt: String,
        previous: Option<String>,
    },
    /// The model could not help; `fallback` is the prompt the chat would draw without help.
    Failed {
        message: String,
        fallback: String,
    },
    /// Sent to be drawn, with this prompt.
    Drawn(String),
    Cancelled,
}

#[derive(Clone)]
pub(super) struct Item {
    pub(super) id: usize,
    pub(super) entry: Entry,
}

/// What the chat keeps for the whole visit; provided by `App`.
#[derive(Clone, Copy)]
pub struct ChatState {
    pub(super) thread: RwSignal<Vec<Item>>,
    pub(super) next_id: StoredValue<usize>,
    pub(super) settings: Settings,
    pub(super) models: RwSignal<Load<ModelsResponse>>,
    pub(super) loras: RwSignal<Load<LoraList>>,
    pub(super) health: RwSignal<Option<HealthResponse>>,
    /// The stored conversation the chat's answers continue (`/chat/conversations/{id}`).
    pub(super) conversation: RwSignal<Option<String>>,
    /// The stored conversations, to reopen or delete.
    pub(super) conversations: RwSignal<Load<Vec<ConversationSummary>>>,
    /// The image shown full size, if any.
    pub(super) lightbox: RwSignal<Option<String>>,
    /// Help with prompts: image requests go through the language model first, shown to edit.
    pub(super) prompt_help: RwSignal<bool>,
    /// Signals of new entries belong to the app, not to the page that happened to create them.
    pub(super) owner: StoredValue<Owner>,
}

impl ChatState {
    pub fn provide() {
        let state = ChatState {
            thread: RwSignal::new(Vec::new()),
            next_id: StoredValue::new(0),
            settings: Settings::new(),
            models: RwSignal::new(Load::Loading),
            loras: RwSignal::new(Load::Loading),
            health: RwSignal::new(None),
            conversation: RwSignal::new(None),
            conversations: RwSignal::new(Load::Loading),
            lightbox: RwSignal::new(None),
            // Off until the user turns it on (then remembered by the browser): it adds a language model
            // answer, seconds on a CPU, before every image.
            prompt_help: RwSignal::new(false),
            owner: StoredValue::new(
                Owner::current().expect("ChatState::provide runs in a component"),
            ),
        };
        provide_context(state);
    }

    pub(super) fn push(&self, entry: Entry) {
        let id = self.next_id.get_value();
        self.next_id.set_value(id + 1);
        self.thread.update(|t| t.push(Item { id, entry }));
    }

    pub(super) fn signal<T: Send + Sync + 'static>(&self, value: T) -> RwSignal<T> {
        self.owner
            .with_value(|owner| owner.with(|| RwSignal::new(value)))
    }

    /// The thread's last turns, oldest first, as `/classify/` takes them.
    fn context(&self) -> Vec<ContextTurn> {
        let turn = |role, text: &str, kind| ContextTurn {
            role,
            text: text.to_string(),
            kind,
        };
        let thread = self.thread.get_untracked();
        let mut turns: Vec<ContextTurn> = thread
            .iter()
            .filter_map(|item| match &item.entry {
                Entry::User { text, .. } => Some(turn(TurnRole::User, text, TurnKind::Text)),
                Entry::Reply(lines) => {
                    Some(turn(TurnRole::Assistant, &lines.join("\n"), TurnKind::Text))
                }
                Entry::Generation { request, .. } => {
                    Some(turn(TurnRole::Assistant, &request.prompt, TurnKind::Image))
                }
                Entry::Answer(answer) => Some(turn(
                    TurnRole::Assistant,
                    &answer.text.get_untracked(),
                    TurnKind::Text,
                )),
                // A reopened conversation's message: an image when it recorded one.
                Entry::Past {
                    role,
                    text,
                    image_job,
                } => {
                    let role = match role {
                        ChatRole::User => TurnRole::User,
                        ChatRole::Assistant => TurnRole::Assistant,
                    };
                    let kind = if image_job.is_some() {
                        TurnKind::Image
                    } else {
                        TurnKind::Text
                    };
                    Some(turn(role, text, kind))
                }
                Entry::Unclassified { .. } | Entry::Draft(_) => None,
            })
            .collect();
        turns.drain(..turns.len().saturating_sub(CONTEXT_TURNS));
        turns
    }

    /// The user sent a message: classify it with the thread before it, then generate or reply.
    pub(super) fn send(self, text: String) {
        let context = self.context();
        let context_for_help = context.clone();
        let verdict = self.signal(None);
        self.push(Entry::User {
            text: text.clone(),
            verdict,
        });
        leptos::task::spawn_local(async move {
            let answer: Result<ClassifyResponse, String> = api::post(
                "/classify/",
                &ClassifyRequest {
                    prompt: text.clone(),
                    context,
                },
            )
            .await;
            match answer {
                Ok(answer) => {
                    verdict.set(Some(Ok(answer.clone())));
                    if answer.label == Label::ImageRequest {
                        self.image_request(text, context_for_help);
                    } else {
                        self.answer(text);
                    }
                }
                Err(message) => {
                    verdict.set(Some(Err(())));
                    self.push(Entry::Unclassified {
                        prompt: text,
                        message,
                    });
                }
            }
        });
    }

    /// The prompt of the thread's last image, which a follow-up changes.
    fn last_prompt(&self) -> Option<String> {
        self.thread.with_untracked(|thread| {
            thread.iter().rev().find_map(|item| match &item.entry {
                Entry::Generation { request, .. } => Some(request.prompt.clone()),
                Entry::Past {
                    text,
                    image_job: Some(_),
                    ..
                } => Some(text.clone()),
                _ => None,
            })
        })
    }

    /// An image request: a follow-up of the last image ("same but at night") changes its prompt instead
    /// of starting over. With prompt help the language model writes the prompt (the last one rewritten
    /// for a follow-up) and the user edits it before it is drawn; without, a follow-up's change is merged
    /// into the last prompt (`app::prompt::merge_follow_up`) and anything else is drawn as written.
    pub(super) fn image_request(self, text: String, context: Vec<ContextTurn>) {
        let previous = self.last_prompt();
        let change = previous.as_ref().and(follow_up_change(&text));
        let fallback = match (&previous, &change) {
            (Some(previous), Some(change)) => merge_follow_up(previous, change),
            _ => text.clone(),
        };
        if !self.prompt_help.get_untracked() {
            self.generate(fallback);
            return;
        }
        let draft = self.signal(Draft::Writing);
        self.push(Entry::Draft(draft));
        let request = PromptHelpRequest {
            previous_prompt: change.and(previous),
            context,
            ..PromptHelpRequest::new(text)
        };
        leptos::task::spawn_local(async move {
            let written: Result<PromptHelpResponse, String> =
                api::post("/chat/prompt/", &request).await;
            draft.set(match written {
                Ok(written) => Draft::Ready {
                    prompt: written.prompt,
                    previous: written.previous_prompt,
                },
                Err(message) => Draft::Failed { message, fallback },
            });
        });
    }

    /// Conversation: the language model answers, streamed; a server without one replies with what the
    /// studio can do and why it cannot chat.
    pub(super) fn answer(self, text: String) {
        let health = self.health.get_untracked();
        let chat_off = health.as_ref().and_then(|h| {
            h.capabilities
                .iter()
                .find(|c| c.name == "chat" && !c.available)
                .map(|c| c.reason.clone().unwrap_or_default())
        });
        if let Some(reason) = chat_off {
            let mut paragraphs = reply(&text, health.as_ref());
            paragraphs.push(format!(
                "The chat's language model is unavailable: {reason}."
            ));
            self.push(Entry::Reply(paragraphs));
            return;
        }
        let answer = AnswerState {
            text: self.signal(String::new()),
            end: self.signal(None),
            stop: self.signal(false),
            sources: self.signal(Vec::new()),
        };
        self.push(Entry::Answer(answer));
        let request = ChatRequest {
            conversation_id: self.conversation.get_untracked(),
            ..ChatRequest::new(text)
        };
        leptos::task::spawn_local(async move {
            if let Some(id) = stream_chat(request, answer).await {
                self.conversation.set(Some(id));
                self.load_conversations();
            }
        });
    }

    /// Refreshes the list of stored conversations.
    pub(super) fn load_conversations(self) {
        api::load_into("/chat/conversations/".into(), self.conversations);
    }

    /// Replaces the thread with a stored conversation, which the next answers continue.
    pub(super) fn reopen(self, id: String) {
        leptos::task::spawn_local(async move {
            match api::get::<Conversation>(&format!("/chat/conversations/{id}")).await {
                Ok(conversation) => {
                    self.thread.set(Vec::new());
                    for message in conversation.messages {
                        self.push(Entry::Past {
                            role: message.role,
                            text: message.content,
                            image_job: message.image_job,
                        });
                    }
                    self.conversation.set(Some(conversation.id));
                }
                Err(message) => self.conversations.set(Load::Failed(message)),
            }
        });
    }

    /// Deletes a stored conversation; the thread starts afresh if it was the open one.
    pub(super) fn forget(self, id: String) {
        leptos::task::spawn_local(async move {
            match api::delete(&format!("/chat/conversations/{id}")).await {
                Ok(()) => {
                    if self.conversation.get_untracked().as_deref() == Some(id.as_str()) {
                        self.conversation.set(None);
                        self.thread.set(Vec::new());
                    }
                    self.load_conversations();
                }
                Err(message) => self.conversations.set(Load::Failed(message)),
            }
        });
    }

    /// Generates `prompt` with the current settings.
    pub(super) fn generate(self, prompt: String) {
        match self.settings.request(&prompt) {
            Ok(request) => self.start(request),
            Err(message) => self.push(Entry::Unclassified { prompt, message }),
        }
    }

    pub(super) fn start(self, request: GenerateRequest) {
        let state = self.signal(GenState::new());
        self.push(Entry::Generation {
            request: request.clone(),
            state,
        });
        leptos::task::spawn_local(stream_generation(request, state));
    }
}
