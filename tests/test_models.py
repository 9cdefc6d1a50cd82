"""Tests for ecavg.models: building every registered model, options, heads, and loading pretrained weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ecavg.config.checks import int_at_least
from ecavg.models import (
    MODEL_NAME_ATTRIBUTE,
    MODELS,
    ModelError,
    ModelSpec,
    available_models,
    batchnorm_keys,
    build_model,
    classifier_head,
    head_keys,
    load_pretrained,
    uses_channels_last,
)
from ecavg.registry import Key

MNIST_SHAPE = (1, 28, 28)
CIFAR_SHAPE = (3, 32, 32)


def _build(name: str, shape: tuple[int, int, int], num_classes: int = 10, **options) -> nn.Module:
    return build_model(name, num_classes=num_classes, in_channels=shape[0], image_size=shape[1], options=options)


def _forward(model: nn.Module, shape: tuple[int, int, int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, *shape))


@pytest.mark.parametrize("shape", [MNIST_SHAPE, CIFAR_SHAPE], ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "mobilenet_v2", "resnet18"])
def test_registered_model_forward(name: str, shape: tuple[int, int, int]) -> None:
    model = _build(name, shape)
    assert _forward(model, shape).shape == (2, 10)


def test_resnet50_forward_on_mnist_shape() -> None:
    # One forward only: resnet50 is the slowest to build and run.
    model = _build("resnet50", MNIST_SHAPE)
    assert _forward(model, MNIST_SHAPE).shape == (2, 10)
    assert model.conv1.in_channels == 1


def test_training_step_runs_with_batchnorm() -> None:
    model = _build("cnn", CIFAR_SHAPE)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, *CIFAR_SHAPE)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.classifier.weight.grad is not None


def test_mlp_structure_and_options() -> None:
    model = _build("mlp", MNIST_SHAPE)
    assert model.hidden.in_features == 28 * 28
    assert model.hidden.out_features == 200
    assert model.classifier.out_features == 10
    wide = _build("mlp", CIFAR_SHAPE, hidden=64, dropout=0.5)
    assert wide.hidden.in_features == 3 * 32 * 32
    assert wide.hidden.out_features == 64
    assert isinstance(wide.dropout, nn.Dropout) and wide.dropout.p == 0.5
    assert not uses_channels_last(model)


def test_cnn_width_option() -> None:
    model = _build("cnn", MNIST_SHAPE, width=8)
    assert model.features[0][0].out_channels == 8
    assert model.classifier.in_features == 32
    assert uses_channels_last(model)


def test_first_conv_takes_one_channel_for_mnist() -> None:
    resnet = _build("resnet18", MNIST_SHAPE)
    assert resnet.conv1.in_channels == 1
    mobilenet = _build("mobilenet_v2", MNIST_SHAPE)
    assert mobilenet.features[0][0].in_channels == 1


def test_resnet_cifar_stem() -> None:
    default = _build("resnet18", CIFAR_SHAPE)
    assert default.conv1.stride == (2, 2) and default.conv1.kernel_size == (7, 7)
    assert isinstance(default.maxpool, nn.MaxPool2d)

    model = _build("resnet18", MNIST_SHAPE, cifar_stem=True)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert _forward(model, MNIST_SHAPE).shape == (2, 10)


def test_mobilenet_v2_cifar_stem_and_options() -> None:
    default = _build("mobilenet_v2", CIFAR_SHAPE)
    assert default.features[0][0].stride == (2, 2)

    model = _build("mobilenet_v2", CIFAR_SHAPE, cifar_stem=True, width_mult=0.5, dropout=0.1)
    assert model.features[0][0].stride == (1, 1)
    assert model.features[0][0].in_channels == 3
    assert model.classifier[0].p == 0.1
    assert model.features[0][0].out_channels < default.features[0][0].out_channels
    assert _forward(model, CIFAR_SHAPE).shape == (2, 10)


def test_generic_torchvision_model_by_name() -> None:
    model = _build("shufflenet_v2_x0_5", MNIST_SHAPE)
    assert model.conv1[0].in_channels == 1
    assert _forward(model, MNIST_SHAPE).shape == (2, 10)
    assert uses_channels_last(model)


def test_generic_torchvision_options_are_passed() -> None:
    model = _build("mobilenet_v3_small", CIFAR_SHAPE, dropout=0.3)
    assert model.classifier[2].p == 0.3
    with pytest.raises(ModelError, match="bogus"):
        _build("shufflenet_v2_x0_5", CIFAR_SHAPE, bogus=1)
    with pytest.raises(ModelError, match="weights"):
        _build("shufflenet_v2_x0_5", CIFAR_SHAPE, weights="DEFAULT")


def test_unknown_model_name_lists_available() -> None:
    with pytest.raises(ModelError) as excinfo:
        _build("resnet_18", CIFAR_SHAPE)
    message = str(excinfo.value)
    assert "resnet_18" in message
    for name in ("mlp", "cnn", "mobilenet_v2", "resnet18", "resnet50"):
        assert name in message
    assert "torchvision" in message
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    ("name", "bad_key", "allowed"),
    [("mlp", "width", "hidden"), ("cnn", "hidden", "width"), ("resnet18", "width_mult", "cifar_stem"),
     ("mobilenet_v2", "depth", "width_mult")],
)
def test_unknown_option_names_key_and_allowed(name: str, bad_key: str, allowed: str) -> None:
    with pytest.raises(ModelError, match=bad_key) as excinfo:
        _build(name, CIFAR_SHAPE, **{bad_key: 1})
    assert allowed in str(excinfo.value)


def test_invalid_option_values() -> None:
    with pytest.raises(ModelError, match="hidden"):
        _build("mlp", MNIST_SHAPE, hidden=0)
    with pytest.raises(ModelError, match="cifar_stem"):
        _build("resnet18", CIFAR_SHAPE, cifar_stem="yes")
    with pytest.raises(ModelError, match="num_classes"):
        build_model("mlp", num_classes=0, in_channels=1, image_size=28)


def test_available_models() -> None:
    names = available_models()
    assert names[:5] == ["mlp", "cnn", "mobilenet_v2", "resnet18", "resnet50"]
    assert "torchvision" in names[-1]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> None:
    for key in keys:
        assert torch.equal(a[key], b[key]), key


def test_load_pretrained_safetensors_round_trip(tmp_path) -> None:
    source = _build("cnn", CIFAR_SHAPE, width=8)
    # Non-default BatchNorm statistics so the round trip checks buffers too.
    source.train()
    source(torch.randn(4, *CIFAR_SHAPE))
    path = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    target = _build("cnn", CIFAR_SHAPE, width=8)
    assert load_pretrained(target, path) == []
    _assert_same_tensors(target.state_dict(), source.state_dict(), source.state_dict())


@pytest.mark.parametrize("wrapping", ["raw", "state_dict", "model", "module_prefix"])
def test_load_pretrained_torch_file_round_trip(tmp_path, wrapping: str) -> None:
    source = _build("mlp", MNIST_SHAPE, hidden=16)
    state = source.state_dict()
    if wrapping == "state_dict":
        payload = {"state_dict": state, "epoch": 3}
    elif wrapping == "model":
        payload = {"model": state}
    elif wrapping == "module_prefix":
        payload = {f"module.{k}": v for k, v in state.items()}
    else:
        payload = state
    path = tmp_path / "mlp.pt"
    torch.save(payload, path)

    target = _build("mlp", MNIST_SHAPE, hidden=16)
    assert load_pretrained(target, str(path)) == []
    _assert_same_tensors(target.state_dict(), state, state)


def test_load_pretrained_replaces_head_when_classes_differ(tmp_path) -> None:
    source = _build("resnet18", CIFAR_SHAPE, num_classes=100, cifar_stem=True)
    path = tmp_path / "resnet18_c100.pt"
    torch.save(source.state_dict(), path)

    target = _build("resnet18", CIFAR_SHAPE, num_classes=10, cifar_stem=True)
    fresh_head = target.fc.weight.detach().clone()
    skipped = load_pretrained(target, path)
    assert sorted(skipped) == ["fc.bias", "fc.weight"]
    assert torch.equal(target.fc.weight, fresh_head)
    body_keys = [k for k in source.state_dict() if not k.startswith("fc.")]
    _assert_same_tensors(target.state_dict(), source.state_dict(), body_keys)


def test_load_pretrained_mobilenet_head_replaced(tmp_path) -> None:
    source = _build("mobilenet_v2", CIFAR_SHAPE, num_classes=100, width_mult=0.35)
    path = tmp_path / "mobilenet.safetensors"
    save_file(source.state_dict(), str(path))
    target = _build("mobilenet_v2", CIFAR_SHAPE, num_classes=10, width_mult=0.35)
    assert sorted(load_pretrained(target, path)) == ["classifier.1.bias", "classifier.1.weight"]
    _assert_same_tensors(target.state_dict(), source.state_dict(), ["features.0.0.weight", "features.18.1.running_var"])


def test_load_pretrained_mismatched_body_raises(tmp_path) -> None:
    source = _build("cnn", CIFAR_SHAPE, width=8)
    path = tmp_path / "cnn8.safetensors"
    save_file(source.state_dict(), str(path))
    target = _build("cnn", CIFAR_SHAPE, width=16)
    with pytest.raises(ModelError, match="shape mismatch") as excinfo:
        load_pretrained(target, path)
    assert "features.0.0.weight (file (8, 3, 3, 3), model (16, 3, 3, 3))" in str(excinfo.value)

    other_architecture = _build("mlp", CIFAR_SHAPE)
    with pytest.raises(ModelError, match="missing from file: hidden.weight"):
        load_pretrained(other_architecture, path)


def test_load_pretrained_rejects_unexpected_keys(tmp_path) -> None:
    source = _build("mlp", MNIST_SHAPE, hidden=16)
    state = dict(source.state_dict())
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match="not in model: extra.weight"):
        load_pretrained(_build("mlp", MNIST_SHAPE, hidden=16), path)


def test_load_pretrained_first_conv_channel_mismatch(tmp_path) -> None:
    source = _build("cnn", CIFAR_SHAPE, width=8)
    path = tmp_path / "cnn_rgb.safetensors"
    save_file(source.state_dict(), str(path))
    with pytest.raises(ModelError, match="3-channel input but the model takes 1 channels"):
        load_pretrained(_build("cnn", MNIST_SHAPE, width=8), path)


def test_load_pretrained_bad_files(tmp_path) -> None:
    model = _build("mlp", MNIST_SHAPE, hidden=16)
    with pytest.raises(ModelError, match="not found"):
        load_pretrained(model, tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="garbage.safetensors"):
        load_pretrained(model, garbage)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"weights": nn.Linear(2, 2)}, unsafe)  # a pickled module, refused by weights_only loading
    with pytest.raises(ModelError, match="unsafe.pt"):
        load_pretrained(model, unsafe)


# --------------------------------------------------------------------------------------------------
# Classifier head and BatchNorm lookup (what update.keep_local = ["head"] / ["bn"] keeps on an edge)
# --------------------------------------------------------------------------------------------------

BUILT_IN_HEADS = {"mlp": "classifier", "cnn": "classifier", "mobilenet_v2": "classifier.1", "resnet18": "fc",
                  "resnet50": "fc"}


def test_every_registered_model_declares_its_head() -> None:
    assert {name: spec.head for name, spec in MODELS.items()} == BUILT_IN_HEADS


@pytest.mark.parametrize("name", list(BUILT_IN_HEADS))
def test_classifier_head_of_built_in_models(name: str) -> None:
    model = _build(name, CIFAR_SHAPE, num_classes=7)
    path, head = classifier_head(model)
    assert path == BUILT_IN_HEADS[name]
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert head is model.get_submodule(path)
    assert head_keys(model) == [f"{path}.weight", f"{path}.bias"]
    state = model.state_dict()
    assert all(state[key].shape[0] == 7 for key in head_keys(model))
    # The structural rule used for other torchvision models agrees with every declared head.
    delattr(model, MODEL_NAME_ATTRIBUTE)
    assert classifier_head(model)[0] == path


@pytest.mark.parametrize(
    ("name", "path", "layer_type"),
    [("shufflenet_v2_x0_5", "fc", nn.Linear), ("mobilenet_v3_small", "classifier.3", nn.Linear),
     ("squeezenet1_1", "classifier.1", nn.Conv2d)],
)
def test_classifier_head_of_other_torchvision_models(name: str, path: str, layer_type: type) -> None:
    model = _build(name, MNIST_SHAPE, num_classes=7)
    found_path, head = classifier_head(model)
    assert found_path == path and isinstance(head, layer_type)
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 7
    assert head_keys(model) == [f"{path}.weight", f"{path}.bias"]


def test_no_identifiable_head_raises_naming_the_model() -> None:
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="model of type Sequential: cannot identify its classifier head"):
        classifier_head(plain)
    with pytest.raises(ModelError, match="Sequential"):
        head_keys(plain)

    class HeadNotLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.projection = nn.Linear(4, 2)

    with pytest.raises(ModelError, match="last Linear/Conv2d is 'projection', not inside 'fc'"):
        classifier_head(HeadNotLast())

    mlp = _build("mlp", MNIST_SHAPE, hidden=8)
    mlp.classifier = nn.Identity()
    with pytest.raises(ModelError, match="model 'mlp': its classifier head 'classifier' is a Identity"):
        head_keys(mlp)
    del mlp.classifier
    with pytest.raises(ModelError, match="model 'mlp': its classifier head 'classifier' is missing"):
        classifier_head(mlp)


def test_batchnorm_keys() -> None:
    assert batchnorm_keys(_build("mlp", MNIST_SHAPE, hidden=8)) == []
    cnn = _build("cnn", MNIST_SHAPE, width=8)
    assert batchnorm_keys(cnn) == [
        f"features.{block}.1.{key}"
        for block in range(3)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]
    resnet = _build("resnet18", CIFAR_SHAPE)
    keys = batchnorm_keys(resnet)
    # bn1, two per basic block (8 blocks), one per downsample (3): 20 BatchNorm layers of 5 entries each.
    assert len(keys) == 100 and len(set(keys)) == 100
    assert {"bn1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.1.num_batches_tracked"} <= set(keys)
    assert set(keys) <= set(resnet.state_dict())
    assert not any(key.startswith(("conv1.", "fc.")) for key in keys)


def test_registering_a_model_is_one_entry(monkeypatch) -> None:
    def build_tiny(*, num_classes: int, in_channels: int, image_size: int, hidden: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden),
                             nn.Linear(hidden, num_classes))

    monkeypatch.setitem(MODELS, "tiny", ModelSpec(build_tiny, head="2", options={"hidden": Key(5, int_at_least(1))}))
    assert "tiny" in available_models()
    model = _build("tiny", MNIST_SHAPE, num_classes=3)
    assert model[1].out_features == 5
    assert head_keys(model) == ["2.weight", "2.bias"]
    with pytest.raises(ModelError, match="'hidden' must be an integer >= 1"):
        _build("tiny", MNIST_SHAPE, hidden=0)
    with pytest.raises(ModelError, match="unknown option.*'width'; allowed options are hidden"):
        _build("tiny", MNIST_SHAPE, width=2)


def test_load_pretrained_without_identifiable_head_needs_every_key(tmp_path) -> None:
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    path = tmp_path / "plain.safetensors"
    save_file(source.state_dict(), str(path))
    target = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert load_pretrained(target, path) == []
    _assert_same_tensors(target.state_dict(), source.state_dict(), source.state_dict())
    # No head to replace: a last layer of another size is a mismatch, not a replaced head.
    with pytest.raises(ModelError, match="shape mismatch: 1.weight"):
        load_pretrained(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5)), path)
