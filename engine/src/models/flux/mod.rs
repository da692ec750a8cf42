//! FLUX.1 transformer: config, checkpoint layouts, model.

mod backward;
mod config;
pub mod layout;
mod model;
mod weights;

pub use config::FluxConfig;
pub use model::{
    image_ids, rope_tables, text_ids, timestep_embedding, FluxInputs, FluxTransformer,
};
pub use weights::{FluxWeights, Layout};
