"""Binary (XNOR-Net style) conv and linear layers, shared by the binarize pass, the 1-bit
storage format and the XNOR-popcount runtime.

Weights: ``sign(W) * alpha`` with ``alpha`` = mean |W| per output channel. ``sign(0)`` is
+1 everywhere (``x >= 0``), never ``torch.sign``/ONNX ``Sign``, which give 0 at 0.

While training, ``weight`` holds the latent real-valued weights and the forward pass
binarizes them with a straight-through estimator (STE), so any optimiser that trains the
module trains the latent weights. :func:`freeze` then replaces them by the final
``±alpha`` values (``alpha`` rounded to fp16, the precision the packed format keeps), after
which the forward pass uses ``weight`` as it is and exports as a plain conv/linear.

Binary activations (optional): the layer's input becomes ``beta * sign(x - shift)``, with a
learnable per-input-channel ``shift`` (so inputs that follow a ReLU still carry
information) and ``beta`` = mean |x - shift| per sample. Convs zero-pad *before* taking the
sign, so every padded position is a real +1/-1 value and a 1-bit kernel computes the same
thing as the float graph.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BINARIZABLE = (nn.Conv2d, nn.Linear)


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0`` (zero included), -1 elsewhere; same dtype as ``x``."""
    return (x >= 0).to(x.dtype) * 2 - 1


def ste_sign(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """``sign_pm1(x)`` forward; gradient 1 inside ``(-clip, clip)``, 0 outside (clipped STE).

    Written with ``detach`` rather than an autograd.Function so TorchScript can compile it."""
    clipped = torch.clamp(x, -clip, clip)
    return clipped + (sign_pm1(x) - clipped).detach()


def channel_alpha(t: torch.Tensor) -> torch.Tensor:
    """Mean |t| over every axis but the first, kept broadcastable (TorchScript-compatible): a
    weight's per-output-channel scale alpha, or an activation's per-sample scale beta."""
    return t.abs().reshape(t.shape[0], -1).mean(1).reshape([-1] + [1] * (t.dim() - 1))


def binary_weight(weight: torch.Tensor) -> torch.Tensor:
    """``sign(W) * alpha`` with an STE through the sign (alpha is differentiated normally)."""
    return ste_sign(weight) * channel_alpha(weight)


def weight_from_bits(bits: torch.Tensor, alpha16: torch.Tensor) -> torch.Tensor:
    """The frozen weight: ``+alpha`` where a bit is set, ``-alpha`` elsewhere; ``bits`` has the
    weight's shape, ``alpha16`` one fp16 value per output channel. Freezing and loading both
    build weights here, which is what makes a reload bit-identical."""
    alpha = alpha16.to(torch.float32).reshape(-1, *([1] * (bits.dim() - 1)))
    return torch.where(bits, alpha, -alpha)


class BinaryMixin:
    """What the binary conv and linear share: flags, the weight used in forward, the input binarizer.

    (No ``from __future__ import annotations`` in this module: TorchScript compiles these methods.)"""

    def _init_binary(self, activations: bool, in_channels: int) -> None:
        self.binary_activations = activations
        self.frozen = False
        if activations:
            self.shift = nn.Parameter(torch.zeros(in_channels))
        else:
            self.register_parameter("shift", None)

    def effective_weight(self) -> torch.Tensor:
        if self.frozen:
            return self.weight
        return binary_weight(self.weight)

    def _binarize_input(self, x: torch.Tensor, shift: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """``beta * sign(padded - shift)``; beta from the unpadded ``x``."""
        beta = channel_alpha(x - shift)
        if self.training:
            return ste_sign(padded - shift) * beta
        return sign_pm1(padded - shift) * beta


class BinaryConv2d(BinaryMixin, nn.Conv2d):
    """nn.Conv2d with binary weights (and optionally binary inputs); see the module docstring."""

    def __init__(self, *args, activations: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_binary(activations, self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if self.shift is None:
            return self._conv_forward(x, weight, self.bias)
        ph, pw = self.padding  # zeros padding only (checked by the pass); pad before the sign
        padded = F.pad(x, [pw, pw, ph, ph]) if ph or pw else x
        xb = self._binarize_input(x, self.shift.reshape(1, -1, 1, 1), padded)
        return F.conv2d(xb, weight, self.bias, self.stride, 0, self.dilation, self.groups)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, activations: bool = False) -> "BinaryConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, activations=activations,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        _copy_params(conv, new)
        return new.to(conv.weight.device)   # the input shift is made on the CPU


class BinaryLinear(BinaryMixin, nn.Linear):
    """nn.Linear with binary weights (and optionally binary inputs); see the module docstring."""

    def __init__(self, *args, activations: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_binary(activations, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if self.shift is None:
            return F.linear(x, weight, self.bias)
        return F.linear(self._binarize_input(x, self.shift, x), weight, self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, activations: bool = False) -> "BinaryLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, activations=activations,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        _copy_params(linear, new)
        return new.to(linear.weight.device)


BINARY_LAYERS = (BinaryConv2d, BinaryLinear)


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)


def to_binary(layer: nn.Module, activations: bool = False) -> nn.Module:
    """The binary counterpart of an nn.Conv2d or nn.Linear, starting from its weights."""
    if isinstance(layer, nn.Conv2d):
        return BinaryConv2d.from_float(layer, activations)
    if isinstance(layer, nn.Linear):
        return BinaryLinear.from_float(layer, activations)
    raise TypeError(f"cannot binarize {type(layer).__name__}")


def frozen_alpha(weight: torch.Tensor) -> torch.Tensor:
    """The fp16 alpha per output channel that freezing ``weight`` (latent or frozen) keeps."""
    return channel_alpha(weight).reshape(-1).to(torch.float16)


@torch.no_grad()
def freeze(layer: BinaryMixin) -> None:
    """Replace the latent weights by ``±alpha`` (fp16 alpha) and stop training them.

    Re-freezing a frozen layer re-derives alpha from its values (useful after BatchNorm was
    folded into it, which rescales each channel)."""
    w = layer.weight
    frozen = weight_from_bits(w >= 0 if not layer.frozen else ~torch.signbit(w), frozen_alpha(w))
    layer.weight = nn.Parameter(frozen.to(w.dtype), requires_grad=False)
    layer.frozen = True
