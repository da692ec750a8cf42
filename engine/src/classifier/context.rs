//! What the classifier reads of the conversation: the kind of the last answer (`app::last_answer`),
//! as two 0/1 features beside the prompt's embedding. A follow-up such as "another one" asks for a
//! picture after an image and for more words after a text answer; the words alone cannot say which.

use anyhow::Result;
use app::TurnKind;
use candle_core::{Device, Tensor};

/// Features the head reads beside the embedding: [after an image, after a text answer]; both 0 when
/// there is no answer yet (or no context was sent).
pub const CONTEXT_FEATURES: usize = 2;

pub fn context_features(last_answer: Option<TurnKind>) -> [f32; CONTEXT_FEATURES] {
    match last_answer {
        None => [0.0, 0.0],
        Some(TurnKind::Image) => [1.0, 0.0],
        Some(TurnKind::Text) => [0.0, 1.0],
    }
}

/// `[n, CONTEXT_FEATURES]` for `n` prompts' last answers.
pub fn context_tensor(last_answers: &[Option<TurnKind>], device: &Device) -> Result<Tensor> {
    let rows: Vec<f32> = last_answers
        .iter()
        .flat_map(|&a| context_features(a))
        .collect();
    Ok(Tensor::from_vec(
        rows,
        (last_answers.len(), CONTEXT_FEATURES),
        device,
    )?)
}
