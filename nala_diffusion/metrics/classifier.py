"""DomainClassifier: a small CNN that classifies images of one dataset, and gives features for FID.

It serves where the Inception weights cannot be had: its penultimate features drive a domain FID
(through clean-fid's custom feature extractor) and its predictions the class accuracy of generated
images. Images go in as the pipelines return them with ``output_type="pt"``: (B, 3, H, W) in [0, 1];
other sizes are resized to ``image_size``.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.SiLU(),
    )


class DomainClassifier(ModelMixin, ConfigMixin):
    r"""CNN classifier: ``forward(images)`` gives logits, ``features(images)`` the pooled penultimate layer.

    Args:
        num_classes: number of classes.
        image_size: side the images are resized to before the network.
        widths: channels of the stages; every stage after the first halves the resolution.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, image_size: int = 32, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        widths = list(widths)
        stages, channels = [], 3
        for index, width in enumerate(widths):
            stages.append(_stage(channels, width, stride=1 if index == 0 else 2))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, height, width) in [0, 1], got {tuple(images.shape)}")
        size = self.config.image_size
        x = images.to(self.dtype)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = self.stages(x * 2 - 1)  # (B, C, h, w)
        return x.mean(dim=(-2, -1))  # (B, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images))
