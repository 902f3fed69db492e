"""cip's export tool: Hugging Face / torchvision checkpoints -> cip model directories (ONNX)."""

EXPORTER_VERSION = "cip-export 1"
