//! The chat's state for the whole visit: the thread, the settings and the generations it started.

use leptos::prelude::*;

use super::edit::{self, EditTarget, InputImage};
use super::form::Settings;
use super::progress::GenState;
use super::progress::Phase;
use super::socket::{stream_chat, stream_generation, AnswerState};
use crate::prompt::{follow_up, merge_follow_up, FollowUp};
use crate::ui::api::{self, Load};
use crate::ui::reply::reply;
use crate::{
    ChatImage, ChatRequest, ChatRole, ClassifyRequest, ClassifyResponse, ContextTurn, Conversation,
    ConversationSummary, GenerateRequest, HealthResponse, Label, LoraList, ModelsResponse,
    NewConversation, PromptHelpRequest, PromptHelpResponse, Recipe, TurnKind, TurnRole,
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
    /// Prompt help's rewrite of an image request, shown to edit before it is drawn (from `target`'s
    /// image for a follow-up of one).
    Draft {
        draft: RwSignal<Draft>,
        target: Option<EditTarget>,
    },
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
    /// The message box's text (a dropped PNG's recipe puts its prompt here).
    pub(super) draft: RwSignal<String>,
    /// The image the next message starts from ("Use as input", a dropped or pasted image).
    pub(super) input: RwSignal<Option<InputImage>>,
    /// The image the edit dialog is open on.
    pub(super) editing: RwSignal<Option<EditTarget>>,
    /// A line above the message box about what a drop or paste did.
    pub(super) notice: RwSignal<Option<String>>,
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
            draft: RwSignal::new(String::new()),
            input: RwSignal::new(None),
            editing: RwSignal::new(None),
            notice: RwSignal::new(None),
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
                Entry::Unclassified { .. } | Entry::Draft { .. } => None,
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

    /// The thread's last image: its prompt, and what an edit of it starts from when it finished here
    /// (a reopened conversation's image is redrawn, not edited).
    fn last_image(&self) -> Option<(String, Option<(GenerateRequest, EditTarget)>)> {
        self.thread.with_untracked(|thread| {
            thread.iter().rev().find_map(|item| match &item.entry {
                Entry::Generation { request, state } => {
                    let finished = state.with_untracked(|s| {
                        (s.phase == Phase::Done).then(|| s.result.clone()).flatten()
                    });
                    let target = finished.map(|result| {
                        let target = EditTarget {
                            input: InputImage::of_job(
                                &result.job_id,
                                0,
                                result.images.len(),
                                (result.width, result.height),
                            ),
                            prompt: request.prompt.clone(),
                            model: request.model.clone(),
                        };
                        (request.clone(), target)
                    });
                    Some((request.prompt.clone(), target))
                }
                Entry::Past {
                    text,
                    image_job: Some(_),
                    ..
                } => Some((text.clone(), None)),
                _ => None,
            })
        })
    }

    /// An image request (docs/ui.md#follow-ups): an edit of the pending input image when there is one;
    /// after an image, a follow-up (`app::prompt::follow_up`) makes variations of it ("another one") or
    /// changes its prompt ("same but at night") and redraws it from that image; anything else is a new
    /// picture. With prompt help the language model writes the prompt (the last one rewritten for a
    /// follow-up) and the user edits it before it is drawn.
    pub(super) fn image_request(self, text: String, context: Vec<ContextTurn>) {
        if let Some(input) = self.input.get_untracked() {
            let target = EditTarget {
                input,
                prompt: String::new(),
                model: None,
            };
            self.input.set(None);
            return self.edit(&target, &text, None);
        }
        let last = self.last_image();
        let follow_up = match &last {
            Some(_) => follow_up(&text),
            None => FollowUp::New,
        };
        let (previous, target) = match (last, &follow_up) {
            (Some((prompt, target)), FollowUp::Again | FollowUp::Change(_)) => {
                (Some(prompt), target)
            }
            _ => (None, None),
        };
        let fallback = match (&previous, &follow_up) {
            (Some(previous), FollowUp::Change(change)) => merge_follow_up(previous, change),
            (Some(previous), FollowUp::Again) => previous.clone(),
            _ => text.clone(),
        };
        if let FollowUp::Again = follow_up {
            return match target {
                Some((request, _)) => self.variations(&request),
                None => self.generate(fallback),
            };
        }
        let target = target.map(|(_, target)| target);
        if !self.prompt_help.get_untracked() {
            // An edit's prompt is `edit::edit_prompt`'s: the merged prompt, or for an instruction
            // model (Kontext) the message itself.
            return match target {
                Some(target) => self.edit(&target, &text, None),
                None => self.generate(fallback),
            };
        }
        let draft = self.signal(Draft::Writing);
        self.push(Entry::Draft { draft, target });
        let request = PromptHelpRequest {
            previous_prompt: previous,
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

    /// Draws `prompt`: from `target`'s image when there is one, else as a new picture.
    pub(super) fn draw(self, target: Option<&EditTarget>, prompt: String) {
        match target {
            Some(target) => self.start_edit(target, prompt, None),
            None => self.generate(prompt),
        }
    }

    /// An edit of `target`'s image by `instruction`, inpainting under `mask` when one was painted.
    pub(super) fn edit(self, target: &EditTarget, instruction: &str, mask: Option<String>) {
        let model = target
            .model
            .clone()
            .or_else(|| Some(self.settings.model.get_untracked()).filter(|m| !m.is_empty()));
        let prompt = edit::edit_prompt(model.as_deref(), &target.prompt, instruction);
        self.start_edit(target, prompt, mask)
    }

    /// Draws `prompt` from `target`'s image, inpainting under `mask` when there is one.
    fn start_edit(self, target: &EditTarget, prompt: String, mask: Option<String>) {
        match self.settings.request(&prompt) {
            Ok(mut request) => {
                target
                    .input
                    .apply(&mut request, self.settings.strength.get_untracked(), mask);
                self.start(request)
            }
            Err(message) => self.push(Entry::Unclassified { prompt, message }),
        }
    }

    /// The same request with new seeds, as several images.
    pub(super) fn variations(self, request: &GenerateRequest) {
        self.start(GenerateRequest {
            seed: None,
            num_images: Some(crate::limits::MAX_IMAGES),
            ..request.clone()
        })
    }

    /// A dropped PNG's recipe: its settings in the panel, its prompt in the message box.
    pub(super) fn restore(self, recipe: Recipe) {
        let s = self.settings;
        let known = self.models.with_untracked(|m| match m {
            Load::Ready(list) => list.presets.iter().any(|p| p.id == recipe.model),
            _ => false,
        });
        if known {
            s.model.set(recipe.model.clone());
        }
        match recipe.loras.first() {
            Some(lora) => {
                s.lora.set(lora.name.clone());
                s.lora_scale.set(lora.scale);
            }
            None => s.lora.set("none".into()),
        }
        s.steps.set(recipe.steps.to_string());
        s.guidance.set(recipe.guidance.to_string());
        s.seed.set(recipe.seed.to_string());
        s.exact_size
            .set(Some((recipe.width, recipe.height)).filter(|&(w, h)| w > 0 && h > 0));
        self.draft.set(recipe.prompt.clone());
        let model_note = if known {
            String::new()
        } else {
            format!(
                " (model {} is not on this studio: the selected one is kept)",
                recipe.model
            )
        };
        self.notice.set(Some(format!(
            "Settings restored from the image: seed {}, {} steps, {}×{}{model_note}.",
            recipe.seed, recipe.steps, recipe.width, recipe.height
        )));
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
        let prompt = request.prompt.clone();
        leptos::task::spawn_local(async move {
            stream_generation(request, state).await;
            self.record_image(state, prompt).await;
        });
    }

    /// Records a finished image in the open conversation (starting one when the chat has none yet),
    /// so that reopening the conversation shows it and the model knows what was drawn.
    async fn record_image(self, state: RwSignal<GenState>, prompt: String) {
        let done = state.with_untracked(|s| (s.phase == Phase::Done).then(|| s.job_id.clone()));
        let Some(Some(job_id)) = done else {
            return;
        };
        let id = match self.conversation.get_untracked() {
            Some(id) => id,
            None => {
                let new = NewConversation {
                    title: prompt.clone(),
                };
                match api::post::<_, Conversation>("/chat/conversations", &new).await {
                    Ok(conversation) => {
                        self.conversation.set(Some(conversation.id.clone()));
                        conversation.id
                    }
                    Err(message) => return self.not_recorded(message),
                }
            }
        };
        let image = ChatImage { job_id, prompt };
        match api::post::<_, Conversation>(&format!("/chat/conversations/{id}/images"), &image)
            .await
        {
            Ok(_) => self.load_conversations(),
            Err(message) => self.not_recorded(message),
        }
    }

    fn not_recorded(self, message: String) {
        self.notice.set(Some(format!(
            "The image was not saved in the conversation: {message}"
        )));
    }
}
