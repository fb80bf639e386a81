"""vibevoice-trt exporter: VibeVoice checkpoints -> validated ONNX graphs (+ TensorRT engines)."""

__version__ = "0.1.0"
