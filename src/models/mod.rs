//! Model families on ONNX Runtime.

pub mod sd;
