//! Stable Diffusion: torch-equal noise and diffusers-equal schedulers.

pub mod noise;
pub mod pipeline;
pub mod schedulers;
