//! The chat's state for the whole visit: the thread, the settings and the generations it started.

use leptos::prelude::*;

use super::form::Settings;
use super::progress::GenState;
use super::socket::stream_generation;
use crate::ui::api::{self, Load};
use crate::ui::reply::reply;
use crate::{
    ClassifyRequest, ClassifyResponse, ContextTurn, GenerateRequest, HealthResponse, Label,
    LoraList, ModelsResponse, TurnKind, TurnRole,
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
    /// The message could not be classified; offers to generate anyway.
    Unclassified {
        prompt: String,
        message: String,
    },
    Generation {
        request: GenerateRequest,
        state: RwSignal<GenState>,
    },
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
    /// The image shown full size, if any.
    pub(super) lightbox: RwSignal<Option<String>>,
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
            lightbox: RwSignal::new(None),
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
                Entry::Unclassified { .. } => None,
            })
            .collect();
        turns.drain(..turns.len().saturating_sub(CONTEXT_TURNS));
        turns
    }

    /// The user sent a message: classify it with the thread before it, then generate or reply.
    pub(super) fn send(self, text: String) {
        let context = self.context();
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
                        self.generate(text);
                    } else {
                        let health = self.health.get_untracked();
                        self.push(Entry::Reply(reply(&text, health.as_ref())));
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
