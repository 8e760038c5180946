"""ONNX and TensorRT export (the `rapc export` command)."""
