//! Model families on ONNX Runtime.
