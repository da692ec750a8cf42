use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /classify/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClassifyRequest {
    pub prompt: String,
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
