//! The classifier's answer, shaped exactly like the contract's `/classify/` response body.

use serde::{Deserialize, Serialize};

/// Where the chat UI routes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// Goes to image generation.
    ImageRequest,
    /// Anything else: small talk, questions, replies.
    Conversation,
}

/// Both class probabilities; they sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub image_request: f32,
    pub conversation: f32,
}

/// `{"label", "confidence", "scores": {"image_request", "conversation"}}` as in the API contract.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    pub label: Label,
    /// The probability of `label`, so always at least 0.5.
    pub confidence: f32,
    pub scores: Scores,
}

impl Classification {
    /// Builds the answer from the calibrated probability that the prompt is an image request.
    pub fn from_image_probability(p: f32) -> Self {
        let p = p.clamp(0.0, 1.0);
        let scores = Scores {
            image_request: p,
            conversation: 1.0 - p,
        };
        // Ties go to conversation: a chat reply is cheaper to get wrong than a generation job.
        let (label, confidence) = if p > 0.5 {
            (Label::ImageRequest, p)
        } else {
            (Label::Conversation, 1.0 - p)
        };
        Self {
            label,
            confidence,
            scores,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_the_contract_says() {
        let json = serde_json::to_value(Classification::from_image_probability(0.25)).unwrap();
        assert_eq!(json["label"], "conversation");
        assert_eq!(json["confidence"], 0.75);
        assert_eq!(json["scores"]["image_request"], 0.25);
        assert_eq!(json["scores"]["conversation"], 0.75);
        assert_eq!(json.as_object().unwrap().len(), 3);
    }

    #[test]
    fn label_follows_the_larger_score() {
        let c = Classification::from_image_probability(0.9);
        assert_eq!(c.label, Label::ImageRequest);
        assert!((c.confidence - 0.9).abs() < 1e-6);
        assert_eq!(
            Classification::from_image_probability(0.5).label,
            Label::Conversation
        );
    }
}
