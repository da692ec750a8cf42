use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /classify/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClassifyRequest {
    pub prompt: String,
    /// The turns before `prompt`, oldest first; the chat sends its last few (more than
    /// `MAX_CONTEXT_TURNS`, 64, are refused with 422). Optional: without it a message is judged on its
    /// own words, as the original contract did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<ContextTurn>,
}

/// Turns beyond this many in `ClassifyRequest::context` are refused: the classifier reads only the last
/// answer, and a chat needs to send only its last few turns.
pub const MAX_CONTEXT_TURNS: usize = 64;

/// One earlier turn of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ContextTurn {
    pub role: TurnRole,
    /// What was said, or the prompt an image was made from.
    #[serde(default)]
    pub text: String,
    pub kind: TurnKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TurnRole {
    User,
    Assistant,
}

/// Whether a turn was a picture or words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TurnKind {
    Image,
    Text,
}

/// What the conversation's last answer was, the part of the context the classifier reads: after an
/// image, "another one" or "same but at night" asks for a picture; after a text answer it asks for more
/// words. `None` when the assistant has not answered yet (or no context was sent).
pub fn last_answer(context: &[ContextTurn]) -> Option<TurnKind> {
    context
        .iter()
        .rev()
        .find(|turn| turn.role == TurnRole::Assistant)
        .map(|turn| turn.kind)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    ImageRequest,
    Conversation,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Scores {
    pub image_request: f32,
    pub conversation: f32,
}

/// `POST /classify/` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClassifyResponse {
    pub label: Label,
    /// The probability of the chosen label, so at least 0.5.
    pub confidence: f32,
    pub scores: Scores,
}

impl ClassifyResponse {
    /// The one place the answer is derived from the classifier's probability that the prompt asks for an image
    /// (the HTTP route and `studio classify` both answer with it).
    pub fn from_image_request_probability(p: f32) -> Self {
        let p = p.clamp(0.0, 1.0);
        // Ties go to conversation: a chat reply is cheaper to get wrong than a generation job.
        let label = if p > 0.5 {
            Label::ImageRequest
        } else {
            Label::Conversation
        };
        let confidence = if label == Label::ImageRequest {
            p
        } else {
            1.0 - p
        };
        ClassifyResponse {
            label,
            confidence,
            scores: Scores {
                image_request: p,
                conversation: 1.0 - p,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_follows_the_larger_score() {
        let r = ClassifyResponse::from_image_request_probability(0.8);
        assert_eq!(r.label, Label::ImageRequest);
        assert!((r.confidence - 0.8).abs() < 1e-6);
        let r = ClassifyResponse::from_image_request_probability(0.1);
        assert_eq!(r.label, Label::Conversation);
        assert!((r.confidence - 0.9).abs() < 1e-6);
        assert!((r.scores.conversation - 0.9).abs() < 1e-6);
        let r = ClassifyResponse::from_image_request_probability(0.5);
        assert_eq!(r.label, Label::Conversation);
    }

    #[test]
    fn the_last_answer_is_the_latest_assistant_turn() {
        let turn = |role, kind| ContextTurn {
            role,
            text: String::new(),
            kind,
        };
        assert_eq!(last_answer(&[]), None);
        assert_eq!(last_answer(&[turn(TurnRole::User, TurnKind::Text)]), None);
        let context = [
            turn(TurnRole::User, TurnKind::Text),
            turn(TurnRole::Assistant, TurnKind::Image),
            turn(TurnRole::User, TurnKind::Text),
            turn(TurnRole::Assistant, TurnKind::Text),
            turn(TurnRole::User, TurnKind::Text),
        ];
        assert_eq!(last_answer(&context), Some(TurnKind::Text));
        assert_eq!(last_answer(&context[..3]), Some(TurnKind::Image));
    }

    #[test]
    fn a_request_without_context_is_the_original_contract() {
        let request: ClassifyRequest = serde_json::from_str(r#"{"prompt": "red apple"}"#).unwrap();
        assert!(request.context.is_empty());
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({"prompt": "red apple"})
        );
        let request: ClassifyRequest = serde_json::from_str(
            r#"{"prompt": "another one", "context": [{"role": "assistant", "kind": "image"}]}"#,
        )
        .unwrap();
        assert_eq!(last_answer(&request.context), Some(TurnKind::Image));
    }

    #[test]
    fn serializes_as_the_contract_says() {
        let json =
            serde_json::to_value(ClassifyResponse::from_image_request_probability(0.25)).unwrap();
        assert_eq!(json["label"], "conversation");
        assert_eq!(json["confidence"], 0.75);
        assert_eq!(json["scores"]["image_request"], 0.25);
        assert_eq!(json["scores"]["conversation"], 0.75);
        assert_eq!(json.as_object().unwrap().len(), 3);
    }
}
