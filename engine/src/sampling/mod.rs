//! Sampling: the schedule, seeded noise and latent packing, the progress preview, the step cache,
//! what editing an image adds.

pub mod edit;
pub mod latents;
pub mod preview;
pub mod schedule;
pub mod step_cache;
