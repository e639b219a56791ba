"""Built-in backends. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.backends import onnx, packed, torchscript

__all__ = ["onnx", "torchscript", "packed"]
