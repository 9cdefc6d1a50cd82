"""Mini-batches straight from in-memory uint8 tensors, with augmentation done on whole batches.

No worker processes, no per-sample Python: the images live on the target device once, and each
batch is one gather (random crop + horizontal flip folded into the gather indices), one cast and
one fused multiply-add for normalisation. Works the same on CPU and CUDA.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .dataset import ImageDataset

__all__ = ["TensorLoader"]


class TensorLoader:
    """Iterable of (x float32 normalised [B, C, H, W], y int64 [B]) on `device`.

    Each pass over the loader is one epoch. Shuffling and augmentation are drawn from a CPU
    torch.Generator seeded with ``seed + epoch`` (epoch = how many passes have started), so a run
    is reproducible and does not depend on the device. For evaluation use the defaults:
    ``shuffle=False, crop_padding=0, flip=False``.
    """

    def __init__(
        self,
        data: ImageDataset,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(data, ImageDataset):
            raise TypeError(f"data must be an ImageDataset, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError("cannot build a TensorLoader over an empty dataset")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
        channels = data.images.shape[1]
        mean_values = [float(m) for m in mean]
        std_values = [float(s) for s in std]
        if len(mean_values) != channels or len(std_values) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), got mean={mean_values} std={std_values}"
            )
        if any(s <= 0 for s in std_values):
            raise ValueError(f"std values must be > 0, got {std_values}")

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.crop_padding = crop_padding
        self.flip = bool(flip)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.seed = int(seed)
        self.epoch = 0
        self.mean = tuple(mean_values)
        self.std = tuple(std_values)

        # Moved once; every batch afterwards is gathered on the device.
        self.images = data.images.to(self.device).contiguous()
        self.labels = data.labels.to(self.device)
        # x_norm = (x / 255 - mean) / std = x * scale + shift, one fused op per batch.
        std_tensor = torch.tensor(std_values, dtype=torch.float32)
        mean_tensor = torch.tensor(mean_values, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_tensor)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean_tensor / std_tensor).view(1, -1, 1, 1).to(self.device)
        height, width = self.images.shape[2:]
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)

    @property
    def num_samples(self) -> int:
        """Samples in the dataset (what weighted averaging counts), whether or not drop_last trims some."""
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the randomness of `epoch` (for resuming a run)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        count = self.num_samples
        augment = self.crop_padding > 0 or self.flip
        generator = torch.Generator(device="cpu").manual_seed(self.seed + epoch)
        # All of the epoch's randomness is drawn up front on the CPU and moved in one transfer each.
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        order = order.to(self.device, non_blocking=True)
        if augment:
            span = 2 * self.crop_padding + 1
            offsets = torch.randint(0, span, (count, 2), generator=generator).to(self.device, non_blocking=True)
            if self.flip:
                flips = (torch.rand(count, generator=generator) < 0.5).to(self.device, non_blocking=True)
            else:
                flips = torch.zeros(count, dtype=torch.bool, device=self.device)
        for batch in range(len(self)):
            start = batch * self.batch_size
            positions = slice(start, min(start + self.batch_size, count))
            index = order[positions]
            images = self.images.index_select(0, index)
            if augment:
                images = self._crop_and_flip(images, offsets[positions], flips[positions])
            x = torch.addcmul(self._shift, images.to(torch.float32), self._scale)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, index)

    def _crop_and_flip(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Random crop (zero padding `crop_padding`, one offset per sample) and flip, as one gather.

        The batch is padded once; output pixel (i, j) of sample b reads padded row offsets[b, 0] + i
        and column offsets[b, 1] + j, or + (W - 1 - j) when that sample is flipped.
        """
        pad = self.crop_padding
        if pad:
            images = F.pad(images, (pad, pad, pad, pad))
        batch, channels, padded_h, padded_w = images.shape
        rows = offsets[:, 0:1] + self._rows  # [B, H]
        cols_forward = self._cols
        cols_flipped = self._cols.flip(0)
        cols = offsets[:, 1:2] + torch.where(flips[:, None], cols_flipped, cols_forward)  # [B, W]
        # Flat index into the contiguous padded batch: ((b * C + c) * Hp + row) * Wp + col.
        plane = (torch.arange(batch, device=images.device)[:, None] * channels
                 + torch.arange(channels, device=images.device)) * padded_h  # [B, C]
        flat = ((plane[:, :, None] + rows[:, None, :]) * padded_w)[..., None] + cols[:, None, None, :]
        return images.reshape(-1).take(flat)  # take() returns the index's shape: [B, C, H, W]
