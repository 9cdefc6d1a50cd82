"""TensorLoader: batching, shuffling, batched crop + flip, normalisation."""

from __future__ import annotations

import pytest
import torch

from ecavg.data import ImageDataset, TensorLoader

H, W = 5, 6


def position_images(n: int, channels: int = 1) -> ImageDataset:
    """Every pixel holds a distinct non-zero value encoding (sample, channel, row, col), so crops are traceable."""
    base = 1 + torch.arange(H * W).reshape(1, 1, H, W)  # 1..30
    channel_offset = 40 * torch.arange(channels).reshape(1, channels, 1, 1)
    images = (base + channel_offset).repeat(n, 1, 1, 1) + 100 * (torch.arange(n) % 2).reshape(n, 1, 1, 1)
    return ImageDataset(images.to(torch.uint8), torch.arange(n) % 3, ["a", "b", "c"])


def raw_pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation with mean 0, std 1: x = v / 255."""
    return (x * 255).round().to(torch.int64)


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image translated so that output (i, j) = image(i + dy, j + dx), zeros outside."""
    out = torch.zeros_like(image)
    for i in range(H):
        for j in range(W):
            if 0 <= i + dy < H and 0 <= j + dx < W:
                out[..., i, j] = image[..., i + dy, j + dx]
    return out


def test_batch_count_shapes_and_drop_last():
    data = position_images(10, channels=3)
    loader = TensorLoader(data, 4, mean=(0, 0, 0), std=(1, 1, 1))
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 3 and loader.num_samples == 10
    assert [x.shape for x, _ in batches] == [(4, 3, H, W), (4, 3, H, W), (2, 3, H, W)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    dropping = TensorLoader(data, 4, mean=(0, 0, 0), std=(1, 1, 1), drop_last=True)
    assert len(dropping) == 2 and [len(y) for _, y in dropping] == [4, 4]
    assert dropping.num_samples == 10


def test_evaluation_mode_is_ordered_and_exact():
    data = position_images(7, channels=2)
    loader = TensorLoader(data, 3, mean=(0.5, 0.25), std=(0.2, 0.4))
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(ys), data.labels)
    expected = (data.images.float() / 255 - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor(
        [0.2, 0.4]
    ).view(1, 2, 1, 1)
    assert torch.allclose(torch.cat(xs), expected, atol=1e-5)
    # Same result every epoch.
    assert torch.equal(torch.cat([x for x, _ in loader]), torch.cat(xs))


def test_shuffle_is_a_permutation_and_changes_per_epoch():
    data = position_images(50)
    loader = TensorLoader(data, 8, mean=(0,), std=(1,), shuffle=True, seed=3)
    first = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    second = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    labels_first = torch.cat([y for _, y in TensorLoader(data, 8, mean=(0,), std=(1,), shuffle=True, seed=3)])
    assert sorted(labels_first.tolist()) == sorted(data.labels.tolist())
    assert not torch.equal(labels_first, data.labels)
    assert len(first) == 50 and not torch.equal(first, second)


def test_determinism_per_seed_and_set_epoch():
    data = position_images(40, channels=3)

    def run(seed: int, epochs: int = 2) -> list[torch.Tensor]:
        loader = TensorLoader(data, 16, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True, crop_padding=2, flip=True,
                              seed=seed)
        return [torch.cat([torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader]) for _ in range(epochs)]

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])
    resumed = TensorLoader(data, 16, mean=(0, 0, 0), std=(1, 1, 1), shuffle=True, crop_padding=2, flip=True, seed=5)
    resumed.set_epoch(1)
    again = torch.cat([torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in resumed])
    assert torch.equal(again, a[1])


def test_crop_is_a_shift_within_padding_with_zero_fill():
    data = position_images(64, channels=2)
    pad = 2
    loader = TensorLoader(data, 64, mean=(0, 0), std=(1, 1), crop_padding=pad, seed=0)
    (x, _), = list(loader)
    out = raw_pixels(x)
    originals = data.images.to(torch.int64)
    seen_shifts = set()
    for k in range(64):
        matches = [
            (dy, dx)
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
            if torch.equal(out[k], shifted(originals[k], dy, dx))
        ]
        assert len(matches) == 1, f"sample {k} is not a unique shift of its image"
        seen_shifts.add(matches[0])
    assert len(seen_shifts) > 10  # offsets are drawn per sample, not once per batch


def test_flip_mirrors_rows_for_about_half_the_samples():
    data = position_images(200, channels=3)
    loader = TensorLoader(data, 64, mean=(0, 0, 0), std=(1, 1, 1), flip=True, seed=1)
    out = raw_pixels(torch.cat([x for x, _ in loader]))
    originals = data.images.to(torch.int64)
    flipped = torch.tensor([torch.equal(out[k], originals[k].flip(-1)) for k in range(200)])
    unchanged = torch.tensor([torch.equal(out[k], originals[k]) for k in range(200)])
    assert bool((flipped ^ unchanged).all())
    assert 60 < int(flipped.sum()) < 140


def test_crop_and_flip_together_keep_content():
    data = position_images(32)
    loader = TensorLoader(data, 32, mean=(0,), std=(1,), crop_padding=1, flip=True, seed=2)
    (x, _), = list(loader)
    out = raw_pixels(x)
    for k in range(32):
        original = data.images[k].to(torch.int64)
        candidates = [shifted(img, dy, dx) for img in (original, original.flip(-1))
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(torch.equal(out[k], c) for c in candidates)


def test_channels_last_output():
    data = position_images(8, channels=3)
    loader = TensorLoader(data, 4, mean=(0, 0, 0), std=(1, 1, 1), channels_last=True, crop_padding=1)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_bad_arguments():
    data = position_images(4, channels=3)
    with pytest.raises(ValueError, match="one value per channel"):
        TensorLoader(data, 2, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(data, 0, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(ValueError, match="std values must be > 0"):
        TensorLoader(data, 2, mean=(0, 0, 0), std=(1, 0, 1))
    with pytest.raises(ValueError, match="crop_padding"):
        TensorLoader(data, 2, mean=(0, 0, 0), std=(1, 1, 1), crop_padding=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data = position_images(100, channels=3)
    options = dict(mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), shuffle=True, crop_padding=2, flip=True, seed=4)
    cpu = [(x, y) for x, y in TensorLoader(data, 32, **options)]
    gpu = [(x, y) for x, y in TensorLoader(data, 32, device="cuda", **options)]
    assert all(xg.device.type == "cuda" for xg, _ in gpu)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu())


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
def test_onecycle_training_runs_for_any_number_of_steps(steps):
    """An edge with one batch per epoch gets a handful of steps (e.g. the update's one epoch of fine-tuning);
    OneCycleLR divided by zero at exactly 4, which stopped an 8-edge Dirichlet 0.1 CIFAR-10 run."""
    from ecavg.core.training import TrainingSettings, train

    loader = TensorLoader(position_images(4 * steps), 4, mean=(0.0,), std=(1.0,), shuffle=True, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(H * W, 3))
    history = train(model, loader, TrainingSettings(epochs=1, batch_size=4, lr=0.1, schedule="onecycle"))
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["train_loss"]))


def test_test_time_flip_scores_the_mean_of_an_image_and_its_mirror():
    """data.test_augment = "flip": every evaluation (edges', server's, the ensemble's) goes through the factory,
    which averages the logits of each test image and of its mirror; without it, the image alone."""
    from ecavg.core.participants import DataSpec, ModelFactory

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, H, W), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    data = ImageDataset(images, labels, [str(c) for c in range(3)])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(H * W, 3))  # not mirror-symmetric
    x = images.float() / 255  # mean 0, std 1: the loader only rescales
    for test_flip in (False, True):
        spec = DataSpec(num_classes=3, in_channels=1, image_size=H, mean=(0.0,), std=(1.0,), test_flip=test_flip)
        factory = ModelFactory("mlp", {}, spec, torch.device("cpu"))
        with torch.no_grad():
            logits = model(x) if not test_flip else (model(x) + model(x.flip(-1))) / 2
        expected = (logits.argmax(1) == labels).float().mean().item()
        result = factory.evaluate(model, data)
        assert result["samples"] == 40 and result["accuracy"] == pytest.approx(expected)
        assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
