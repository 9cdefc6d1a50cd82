"""Convolutions that stay fast on feature maps of a few pixels (CPU training of CIFAR-sized inputs).

With 32x32 inputs, torchvision's ResNets and MobileNetV2 (default stems) run their last stages at 2x2 and 1x1.
There the CPU backward of a convolution (oneDNN in torch 2.14) is pathological: 76 ms for a 512-channel 3x3
convolution on a 1x1 map whose forward takes 3 ms, 10-40 ms for a depthwise one of a million multiply-adds.
Measured by bench/ (training section, "patched" column): whole training steps 2x (MobileNetV2, ResNet50) to
2.5x (ResNet18) faster on a 2-core AMD EPYC; outputs equal to the regular convolution up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SmallMapConv2d", "use_small_map_convs"]


def _conv_taps(conv: torch.nn.Conv2d, height: int, width: int) -> tuple[list[tuple[int, int, int]], int, int]:
    """(output pixel, input pixel, kernel tap) triples of ``conv`` on a height x width map, and the output size."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = []
    for oy in range(out_h):
        for ox in range(out_w):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * sh - ph + ky * dh, ox * sw - pw + kx * dw
                    if 0 <= iy < height and 0 <= ix < width:
                        taps.append((oy * out_w + ox, iy * width + ix, ky * kw + kx))
    return taps, out_h, out_w


def _as_input_layout(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in the memory format of ``x`` (so the next layer gets the layout it was built for)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


class SmallMapConv2d(torch.nn.Conv2d):
    """A ``Conv2d`` (same parameters, same state-dict keys) that is fast on feature maps of a few pixels.

    On 32x32 CIFAR images, torchvision's ResNets and MobileNetV2 (default stems) run their last stages at 2x2 and
    1x1. There the CPU backward of a convolution (oneDNN, torch 2.14) is pathological: 76 ms for a 512-channel
    3x3 convolution on a 1x1 map whose forward takes 3 ms, 10-40 ms for a depthwise one of about a million
    multiply-adds, together most of a training step. On a map of at most ``max_pixels`` pixels a convolution is a
    small linear map from input pixels to output pixels, computed here without the convolution kernels:

    * dense (groups = 1): one matrix multiply, ``[B, pixels_in * C_in] @ [pixels_in * C_in, pixels_out * C_out]``,
      the second matrix gathered from the kernel taps (on 1x1 maps, just the centre tap);
    * depthwise (groups = channels): a broadcast multiply-add per (output pixel, input pixel) pair.

    Both backward passes are matrix multiplies, elementwise work and reductions. Larger maps, other groupings,
    non-zero padding modes and tensors off the CPU use the regular convolution.
    """

    max_pixels = 4

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d) -> SmallMapConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        depthwise = self.groups == self.in_channels == self.out_channels
        pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and height * width > 1
        if (x.device.type != "cpu" or height * width > self.max_pixels or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or x.dim() != 4 or not (depthwise or self.groups == 1) or pointwise):
            # GPUs' convolution libraries handle small maps well; a stride-1 1x1 convolution is already one matrix
            # multiply per pixel: nothing to gain in either case.
            return super().forward(x)
        taps, out_h, out_w = _conv_taps(self, height, width)
        y = self._depthwise(x, taps, out_h, out_w) if depthwise else self._dense(x, taps, out_h, out_w)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return _as_input_layout(y, x)

    def _dense(self, x: Tensor, taps: list[tuple[int, int, int]], out_h: int, out_w: int) -> Tensor:
        batch, c_in, height, width = x.shape
        pixels_in, pixels_out = height * width, out_h * out_w
        kernel = self.weight.reshape(self.out_channels, c_in, -1)  # [C_out, C_in, taps]
        # Input as [B, pixels_in, C_in] (a view for channels_last input).
        flat = x.permute(0, 2, 3, 1).reshape(batch, pixels_in, c_in)
        if self.kernel_size == (1, 1):
            # One tap per output pixel: pick the input pixel each output reads, then one matrix multiply.
            source = [0] * pixels_out
            for o, i, _ in taps:
                source[o] = i
            picked = flat if source == list(range(pixels_in)) else flat[:, source, :]
            y = picked @ kernel[:, :, 0].t()  # [B, pixels_out, C_out]
        else:
            # Big weight [pixels_in * C_in, pixels_out * C_out] from the taps; pairs without a tap stay zero.
            zero = kernel.new_zeros(self.out_channels, c_in)
            by_pair = {(o, i): t for o, i, t in taps}
            rows = [torch.cat([kernel[:, :, by_pair[(o, i)]] if (o, i) in by_pair else zero
                               for i in range(pixels_in)], dim=1) for o in range(pixels_out)]
            weight = torch.cat(rows, dim=0)  # [pixels_out * C_out, pixels_in * C_in]
            y = flat.reshape(batch, pixels_in * c_in) @ weight.t()
        return y.reshape(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)

    def _depthwise(self, x: Tensor, taps: list[tuple[int, int, int]], out_h: int, out_w: int) -> Tensor:
        batch, channels, height, width = x.shape
        pixels = x.reshape(batch, channels, height * width)  # with channels_last input the pixel stride is C
        kernel = self.weight.reshape(channels, -1)
        outputs: list[Tensor | None] = [None] * (out_h * out_w)
        for out_index, in_index, tap in taps:
            term = pixels[:, :, in_index] * kernel[:, tap]
            outputs[out_index] = term if outputs[out_index] is None else outputs[out_index] + term
        zero = x.new_zeros(batch, channels)
        y = torch.stack([o if o is not None else zero for o in outputs], dim=2)  # [B, C, pixels_out]
        return y.reshape(batch, channels, out_h, out_w)


def use_small_map_convs(model: torch.nn.Module) -> int:
    """Swap every plain ``Conv2d`` of ``model`` for :class:`SmallMapConv2d` in place; returns how many.

    Parameters are shared, not copied, and the state dict keeps its keys, so weights load, average and travel
    exactly as before. Layers whose maps are larger than ``max_pixels`` run the regular convolution as before.
    """
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Conv2d:
                setattr(module, child_name, SmallMapConv2d.from_conv(child))
                swapped += 1
    return swapped
