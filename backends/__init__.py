"""Built-in backends. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.backends import binary, onnx, packed, torchscript, xnor_cpu

__all__ = ["binary", "onnx", "packed", "torchscript", "xnor_cpu"]
