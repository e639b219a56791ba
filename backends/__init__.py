"""Built-in backends. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.backends import binary, onnx, onnx_int8, packed, torchscript, torchscript_int8, xnor_cpu

__all__ = ["binary", "onnx", "onnx_int8", "packed", "torchscript", "torchscript_int8", "xnor_cpu"]
