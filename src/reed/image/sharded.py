"""Training data sets over prepared shards (``reed prepare images`` / ``reed prepare latents``).

Both expose the interface the trainer uses: ``len``, ``shape`` (C,H,W of the training tensors), ``num_classes``,
``fingerprint``, ``name``, ``captions`` (None), ``batch(indices, generator=, device=) -> (x0, labels)`` (``read``
on the host, ``to_training`` on the device: :class:`reed.image.data.TrainingBatches`) and
``raw_images(indices) -> uint8 (B,3,H,W)`` for encoders that see the picture.
"""

from __future__ import annotations

import numpy as np
import torch

from reed.image.data import TrainingBatches
from reed.image.shards import ImageShards, LatentShards, sample_posterior


def _np_idx(indices) -> np.ndarray:
    return np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)


class _Pixels(TrainingBatches):
    """Shared picture access; subclasses set ``self.images`` (an :class:`ImageShards`)."""

    images: ImageShards

    def raw_images(self, indices) -> torch.Tensor:
        """uint8 images (B,3,R,R)."""
        return torch.from_numpy(self.images.images(_np_idx(indices))).permute(0, 3, 1, 2).contiguous()

    def pixels(self, indices) -> torch.Tensor:
        """Images (B,3,R,R) float in [-1,1]."""
        return self.raw_images(indices).float() / 127.5 - 1.0


class PixelShardDataset(_Pixels):
    """Prepared uint8 images trained in pixel space: x0 = x/127.5 - 1, (B,3,R,R)."""

    captions = None

    def __init__(self, directory: str):
        self.images = ImageShards(directory)
        self.name = f"images:{directory}"
        self.fingerprint = self.images.fingerprint
        self.num_classes = self.images.num_classes
        r = self.images.resolution
        self.shape = (3, r, r)
        self.labels = torch.from_numpy(np.asarray(self.images.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices) -> torch.Tensor:
        """uint8 (B,3,R,R): a quarter of the bytes of float pixels to pin and copy; scaled on the device."""
        return self.raw_images(indices)

    def to_training(self, x, generator, device) -> torch.Tensor:
        return x.to(device, non_blocking=True).float() / 127.5 - 1.0


class LatentDataset(_Pixels):
    """VAE latents: each batch samples the posterior, z = (mean + std*eps)*scale + shift, (B,C,h,w) (spec §5)."""

    captions = None

    def __init__(self, directory: str):
        self.latents = LatentShards(directory)  # also opens (and checks) the images they were encoded from
        self.images = self.latents.image_shards
        self.name = f"latents:{directory}"
        self.fingerprint = self.latents.fingerprint
        self.num_classes = self.latents.num_classes
        c, s = self.latents.latent_channels, self.latents.latent_size
        self.shape = (c, s, s)
        self.labels = torch.from_numpy(np.asarray(self.latents.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.latents)

    def read(self, indices) -> torch.Tensor:
        """The posterior moments (B, 2C, h, w); the latent is drawn on the device with the step's generator."""
        return torch.from_numpy(self.latents.moments(_np_idx(indices)))

    def to_training(self, x, generator, device) -> torch.Tensor:
        return sample_posterior(x.to(device, non_blocking=True), self.latents.scale, self.latents.shift,
                                generator=generator)
