"""SmallMapConv2d: the same function as nn.Conv2d (values, gradients, memory format), fast on tiny maps."""

import pytest
import torch


@pytest.mark.parametrize(
    "c_in, c_out, kernel, stride, size, groups",
    [(16, 24, 3, 1, 1, 1), (16, 24, 3, 1, 2, 1), (16, 24, 3, 2, 2, 1), (16, 24, 1, 2, 2, 1), (16, 24, 1, 1, 1, 1),
     (16, 16, 3, 1, 2, 16), (16, 16, 3, 2, 2, 16), (16, 16, 3, 1, 1, 16), (16, 24, 3, 1, 4, 1), (8, 8, 1, 1, 2, 1)],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_conv_matches_conv2d_in_values_gradients_and_layout(c_in, c_out, kernel, stride, size, groups,
                                                                      channels_last):
    from ecavg.models.small_map import SmallMapConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=True)
    fast = SmallMapConv2d.from_conv(conv)
    x = torch.randn(5, c_in, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    expected, got = conv(x), fast(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad)
    got_grads = torch.autograd.grad(got, (x, fast.weight, fast.bias), grad)
    for e, g in zip(expected_grads, got_grads):
        assert torch.allclose(g, e, atol=1e-4)


def test_build_model_uses_small_map_convs_with_unchanged_state_dict():
    from ecavg.models import build_model
    from ecavg.models.small_map import SmallMapConv2d, use_small_map_convs

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32).eval()
    assert sum(isinstance(m, SmallMapConv2d) for m in model.modules()) == 20  # build_model swaps them in
    plain = build_model("resnet18", num_classes=10, in_channels=3, image_size=32).eval()
    for module in list(plain.modules()):  # back to regular convolutions, same parameters
        for child_name, child in list(module.named_children()):
            if isinstance(child, SmallMapConv2d):
                regular = torch.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                          stride=child.stride, padding=child.padding, groups=child.groups,
                                          bias=child.bias is not None)
                regular.weight, regular.bias = child.weight, child.bias
                setattr(module, child_name, regular)
    plain.load_state_dict(model.state_dict())
    assert list(plain.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-4)
    assert use_small_map_convs(plain) == 20
