//! The generation WebSocket's client: sends the request, folds the stream's events into the view's state.

use futures_util::{SinkExt, StreamExt};
use gloo_net::websocket::futures::WebSocket;
use gloo_net::websocket::{Message, WebSocketError};
use leptos::prelude::*;

use super::progress::{GenState, Phase};
use crate::ui::api;
use crate::{GenerateRequest, JobEvent};

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
