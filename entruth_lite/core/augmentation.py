"""Strong image augmentation, shared by the two sides without either importing the other: the owner's template
classifier trains on augmented views (``detect``), and an infringer may augment training data to blunt
memorization (``train``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(batch, generator):
    """The paper's augmentations on a batch in [0, 1] (B, 3, H, W), all in one place so that tests can
    call it: random resized crop + flip + elastic jitter (one ``grid_sample``), colour jitter, grayscale,
    Gaussian blur and noise. Each image gets its own random draw from ``generator``."""
    b, _, h, w = batch.shape

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=generator)

    scale = uniform(0.75, 1.0)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-1, 1) * (1 - scale), uniform(-1, 1) * (1 - scale)
    grid = F.affine_grid(theta, (b, 3, h, w), align_corners=False)
    flow = F.interpolate(uniform(-1, 1, b, 2, 4, 4), size=(h, w), mode="bicubic", align_corners=True)
    grid = grid + flow.permute(0, 2, 3, 1) * (uniform(0, 1.5)[:, None, None, None] / max(h, w))
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    out = out * uniform(0.75, 1.25)[:, None, None, None]  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + (out - mean) * uniform(0.75, 1.25)[:, None, None, None]  # contrast
    gray = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]).expand_as(out)
    out = gray + (out - gray) * uniform(0.7, 1.3)[:, None, None, None]  # saturation
    out = torch.where((torch.rand(b, generator=generator) < 0.05)[:, None, None, None], gray, out)

    sigma = uniform(0.05, 1.2)  # Gaussian blur, one sigma per image, as a grouped convolution
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel2d = (kernel[:, :, None] * kernel[:, None, :]).repeat_interleave(3, dim=0)[:, None]
    out = F.conv2d(F.pad(out.reshape(1, b * 3, h, w), (2, 2, 2, 2), mode="reflect"), kernel2d, groups=b * 3)
    out = out.reshape(b, 3, h, w)
    out = out + torch.randn(out.shape, generator=generator) * uniform(0, 0.04)[:, None, None, None]
    return out.clamp(0, 1)
