//! The two classes. The label and confidence answered to clients are derived from the image
//! probability in one place, `app::ClassifyResponse::from_image_request_probability`.

use serde::{Deserialize, Serialize};

/// Where the chat UI routes a message; also the ground truth of the data set's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// Goes to image generation.
    ImageRequest,
    /// Anything else: small talk, questions, replies.
    Conversation,
}
