//! FLUX.1 transformer: config, checkpoint layouts, model.

mod config;
pub mod layout;
mod model;
mod weights;

pub use config::FluxConfig;
pub use model::{
    image_ids, rope_tables, text_ids, timestep_embedding, FirstBlock, FluxInputs, FluxTransformer,
};
/// The blocks, for training's hand-written backward passes (`training::flux_backward`).
pub(crate) use model::{DoubleBlock, SingleBlock, Stream};
pub use weights::{FluxWeights, Layout};
