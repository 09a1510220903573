"""Llama 2 on ONNX Runtime: export, run, chat and publish variants."""

__version__ = "0.1.0"
