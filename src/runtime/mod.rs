//! ONNX Runtime: library discovery, environment, execution providers, sessions, model directories.
