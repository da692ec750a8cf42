//! The live streams. Generation: the client sends a `/generate/` request and receives the job's events
//! (status, steps with previews, the result or an error); closing the socket or sending
//! `{"type": "cancel"}` cancels the job. Training: the job's log is replayed, then live events follow until
//! the job ends; closing this socket does not touch the job.

use app::{
    ChatClientMessage, ChatEvent, ChatRequest, ClientMessage, ErrorCode, EventBody,
    GenerateRequest, JobEvent,
};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

use super::auth::Caller;
use super::chat::{answer, prepare};
use super::generate::{submit, CancelOnDrop};
use super::train::training_record;
use super::{job_id, ApiPath, AppState};
use crate::error::ApiError;
use crate::files::JobId;
use crate::jobs::capability::Control;
use crate::store::{now_ms, Viewer};

/// Generation stream: send a `GenerateRequest` as the first text message.
#[utoipa::path(get, path = "/ws/generate", tag = "streams", responses(
    (status = 101, description = "WebSocket: send a GenerateRequest, receive JobEvent messages (a refused request: one `error` JobEvent with seq 0)"),
))]
pub async fn generation(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    Ok(upgrade?
        .max_message_size(state.settings.json_limit)
        .on_upgrade(move |socket| generation_session(state, viewer, socket)))
}

/// Training stream of a `model_id`: replay, then live events until the job ends.
#[utoipa::path(get, path = "/ws/train/{model_id}", tag = "streams", responses(
    (status = 101, description = "WebSocket: receive JobEvent messages"),
    (status = 404, body = app::ErrorBody),
))]
pub async fn training(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    ApiPath(model_id): ApiPath<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Unknown ids (and other users' runs) are refused before the upgrade, with a plain 404.
    training_record(&state, &model_id, &viewer).await?;
    let id = job_id(&model_id)?;
    Ok(upgrade?.on_upgrade(move |socket| training_session(state, id, socket)))
}

/// Chat stream: send a `ChatRequest` as the first text message.
#[utoipa::path(get, path = "/ws/chat", tag = "streams", responses(
    (status = 101, description = "WebSocket: send a ChatRequest, receive ChatEvent messages (`start`, `token`s, then `done` or `error`); send `{\"type\": \"stop\"}` or close to stop the answer, which keeps what it wrote"),
))]
pub async fn chat(
    State(state): State<AppState>,
    Caller(viewer): Caller,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    Ok(upgrade?
        .max_message_size(state.settings.json_limit)
        .on_upgrade(move |socket| chat_session(state, viewer, socket)))
}

async fn send_json(socket: &mut WebSocket, value: &impl Serialize) -> bool {
    match serde_json::to_string(value) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(err) => {
            tracing::error!("serializing a stream message: {err}");
            false
        }
    }
}

/// A request refused before it became a job: the stream's one message, then the close.
async fn send_error_and_close(mut socket: WebSocket, error: ApiError) {
    let event = JobEvent::unlogged("", error.detail(), now_ms());
    if send_json(&mut socket, &event).await {
        close(socket).await;
    }
}

async fn close(mut socket: WebSocket) {
    let frame = CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "job ended".into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

fn ends_job(event: &JobEvent) -> bool {
    matches!(event.body, EventBody::Status { status } if status.is_finished())
}

async fn generation_session(state: AppState, viewer: Viewer, mut socket: WebSocket) {
    let request = loop {
        match socket.recv().await {
            Some(Ok(Message::Text(text))) => break serde_json::from_str::<GenerateRequest>(&text),
            Some(Ok(Message::Binary(_))) => {
                let error = ApiError::new(
                    ErrorCode::InvalidJson,
                    "send the request as a JSON text message",
                );
                return send_error_and_close(socket, error).await;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return,
        }
    };
    let request = match request {
        Ok(request) => request,
        Err(err) => {
            let code = if err.is_data() {
                ErrorCode::Validation
            } else {
                ErrorCode::InvalidJson
            };
            let error = ApiError::new(code, format!("the request is not a GenerateRequest: {err}"));
            return send_error_and_close(socket, error).await;
        }
    };
    let (id, mut listener) = match submit(&state, request, &viewer).await {
        Ok(submitted) => submitted,
        Err(error) => return send_error_and_close(socket, error).await,
    };
    let guard = CancelOnDrop::new(state.jobs.clone(), id);
    loop {
        tokio::select! {
            event = listener.recv() => match event {
                Ok(event) => {
                    if !send_json(&mut socket, &*event).await {
                        return; // The client is gone: the guard cancels.
                    }
                    if ends_job(&event) {
                        break;
                    }
                }
                // A slow client misses previews, never the end: the result and status come last.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => break,
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if serde_json::from_str::<ClientMessage>(&text).is_ok() {
                        // 409 means it finished meanwhile; the stream says how.
                        let _ = state.jobs.cancel(id).await;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    guard.disarm();
    close(socket).await;
}

async fn training_session(state: AppState, id: JobId, mut socket: WebSocket) {
    // Subscribe before reading the log: an event is then in the log, on the channel, or both, and the
    // sequence numbers drop the doubles.
    let listener = state.jobs.subscribe(id).await;
    let mut last = 0u64;
    if !replay(&state, id, &mut socket, &mut last).await {
        return;
    }
    let Some(mut listener) = listener else {
        // Not live: the log was the whole story.
        return close(socket).await;
    };
    loop {
        tokio::select! {
            event = listener.recv() => match event {
                Ok(event) if event.seq <= last => {}
                Ok(event) => {
                    if !send_json(&mut socket, &*event).await {
                        return;
                    }
                    last = event.seq;
                    if ends_job(&event) {
                        break;
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    if !replay(&state, id, &mut socket, &mut last).await {
                        return;
                    }
                }
                Err(RecvError::Closed) => {
                    // The job ended: anything sent after our last event is in the log.
                    if !replay(&state, id, &mut socket, &mut last).await {
                        return;
                    }
                    break;
                }
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    close(socket).await;
}

/// Sends the logged events after `last`, moving `last` on; false when the client is gone or the log
/// cannot be read (the client then gets an error event).
async fn replay(state: &AppState, id: JobId, socket: &mut WebSocket, last: &mut u64) -> bool {
    let after = *last;
    let events = state
        .jobs
        .store()
        .call(move |store| store.events_after(&id.to_string(), after))
        .await;
    let events = match events {
        Ok(events) => events,
        Err(err) => {
            let error = ApiError::internal("reading the job's log", format!("{err:#}"));
            let event = JobEvent::unlogged(id.to_string(), error.detail(), now_ms());
            let _ = send_json(socket, &event).await;
            return false;
        }
    };
    for event in events {
        if !send_json(socket, &event).await {
            return false;
        }
        *last = event.seq;
    }
    true
}

/// The first text message as a `T`, or the error to answer; `None` when the client left.
async fn first_request<T: serde::de::DeserializeOwned>(
    socket: &mut WebSocket,
    what: &str,
) -> Option<Result<T, ApiError>> {
    loop {
        match socket.recv().await {
            Some(Ok(Message::Text(text))) => {
                return Some(serde_json::from_str::<T>(&text).map_err(|err| {
                    let code = if err.is_data() {
                        ErrorCode::Validation
                    } else {
                        ErrorCode::InvalidJson
                    };
                    ApiError::new(code, format!("the request is not a {what}: {err}"))
                }))
            }
            Some(Ok(Message::Binary(_))) => {
                return Some(Err(ApiError::new(
                    ErrorCode::InvalidJson,
                    "send the request as a JSON text message",
                )))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
        }
    }
}

async fn chat_session(state: AppState, viewer: Viewer, mut socket: WebSocket) {
    let request = match first_request::<ChatRequest>(&mut socket, "ChatRequest").await {
        None => return,
        Some(Ok(request)) => request,
        Some(Err(error)) => {
            let _ = send_json(&mut socket, &ChatEvent::Error(error.detail())).await;
            return close(socket).await;
        }
    };
    let prepared = match prepare(&state, request, &viewer).await {
        Ok(prepared) => prepared,
        Err(error) => {
            let _ = send_json(&mut socket, &ChatEvent::Error(error.detail())).await;
            return close(socket).await;
        }
    };
    let start = ChatEvent::Start {
        conversation_id: prepared.conversation_id.clone(),
        model: prepared.chat.model(),
    };
    if !send_json(&mut socket, &start).await {
        return;
    }
    // The model's pieces come over a channel; a stop (or a gone client) sets the flag the model checks
    // after each piece.
    let stop = Arc::new(AtomicBool::new(false));
    let (pieces_tx, mut pieces) = tokio::sync::mpsc::unbounded_channel::<String>();
    let flag = Arc::clone(&stop);
    let on_text = move |piece: &str| {
        let _ = pieces_tx.send(piece.to_owned());
        if flag.load(Ordering::SeqCst) {
            Control::Cancel
        } else {
            Control::Continue
        }
    };
    let answering = {
        let state = state.clone();
        tokio::spawn(async move { answer(&state, prepared, on_text).await })
    };
    let mut client_gone = false;
    loop {
        tokio::select! {
            piece = pieces.recv() => match piece {
                Some(text) => {
                    if !client_gone && !send_json(&mut socket, &ChatEvent::Token { text }).await {
                        client_gone = true;
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                // The answer is over: every piece has been passed on.
                None => break,
            },
            message = socket.recv(), if !client_gone => match message {
                Some(Ok(Message::Text(text))) => {
                    if serde_json::from_str::<ChatClientMessage>(&text).is_ok() {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    client_gone = true;
                    stop.store(true, Ordering::SeqCst);
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let done = match answering.await {
        Ok(Ok(response)) => ChatEvent::Done(response),
        Ok(Err(error)) => ChatEvent::Error(error.detail()),
        Err(err) => ChatEvent::Error(ApiError::internal("the chat task", err).detail()),
    };
    if !client_gone && send_json(&mut socket, &done).await {
        close(socket).await;
    }
}
