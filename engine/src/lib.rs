//! The studio's models on candle: FLUX text-to-image, its text encoders and autoencoder, LoRA,
//! training and the prompt classifier. Nothing here knows about HTTP.

pub mod builtin;
pub mod chat;
pub mod classifier;
pub mod device;
pub mod hub;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod lora;
pub mod memory;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod presets;
pub mod sampling;
pub mod training;
pub mod weights;
