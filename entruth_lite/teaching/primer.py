"""The diffusion primer's computations (notebook 00b): what a latent diffusion model does, one step at a time, on any
``StableDiffusionPipeline`` (the tiny model by default). Each function returns images to look at."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from ..core.data import images_to_tensor, tensor_to_images


@torch.no_grad()
def encode(pipe, images: Sequence[Image.Image]) -> torch.Tensor:
    """Images -> latents, scaled as the UNet sees them (the autoencoder's mean, times its scaling factor)."""
    pixels = images_to_tensor(images).to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> images."""
    return tensor_to_images(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.float().cpu())


def _noise_like(latents: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)


def _alpha_bar(pipe, t: int) -> float:
    return float(pipe.scheduler.alphas_cumprod[int(t)])


def _clean_estimate(pipe, noisy: torch.Tensor, output: torch.Tensor, t: int) -> torch.Tensor:
    """x_0 from the UNet's output: SD 1.5 predicts the noise ("epsilon"); the tiny model predicts the velocity
    v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 ("v_prediction"). Either determines x_0 given x_t."""
    a = _alpha_bar(pipe, t)
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return a ** 0.5 * noisy - (1 - a) ** 0.5 * output
    return (noisy - (1 - a) ** 0.5 * output) / a ** 0.5


def _target(pipe, latent: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """What the UNet is trained to output at timestep ``t``: the noise, or the velocity for a v-prediction model."""
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return pipe.scheduler.get_velocity(latent, noise, torch.tensor([int(t)]))
    return noise


def noised(pipe, image: Image.Image, timesteps: Sequence[int], seed: int = 0) -> list[Image.Image]:
    """The forward process: one image's latent with the noise of each timestep added
    (x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, one noise draw for all), decoded to be seen."""
    latent = encode(pipe, [image])
    noise = _noise_like(latent, seed)
    return [decode(pipe, pipe.scheduler.add_noise(latent, noise, torch.tensor([int(t)])))[0] for t in timesteps]


@torch.no_grad()
def predicted_clean(pipe, image: Image.Image, caption: str, timesteps: Sequence[int], seed: int = 0) -> list[Image.Image]:
    """What the UNet does with a noisy latent: it predicts the noise (or the velocity, ``_clean_estimate``), which
    gives an estimate of the clean latent, e.g. x_0 = (x_t - sqrt(1 - a_t) predicted noise) / sqrt(a_t), decoded here
    for each timestep. Training makes this prediction better on the training images: that is all fine-tuning asks
    of the UNet."""
    latent = encode(pipe, [image])
    noise = _noise_like(latent, seed)
    text, _ = pipe.encode_prompt([caption], pipe.device, 1, False)
    out = []
    for t in timesteps:
        noisy = pipe.scheduler.add_noise(latent, noise, torch.tensor([int(t)]))
        output = pipe.unet(noisy, int(t), encoder_hidden_states=text).sample
        out.append(decode(pipe, _clean_estimate(pipe, noisy, output, t))[0])
    return out


@torch.no_grad()
def loss_at_timestep(pipe, image: Image.Image, caption: str, t: int, seed: int = 0) -> float:
    """The training loss at one timestep: mean squared error between the UNet's output and its target (the noise
    added, or the velocity for a v-prediction model)."""
    latent = encode(pipe, [image])
    noise = _noise_like(latent, seed)
    text, _ = pipe.encode_prompt([caption], pipe.device, 1, False)
    noisy = pipe.scheduler.add_noise(latent, noise, torch.tensor([int(t)]))
    output = pipe.unet(noisy, int(t), encoder_hidden_states=text).sample
    return float(torch.mean((output - _target(pipe, latent, noise, t)) ** 2))


def sampling_trajectory(pipe, prompt: str, seed: int = 0, steps: int = 10) -> list[Image.Image]:
    """Sampling: start from pure noise and let the scheduler remove the predicted noise step by step; the latent
    after each step, decoded (the last is the generated image)."""
    latents = []

    def keep(pipeline, step, timestep, tensors):
        latents.append(tensors["latents"].detach().clone())
        return tensors

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe([prompt], num_inference_steps=steps, height=size, width=size,
         generator=torch.Generator(pipe.device).manual_seed(seed), callback_on_step_end=keep)
    return [decode(pipe, x)[0] for x in latents]


def lora_parameters(in_features: int, out_features: int, rank: int) -> tuple[int, int]:
    """(weights of a full linear layer, weights of its LoRA update B A of rank ``rank``): LoRA trains
    ``rank * (in + out)`` numbers instead of ``in * out``, and leaves the layer itself frozen."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return in_features * out_features, rank * (in_features + out_features)
