//! The studio API's vocabulary: request, response and stream event types, shared by the server and the
//! browser UI. Only serde and schema derives live here, so the crate builds for wasm as well.

pub mod catalog;
pub mod classify;
pub mod error;
pub mod events;
pub mod generate;
pub mod jobs;
pub mod train;

pub use catalog::*;
pub use classify::*;
pub use error::*;
pub use events::*;
pub use generate::*;
pub use jobs::*;
pub use train::*;
