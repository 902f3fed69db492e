//! Model families on ONNX Runtime.

pub mod blip2;
pub mod classifier;
pub mod decoding;
pub mod preprocess;
pub mod sd;
pub mod vit_gpt2;
