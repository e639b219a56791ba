"""Built-in backends. Importing this package registers them (it is graphopt's own plugin)."""
from graphopt.backends import onnx, onnx_int8, torchscript, torchscript_int8

__all__ = ["onnx", "onnx_int8", "torchscript", "torchscript_int8"]
