//! The WebSockets' clients: a generation's events folded into its view's state, and the language
//! model's answer streamed into the chat.

use futures_util::{SinkExt, StreamExt};
use gloo_net::websocket::futures::WebSocket;
use gloo_net::websocket::{Message, WebSocketError};
use leptos::prelude::*;

use super::progress::{GenState, Phase};
use crate::ui::api;
use crate::{ChatClientMessage, ChatEvent, ChatFinish, ChatRequest, GenerateRequest, JobEvent};

/// Runs one generation over the WebSocket, folding its events into `state`. The socket stays open until the
/// job ends; the server cancels the job if it closes early.
pub(super) async fn stream_generation(request: GenerateRequest, state: RwSignal<GenState>) {
    let fail = |message: String| {
        state.update(|s| {
            s.phase = Phase::Failed;
            s.error = Some(message);
        })
    };
    let mut socket = match WebSocket::open(&api::ws_url("/ws/generate")) {
        Ok(socket) => socket,
        Err(e) => return fail(format!("could not open the generation stream: {e}")),
    };
    let text = serde_json::to_string(&request).expect("a request serializes");
    if let Err(e) = socket.send(Message::Text(text)).await {
        return fail(format!("could not send the request: {e}"));
    }
    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Text(text)) => {
                if let Ok(event) = serde_json::from_str::<JobEvent>(&text) {
                    state.update(|s| s.apply(event));
                }
            }
            Ok(Message::Bytes(_)) => {}
            Err(WebSocketError::ConnectionClose(_)) => break,
            Err(e) => return fail(format!("the generation stream failed: {e}")),
        }
    }
    if !state.get_untracked().phase.is_over() {
        fail("the connection to the studio closed before the image was finished".into());
    }
}

/// What the chat's answer view shows: the text so far, and how it ended.
#[derive(Clone, Copy)]
pub(super) struct AnswerState {
    pub(super) text: RwSignal<String>,
    /// `None` while it is being written.
    pub(super) end: RwSignal<Option<Result<ChatFinish, String>>>,
    /// Set by the stop button; the stream sends the stop at its next message.
    pub(super) stop: RwSignal<bool>,
    /// The studio's docs the answer is based on.
    pub(super) sources: RwSignal<Vec<String>>,
}

/// Streams the language model's answer to `request` over `/ws/chat` into `answer`; returns the
/// conversation it belongs to, so the next message continues it.
pub(super) async fn stream_chat(request: ChatRequest, answer: AnswerState) -> Option<String> {
    let fail = |message: String| answer.end.set(Some(Err(message)));
    let socket = match WebSocket::open(&api::ws_url("/ws/chat")) {
        Ok(socket) => socket,
        Err(e) => {
            fail(format!("could not open the chat stream: {e}"));
            return None;
        }
    };
    let (mut sink, mut stream) = socket.split();
    let text = serde_json::to_string(&request).expect("a request serializes");
    if let Err(e) = sink.send(Message::Text(text)).await {
        fail(format!("could not send the message: {e}"));
        return None;
    }
    let mut conversation = None;
    let mut stop_sent = false;
    while let Some(message) = stream.next().await {
        if answer.stop.get_untracked() && !stop_sent {
            stop_sent = true;
            let stop = serde_json::to_string(&ChatClientMessage::Stop).expect("serializes");
            let _ = sink.send(Message::Text(stop)).await;
        }
        match message {
            Ok(Message::Text(text)) => match serde_json::from_str::<ChatEvent>(&text) {
                Ok(ChatEvent::Start {
                    conversation_id, ..
                }) => conversation = Some(conversation_id),
                Ok(ChatEvent::Token { text }) => answer.text.update(|t| t.push_str(&text)),
                Ok(ChatEvent::Done(done)) => {
                    answer.text.set(done.answer);
                    answer.sources.set(done.sources);
                    answer.end.set(Some(Ok(done.finish)));
                }
                Ok(ChatEvent::Error(error)) => fail(error.message),
                Err(_) => {}
            },
            Ok(Message::Bytes(_)) => {}
            Err(WebSocketError::ConnectionClose(_)) => break,
            Err(e) => {
                fail(format!("the chat stream failed: {e}"));
                break;
            }
        }
    }
    if answer.end.get_untracked().is_none() {
        fail("the connection to the studio closed before the answer was finished".into());
    }
    conversation
}
