"""The diffusion objective both sides use: the infringer's fine-tuning and the base model's pretraining train on it,
the owner's membership inference and the held-out loss measure with it.

Conventions follow diffusers' ``train_text_to_image_lora.py``: latents are ``vae.encode(x) * scaling_factor``,
the target is the noise (epsilon) or the velocity (v), depending on the scheduler's ``prediction_type``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .data import images_to_tensor
from .models import default_resolution, images_per_batch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length, as Stable Diffusion pipelines do."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's means and standard deviations, scaled by its ``scaling_factor`` (images in [-1, 1], shape
    N x 3 x H x W); batches sized to the images by default (``models.images_per_batch``)."""
    batch_size = batch_size or images_per_batch(images.shape[-1], 64)
    param = next(vae.parameters())
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size].to(param.device, param.dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means) * vae.config.scaling_factor, torch.cat(stds) * vae.config.scaling_factor


def encode_images(vae, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Latent means, scaled by the VAE's ``scaling_factor``: what the base UNet was trained on."""
    return encode_posterior(vae, images, batch_size)[0]


def sample_latents(means: torch.Tensor, stds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from the posterior, ``latent_dist.sample()`` as diffusers' training scripts encode (seeded, on the CPU)."""
    return means + stds * torch.randn(means.shape, generator=generator).to(means.device, means.dtype)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")


def diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The denoising loss at random timesteps: MSE between the UNet output and the scheduler's target.

    Randomness comes from ``generator`` (on the CPU, so runs replay exactly on any device). ``snr_gamma``
    applies Min-SNR weighting (Hang et al., 2023) as diffusers' scripts do. ``reduction="none"`` returns one
    loss per sample (membership tests and quality metrics use it).
    """
    shape, device = latents.shape, latents.device
    noise = torch.randn(shape, generator=generator).to(device, latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator).to(device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (shape[0],), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states).sample
    target = diffusion_target(scheduler, latents, noise, timesteps)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        # imported here, not at the top: diffusers is slow to import
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss.mean() if reduction == "mean" else loss


@torch.no_grad()
def encode_captions(text_encoder, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    param = next(text_encoder.parameters())
    return torch.cat([text_encoder(ids[i : i + batch_size].to(param.device))[0].float().cpu()
                      for i in range(0, len(ids), batch_size)])


@torch.no_grad()
def image_losses(pipe, images, captions: list[str], repeats: int = 4, seed: int = 0, batch_size: int | None = None,
                 sample_posterior: bool = False):
    """Per-image denoising loss of ``pipe`` on (image, caption) pairs, averaged over ``repeats`` draws of noise
    and timestep that are the same for every model (seeded): held-out loss as a cheap quality measure, and the
    membership signal of loss-based inference (lower on images the model was trained on). The latents are the
    posterior means, or with ``sample_posterior`` one seeded draw from the posterior (what sampling trainers see)."""
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need as many captions as images (got {len(images)} images, {len(captions)} captions)")
    size = default_resolution(pipe)
    batch_size = batch_size or images_per_batch(size, 64)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    latents, stds = encode_posterior(pipe.vae, images_to_tensor(images, size=size))
    if sample_posterior:
        latents = sample_latents(latents, stds, torch.Generator().manual_seed(seed * 7_919 + 1))
    hidden = encode_captions(pipe.text_encoder, tokenize(pipe.tokenizer, list(captions)))
    device, dtype = pipe.unet.device, pipe.unet.dtype
    total = torch.zeros(len(images))
    for r in range(repeats):
        for start in range(0, len(images), batch_size):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + r * 10_007 + start)
            losses = diffusion_loss(pipe.unet, scheduler, latents[start : start + batch_size].to(device, dtype),
                                    hidden[start : start + batch_size].to(device, dtype), generator, reduction="none")
            total[start : start + batch_size] += losses.float().cpu()
    return (total / repeats).numpy().astype(np.float64)
