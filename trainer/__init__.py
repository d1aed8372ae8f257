"""Trainer: rounds, aggregation, evaluation, signed ONNX releases."""
