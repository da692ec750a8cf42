//! Sampling: the schedule, seeded noise and latent packing, the progress preview.

pub mod latents;
pub mod preview;
pub mod schedule;
