"""The ONNX opsets ``d2v export --onnx`` accepts, apart from the exporter so that the command
line can name them without importing torch or onnx."""

#: the opsets PyTorch's TorchScript exporter writes that have every op our encoders need
MIN_OPSET, MAX_OPSET = 17, 20
DEFAULT_OPSET = 17
