//! The studio API's vocabulary: request, response and stream event types, shared by the server and the
//! browser UI. Without features only serde and schema derives live here; the features `ssr` (server) and
//! `hydrate` (browser) add the Leptos UI in `ui` (docs/ui.md).

// The UI's page views are deeply nested generic types; laying them out needs more than the default 128.
#![cfg_attr(feature = "ui", recursion_limit = "256")]

pub mod catalog;
pub mod chat;
pub mod classify;
pub mod dataset;
pub mod error;
pub mod events;
pub mod generate;
pub mod jobs;
pub mod prompt;
pub mod recipe;
pub mod train;
#[cfg(feature = "ui")]
pub mod ui;

pub use catalog::*;
pub use chat::*;
pub use classify::*;
pub use dataset::{CheckedImage, DatasetCheck, SkippedFile, IMAGE_EXTENSIONS};
pub use error::*;
pub use events::*;
pub use generate::*;
pub use jobs::*;
pub use prompt::{PromptHelpRequest, PromptHelpResponse};
pub use recipe::*;
pub use train::*;
