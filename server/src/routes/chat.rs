//! The chat's conversation side: `POST /chat/` answers a message in a stored conversation; the
//! conversations can be listed, reopened and deleted; `/ws/chat` (in `ws`) streams the same answers.

use std::sync::Arc;

use app::{
    ChatFinish, ChatImage, ChatRequest, ChatResponse, ChatRole, Conversation, ConversationSummary,
    ErrorBody, ErrorCode, NewConversation, PromptHelpRequest, PromptHelpResponse,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use engine::chat::{Answer, FinishReason, Role, SamplingSettings, Turn};
use tokio::sync::OwnedSemaphorePermit;

use super::auth::Caller;
use super::{ApiJson, ApiPath, AppState};
use crate::error::ApiError;
use crate::jobs::capability::{Chat, Control};
use crate::store::{NewMessage, Store, Viewer};

/// What the model is told before every conversation.
const SYSTEM_PROMPT: &str = "You are the assistant of FLUX Studio, a self-hosted studio that draws \
pictures from text with FLUX models and trains LoRAs on the user's own pictures. When the user asks \
for a picture, the studio draws it; you answer everything else: questions, writing, explanations, \
plans. Be helpful and concise.";

/// Sections of the studio's docs given to the model with a question, at most.
const DOC_SECTIONS: usize = 2;

/// A section is given only when it is at least this similar to the question (cosine of MiniLM's
/// embeddings): questions about the studio score well above it, small talk and writing requests below.
const DOC_MIN_SIMILARITY: f32 = 0.45;

/// A checked request, its conversation recorded with the user's message, holding its place in line.
pub(super) struct Prepared {
    pub conversation_id: String,
    pub chat: Arc<dyn Chat>,
    pub turns: Vec<Turn>,
    pub settings: SamplingSettings,
    /// The docs' sections added to the system turn, as the answer cites them.
    pub sources: Vec<String>,
    _slot: OwnedSemaphorePermit,
}

/// The sections of the studio's docs that `question` is about (none for a question about anything
/// else), nearest first.
async fn studio_docs(
    chat: &Arc<dyn Chat>,
    question: &str,
) -> Result<Vec<engine::chat::docs::DocChunk>, ApiError> {
    let chat = chat.clone();
    let question = question.to_owned();
    let found = tokio::task::spawn_blocking(move || chat.studio_docs(&question, DOC_SECTIONS))
        .await
        .map_err(|e| ApiError::internal("searching the studio's docs panicked", e))?
        .map_err(|e| ApiError::new(ErrorCode::ChatFailed, format!("{e:#}")))?;
    Ok(found
        .into_iter()
        .filter(|(similarity, _)| *similarity >= DOC_MIN_SIMILARITY)
        .map(|(_, chunk)| chunk)
        .collect())
}

/// The system turn with the docs' sections the question is about.
fn with_docs(system: &mut Turn, docs: &[engine::chat::docs::DocChunk]) {
    if docs.is_empty() {
        return;
    }
    system
        .content
        .push_str("\n\nAnswer questions about the studio from these parts of its documentation:");
    for chunk in docs {
        system
            .content
            .push_str(&format!("\n\n[{}]\n{}", chunk.citation(), chunk.text));
    }
}

fn conversation_id(s: &str) -> Result<String, ApiError> {
    uuid::Uuid::try_parse(s)
        .ok()
        .filter(|_| s.len() == 36)
        .map(|_| s.to_owned())
        .ok_or_else(|| ApiError::not_found(format!("no conversation {s:?}")))
}

fn store_error(context: &'static str) -> impl FnOnce(anyhow::Error) -> ApiError {
    move |err| ApiError::store(context, err)
}

/// The stored conversation as the model reads it: the studio's system turn, then its messages; an image
/// is the assistant's turn saying what it drew.
fn turns(conversation: &Conversation) -> Vec<Turn> {
    let mut turns = vec![Turn::new(Role::System, SYSTEM_PROMPT)];
    for message in &conversation.messages {
        let (role, content) = match (message.role, &message.image_job) {
            (_, Some(_)) => (
                Role::Assistant,
                format!("(I drew a picture of: {})", message.content),
            ),
            (ChatRole::User, None) => (Role::User, message.content.clone()),
            (ChatRole::Assistant, None) => (Role::Assistant, message.content.clone()),
        };
        // Two turns of one side in a row (an image after an answer, a user message after a stopped
        // answer that wrote nothing) are joined: templates expect the sides to alternate.
        match turns.last_mut() {
            Some(last) if last.role == role && role != Role::System => {
                last.content.push_str("\n\n");
                last.content.push_str(&content);
            }
            _ => turns.push(Turn::new(role, content)),
        }
    }
    turns
}

/// Whether the conversation exists and `viewer` may see it: another user's is treated as missing.
fn visible(store: &Store, id: &str, viewer: &Viewer) -> anyhow::Result<bool> {
    Ok(store
        .conversation_owner(id)?
        .is_some_and(|owner| viewer.sees(owner.as_deref())))
}

/// Checks the request, takes a place in the chat's line (429 when full), records the user's message (in a
/// new conversation of `viewer`'s when none is named) and reads the conversation back as the model's turns.
pub(super) async fn prepare(
    state: &AppState,
    request: ChatRequest,
    viewer: &Viewer,
) -> Result<Prepared, ApiError> {
    let chat = state
        .jobs
        .capabilities()
        .chat()
        .map_err(ApiError::unavailable)?;
    request.validate().map_err(ApiError::validation)?;
    let existing = request
        .conversation_id
        .as_deref()
        .map(conversation_id)
        .transpose()?;
    let slot = state
        .settings
        .chat_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::queue_full("chat"))?;
    let max_tokens = request
        .max_tokens
        .unwrap_or(state.settings.chat_max_tokens)
        .min(state.settings.chat_max_tokens);
    let settings = SamplingSettings {
        max_tokens: max_tokens as usize,
        temperature: request
            .temperature
            .map_or(SamplingSettings::default().temperature, f64::from),
        seed: request
            .seed
            .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0),
        ..SamplingSettings::default()
    };
    let docs = studio_docs(&chat, &request.message).await?;
    let store = state.jobs.store().clone();
    let message = request.message;
    let named = existing.clone();
    let viewer = viewer.clone();
    let conversation = store
        .call(move |store| {
            let id = match existing {
                Some(id) if !visible(store, &id, &viewer)? => return Ok(None),
                Some(id) => id,
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    store.create_conversation(&id, &message, viewer.owner())?;
                    id
                }
            };
            let user = NewMessage {
                role: ChatRole::User,
                content: &message,
                image_job: None,
                model: None,
                finish: None,
            };
            if store.add_message(&id, &user)?.is_none() {
                return Ok(None);
            }
            store.conversation(&id)
        })
        .await
        .map_err(store_error("recording the message"))?
        .ok_or_else(|| {
            ApiError::not_found(format!("no conversation {}", named.unwrap_or_default()))
        })?;
    let mut turns = turns(&conversation);
    with_docs(&mut turns[0], &docs);
    Ok(Prepared {
        conversation_id: conversation.id.clone(),
        turns,
        chat,
        settings,
        sources: docs.iter().map(|c| c.citation()).collect(),
        _slot: slot,
    })
}

fn finish(reason: FinishReason) -> ChatFinish {
    match reason {
        FinishReason::Stop => ChatFinish::Stop,
        FinishReason::Length => ChatFinish::Length,
        FinishReason::Cancelled => ChatFinish::Cancelled,
    }
}

/// Runs the answer on the blocking pool, passing each piece to `on_text`, and records it in the
/// conversation (a stopped answer with what it had written).
pub(super) async fn answer(
    state: &AppState,
    prepared: Prepared,
    on_text: impl FnMut(&str) -> Control + Send + 'static,
) -> Result<ChatResponse, ApiError> {
    let Prepared {
        conversation_id,
        chat,
        turns,
        settings,
        sources,
        _slot,
    } = prepared;
    let model = chat.model();
    let mut on_text = on_text;
    let answered: anyhow::Result<Answer> = tokio::task::spawn_blocking(move || {
        let _slot = _slot;
        chat.answer(&turns, &settings, &mut on_text)
    })
    .await
    .map_err(|e| ApiError::internal("the chat model panicked", e))?;
    let answer = answered.map_err(|e| {
        let text = format!("{e:#}");
        tracing::warn!("chat answer failed: {text}");
        ApiError::new(
            ErrorCode::ChatFailed,
            format!(
                "the language model failed: {}",
                text.lines().next().unwrap_or_default()
            ),
        )
    })?;
    let response = ChatResponse {
        conversation_id: conversation_id.clone(),
        answer: answer.text.trim().to_owned(),
        model: model.clone(),
        finish: finish(answer.finish),
        tokens: answer.tokens as u32,
        sources,
    };
    let stored = response.clone();
    state
        .jobs
        .store()
        .call(move |store| {
            store.add_message(
                &stored.conversation_id,
                &NewMessage {
                    role: ChatRole::Assistant,
                    content: &stored.answer,
                    image_job: None,
                    model: Some(&stored.model),
                    finish: Some(stored.finish),
                },
            )
        })
        .await
        .map_err(store_error("recording the answer"))?;
    Ok(response)
}

/// Answers a message with the chat's language model, in a stored conversation.
#[utoipa::path(post, path = "/chat/", tag = "chat", request_body = ChatRequest, responses(
    (status = 200, body = ChatResponse),
    (status = 404, description = "No such conversation", body = ErrorBody),
    (status = 422, description = "Empty or too long message, or a setting out of range", body = ErrorBody),
    (status = 429, description = "Too many chat answers waiting", body = ErrorBody),
    (status = 500, description = "The language model failed (`chat_failed`)", body = ErrorBody),
    (status = 503, description = "No language model: the reason says what to install or set", body = ErrorBody),
))]
pub async fn chat(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Json<ChatResponse>, ApiError> {
    let prepared = prepare(&state, request, &viewer).await?;
    // A client that hangs up does not stop a plain request's answer: it is recorded for the conversation.
    answer(&state, prepared, |_| Control::Continue)
        .await
        .map(Json)
}

/// Help with prompts: the language model turns a short image request into a detailed FLUX prompt, or,
/// for a follow-up of the last image ("same but at night", "make it red"), rewrites that image's prompt
/// with the change. The prompt is the UI's to show and edit; nothing is drawn here.
#[utoipa::path(post, path = "/chat/prompt", tag = "chat", request_body = PromptHelpRequest, responses(
    (status = 200, body = PromptHelpResponse),
    (status = 422, description = "Empty or too long request", body = ErrorBody),
    (status = 429, description = "Too many chat answers waiting", body = ErrorBody),
    (status = 500, description = "The language model failed (`chat_failed`)", body = ErrorBody),
    (status = 503, description = "No language model: the reason says what to install or set", body = ErrorBody),
))]
pub async fn prompt(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<PromptHelpRequest>,
) -> Result<Json<PromptHelpResponse>, ApiError> {
    let chat = state
        .jobs
        .capabilities()
        .chat()
        .map_err(ApiError::unavailable)?;
    request.validate().map_err(ApiError::validation)?;
    let previous = request.previous().map(str::to_owned);
    // A follow-up's change alone ("at night" of "same but at night") is what the model is shown.
    let change = app::prompt::follow_up_change(&request.request)
        .unwrap_or_else(|| request.request.trim().to_owned());
    let model = chat.model();
    if let (Some(previous), true) = (&previous, change.is_empty()) {
        // "another one": the same prompt again, nothing to rewrite.
        return Ok(Json(PromptHelpResponse {
            prompt: previous.clone(),
            previous_prompt: Some(previous.clone()),
            model,
        }));
    }
    let slot = state
        .settings
        .chat_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::queue_full("chat"))?;
    let asked = if previous.is_some() {
        change
    } else {
        request.request.trim().to_owned()
    };
    let before = previous.clone();
    let written = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let turns = engine::chat::prompt_help::rewrite_turns(&asked, before.as_deref());
        let answer = chat.answer(&turns, &engine::chat::prompt_help::sampling(), &mut |_| {
            Control::Continue
        })?;
        let keep = engine::chat::prompt_help::kept_subject(&asked, before.as_deref());
        let change = before.as_ref().map(|_| asked.as_str());
        anyhow::Ok(engine::chat::prompt_help::finish_prompt(
            &answer.text,
            keep,
            change,
        ))
    })
    .await
    .map_err(|e| ApiError::internal("the chat model panicked", e))?
    .map_err(|e| {
        ApiError::new(
            ErrorCode::ChatFailed,
            format!("the language model failed: {e:#}"),
        )
    })?;
    Ok(Json(PromptHelpResponse {
        prompt: written,
        previous_prompt: previous,
        model,
    }))
}

/// The stored conversations the caller may see, most recently active first.
#[utoipa::path(get, path = "/chat/conversations", tag = "chat", responses(
    (status = 200, body = Vec<ConversationSummary>),
))]
pub async fn list(
    State(state): State<AppState>,
    Caller(viewer): Caller,
) -> Result<Json<Vec<ConversationSummary>>, ApiError> {
    state
        .jobs
        .store()
        .call(move |store| store.conversations(&viewer))
        .await
        .map(Json)
        .map_err(store_error("listing the conversations"))
}

/// Starts an empty conversation, for a chat whose first turn drew an image: its images are recorded
/// in it (`POST /chat/conversations/{id}/images`) and its answers continue it.
#[utoipa::path(post, path = "/chat/conversations", tag = "chat", request_body = NewConversation, responses(
    (status = 201, body = Conversation),
    (status = 422, body = ErrorBody),
))]
pub async fn create(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiJson(new): ApiJson<NewConversation>,
) -> Result<(StatusCode, Json<Conversation>), ApiError> {
    if new.title.trim().is_empty() {
        return Err(ApiError::validation("title must not be empty"));
    }
    let id = uuid::Uuid::new_v4().to_string();
    state
        .jobs
        .store()
        .call(move |store| {
            store.create_conversation(&id, &new.title, viewer.owner())?;
            store.conversation(&id)
        })
        .await
        .map_err(store_error("starting a conversation"))?
        .map(|c| (StatusCode::CREATED, Json(c)))
        .ok_or_else(|| ApiError::internal("starting a conversation", "it could not be read back"))
}

/// One conversation with every message (an image's message names its job: `GET /images/{job_id}`).
#[utoipa::path(get, path = "/chat/conversations/{id}", tag = "chat", responses(
    (status = 200, body = Conversation),
    (status = 404, body = ErrorBody),
))]
pub async fn show(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Conversation>, ApiError> {
    let id = conversation_id(&id)?;
    let found = {
        let id = id.clone();
        state
            .jobs
            .store()
            .call(move |store| {
                if !visible(store, &id, &viewer)? {
                    return Ok(None);
                }
                store.conversation(&id)
            })
            .await
            .map_err(store_error("reading the conversation"))?
    };
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no conversation {id}")))
}

/// Deletes a conversation and its messages; its images stay in the gallery.
#[utoipa::path(delete, path = "/chat/conversations/{id}", tag = "chat", responses(
    (status = 204, description = "Deleted"),
    (status = 404, body = ErrorBody),
))]
pub async fn delete(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = conversation_id(&id)?;
    let deleted = {
        let id = id.clone();
        state
            .jobs
            .store()
            .call(move |store| Ok(visible(store, &id, &viewer)? && store.delete_conversation(&id)?))
            .await
            .map_err(store_error("deleting the conversation"))?
    };
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no conversation {id}")))
    }
}

/// Records an image drawn in the conversation (the UI sends image requests to `/ws/generate`), so that
/// reopening the conversation shows it and the model knows what was drawn.
#[utoipa::path(post, path = "/chat/conversations/{id}/images", tag = "chat", request_body = ChatImage, responses(
    (status = 200, body = Conversation),
    (status = 404, description = "No such conversation or job", body = ErrorBody),
    (status = 422, body = ErrorBody),
))]
pub async fn add_image(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(image): ApiJson<ChatImage>,
) -> Result<Json<Conversation>, ApiError> {
    let id = conversation_id(&id)?;
    if image.prompt.trim().is_empty() {
        return Err(ApiError::validation("prompt must not be empty"));
    }
    let job = super::job_id(&image.job_id)?;
    let record = state.jobs.record_for(job, &viewer).await?;
    if record.kind != app::JobKind::Generation {
        return Err(ApiError::not_found(format!(
            "no generation job {}",
            image.job_id
        )));
    }
    let found = {
        let id = id.clone();
        state
            .jobs
            .store()
            .call(move |store| {
                if !visible(store, &id, &viewer)? {
                    return Ok(None);
                }
                let added = store.add_message(
                    &id,
                    &NewMessage {
                        role: ChatRole::Assistant,
                        content: &image.prompt,
                        image_job: Some(&image.job_id),
                        model: None,
                        finish: None,
                    },
                )?;
                match added {
                    Some(_) => store.conversation(&id),
                    None => Ok(None),
                }
            })
            .await
            .map_err(store_error("recording the image"))?
    };
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no conversation {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::ChatMessage;

    fn message(seq: u64, role: ChatRole, content: &str, image: Option<&str>) -> ChatMessage {
        ChatMessage {
            seq,
            role,
            content: content.into(),
            image_job: image.map(Into::into),
            model: None,
            finish: None,
            at: 0,
        }
    }

    #[test]
    fn a_conversation_reads_as_alternating_turns_with_its_images_described() {
        let conversation = Conversation {
            id: "c".into(),
            title: "t".into(),
            created_at: 0,
            updated_at: 0,
            messages: vec![
                message(1, ChatRole::User, "a red apple", None),
                message(2, ChatRole::Assistant, "a red apple", Some("job")),
                message(3, ChatRole::User, "write a poem about it", None),
            ],
        };
        let turns = turns(&conversation);
        let roles: Vec<Role> = turns.iter().map(|t| t.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert!(turns[2]
            .content
            .contains("I drew a picture of: a red apple"));
    }
}
