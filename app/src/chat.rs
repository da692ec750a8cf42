//! The chat's conversation side: `POST /chat/`, the `/ws/chat` stream, and the stored conversations.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ErrorDetail;

/// Longest message accepted, in characters.
pub const MAX_CHAT_MESSAGE_CHARS: usize = 8000;

/// `POST /chat/`, and the first message on `/ws/chat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The user's message.
    pub message: String,
    /// The conversation to continue; a new one is started when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// New tokens at most (capped by the server's `--chat-max-tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// 0 answers greedily; 0.7 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Sampling seed; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl ChatRequest {
    pub fn new(message: impl Into<String>) -> ChatRequest {
        ChatRequest {
            message: message.into(),
            conversation_id: None,
            max_tokens: None,
            temperature: None,
            seed: None,
        }
    }

    /// Checks what can be checked without the server's state.
    pub fn validate(&self) -> Result<(), String> {
        if self.message.trim().is_empty() {
            return Err("message must not be empty".into());
        }
        if self.message.chars().count() > MAX_CHAT_MESSAGE_CHARS {
            return Err(format!(
                "message is longer than {MAX_CHAT_MESSAGE_CHARS} characters"
            ));
        }
        if self.max_tokens == Some(0) {
            return Err("max_tokens must be at least 1".into());
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err("temperature must be between 0 and 2".into());
            }
        }
        Ok(())
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatFinish {
    /// The model ended its turn.
    Stop,
    /// The token budget was spent.
    Length,
    /// Stopped by the client.
    Cancelled,
}

/// `POST /chat/` answer, and the `done` message of `/ws/chat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatResponse {
    pub conversation_id: String,
    /// The answer.
    pub answer: String,
    /// The language model that wrote it.
    pub model: String,
    pub finish: ChatFinish,
    /// Tokens of the answer.
    pub tokens: u32,
    /// The sections of the studio's own docs the model was given for this answer
    /// (`docs/training.md § LoRA training`): what the answer is based on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatRole {
    User,
    Assistant,
}

/// One message of a stored conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// 1-based, in the order said.
    pub seq: u64,
    pub role: ChatRole,
    /// The text; for an image, the prompt it was drawn from.
    pub content: String,
    /// A generation job whose image this message is (`GET /images/{job_id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_job: Option<String>,
    /// The model that wrote an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<ChatFinish>,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
}

/// A stored conversation in `GET /chat/conversations/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConversationSummary {
    pub id: String,
    /// The start of its first message.
    pub title: String,
    pub messages: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// `GET /chat/conversations/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Conversation {
    pub id: String,
    pub title: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub messages: Vec<ChatMessage>,
}

/// `POST /chat/conversations`: a conversation started without an answer (the chat's first turn drew an
/// image), to record its images in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConversation {
    /// Its title in the list (the first request, say); cut to the length titles have.
    pub title: String,
}

/// `POST /chat/conversations/{id}/images`: an image made in the conversation (the chat sends its
/// image requests to `/ws/generate` and records the result here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatImage {
    /// The generation job that drew it (its id in `/ws/generate`'s events).
    pub job_id: String,
    /// The prompt it was drawn from.
    pub prompt: String,
}

/// What the client sends on `/ws/chat` after its request: stop the answer where it is (the part
/// written so far is kept). Closing the socket stops it too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatClientMessage {
    Stop,
}

/// The messages of `/ws/chat`: `start`, then `token`s as they are decoded, then `done` (or `error`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatEvent {
    Start {
        conversation_id: String,
        model: String,
    },
    /// The next piece of the answer's text.
    Token {
        text: String,
    },
    Done(ChatResponse),
    Error(ErrorDetail),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_by_type() {
        let token = serde_json::to_value(ChatEvent::Token { text: "Hi".into() }).unwrap();
        assert_eq!(token, serde_json::json!({"type": "token", "text": "Hi"}));
        let stop: ChatClientMessage = serde_json::from_str(r#"{"type":"stop"}"#).unwrap();
        assert_eq!(stop, ChatClientMessage::Stop);
    }

    #[test]
    fn empty_long_and_out_of_range_requests_are_refused() {
        assert!(ChatRequest::new("hello").validate().is_ok());
        assert!(ChatRequest::new("  ").validate().is_err());
        assert!(ChatRequest::new("x".repeat(MAX_CHAT_MESSAGE_CHARS + 1))
            .validate()
            .is_err());
        let hot = ChatRequest {
            temperature: Some(3.0),
            ..ChatRequest::new("hi")
        };
        assert!(hot.validate().is_err());
    }
}
