"""Built-in backends. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.backends import onnx, torchscript

__all__ = ["onnx", "torchscript"]
