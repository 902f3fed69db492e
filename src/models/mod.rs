//! Model families on ONNX Runtime.

pub mod classifier;
pub mod sd;
