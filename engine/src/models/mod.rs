//! Model code: each module one model family, loading its checkpoints' own tensor names.

pub mod autoencoder;
pub mod codec;
pub mod flux;
pub mod linear;
pub mod minilm;
pub mod t5;
pub mod text;
