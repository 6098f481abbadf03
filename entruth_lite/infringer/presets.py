"""What defines a fine-tuning run: ``TrainConfig`` (saved beside its checkpoints; a resume must match it) and the
presets, the tiny CPU default and what fits real Stable Diffusion 1.5 on common GPUs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import torch

from ..core.models import folder_resolution

LORA_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
LORA_UNET_WIDE_TARGETS = LORA_UNET_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")
# every linear and convolution of the UNet: also the resamplers, shortcuts, time embedding and the outer convolutions
LORA_UNET_ALL_TARGETS = LORA_UNET_WIDE_TARGETS + ("conv", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2",
                                                  "conv_in", "conv_out")
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run (saved beside its checkpoints; a resume must match it)."""

    model: str = "tiny"
    method: str = "lora"  # "lora" or "full"
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: equal to the rank
    lora_targets: tuple[str, ...] = LORA_UNET_TARGETS
    # DoRA (peft): each adapted weight's direction learns through the LoRA, its per-output norm separately
    use_dora: bool = False
    train_text_encoder: bool = False  # LoRA on the text encoder too
    steps: int = 800
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    caption_dropout: float = 0.0
    resolution: int | None = None  # None: the model's native size
    center_crop: bool = True
    random_flip: bool = False
    # strong augmentation (``augmentation.augment``: crop, flip, elastic, colour, grayscale, blur, noise), an infringer's
    # way to blunt memorization: with cached latents, this many augmented views of each image are encoded once and
    # every sample of every step draws one of them; without the cache, every batch is augmented afresh. 0 = off.
    augment_views: int = 0
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (CUDA)
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    # encode every image as a draw from the VAE's posterior at every step (latent_dist.sample(), what diffusers'
    # example trainers do) instead of its mean (what the base UNet was trained on)
    sample_latents: bool = False
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.augment_views < 0:
            raise ValueError(f"augment_views must be 0 (off) or positive, got {self.augment_views}")
        if self.sample_latents and self.augment_views and self.cache_latents:
            raise ValueError("sample_latents with augment_views needs cache_latents=False (the views are cached as means)")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        self.lora_targets = tuple(self.lora_targets)

    def summary(self) -> str:
        """The run in one line a person reads: what is trained, how long, how fast (the full record is ``asdict``)."""
        if self.method == "full":
            what = f"full fine-tune of {self.model!r}"
        else:
            alpha = self.lora_rank if self.lora_alpha is None else self.lora_alpha
            what = (f"LoRA of {self.model!r}: rank {self.lora_rank}, alpha {alpha:g}, on {len(self.lora_targets)} "
                    f"layer kinds{' and the text encoder' if self.train_text_encoder else ''}")
        batch = self.batch_size * self.gradient_accumulation_steps
        return (f"{what}; {self.steps:,} steps of {batch} images ({self.steps * batch:,} in all), learning rate "
                f"{self.learning_rate:g} ({self.lr_scheduler}), seed {self.seed}")

    def fingerprint(self) -> str:
        """Hash of the settings that shape the trajectory (``checkpoint_every`` may change on resume). Fields added
        later count only when set, so runs saved before they existed keep their fingerprint."""
        settings = {k: v for k, v in asdict(self).items()
                    if k != "checkpoint_every" and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


_ADDED_LATER = {"augment_views": 0, "use_dora": False, "sample_latents": False}  # field: its default (fingerprint)


# Presets: the tiny CPU default, and what fits real Stable Diffusion 1.5 on common GPUs.
PRESETS: dict[str, dict] = {
    # full fine-tune of the tiny UNet: what the benchmarks measure (benchmarks/results)
    "tiny-cpu": dict(model="tiny", method="full", steps=1500, batch_size=32, learning_rate=1e-3,
                     lr_scheduler="constant", cache_latents=True),
    # LoRA of the tiny model: rank 32 on every linear and convolution of the UNet and on the text encoder's attention,
    # at rsLoRA's scale alpha / sqrt(rank) (alpha = rank^1.5), so that the adapters learn at the full fine-tune's pace
    "tiny-cpu-lora": dict(model="tiny", method="lora", lora_rank=32, lora_alpha=181, lora_targets=LORA_UNET_ALL_TARGETS,
                          train_text_encoder=True, steps=1500, batch_size=32, learning_rate=1e-3,
                          lr_scheduler="constant", cache_latents=True),
    # GPU presets checkpoint often: Colab runtimes disconnect, and a resumed run replays exactly. Their length and
    # memory are sized to their card (benchmarks/gpu_estimates.py: estimates until benchmarks/gpu_check.py measures)
    # a free Colab T4 session is about an hour for the lab's two fine-tunes: 256 px (a quarter of SD's pixels) and a
    # release sized to the session (``teaching.demo.GPU_LABS``), so that each templated image is seen as often as
    # ``tiny-cpu`` shows it
    "colab-t4": dict(model="stable-diffusion-v1-5/stable-diffusion-v1-5", method="lora", lora_rank=8, resolution=256,
                     batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler="cosine",
                     lr_warmup_steps=100, steps=1500, mixed_precision="fp16", gradient_checkpointing=True,
                     snr_gamma=5.0, random_flip=False, cache_latents=True, checkpoint_every=250),
    "a100": dict(model="stable-diffusion-v1-5/stable-diffusion-v1-5", method="lora", lora_rank=16, resolution=512,
                 batch_size=16, learning_rate=1e-4, lr_scheduler="cosine", lr_warmup_steps=100, steps=3000,
                 mixed_precision="bf16", gradient_checkpointing=True, snr_gamma=5.0, cache_latents=True,
                 checkpoint_every=200),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown training settings: {sorted(unknown)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


def exposures(config: TrainConfig, n_images: int, processes: int = 1) -> float:
    """How many times a fine-tune shows the model each image on average (steps x processes x batch x accumulation
    / images): the number to keep when moving a setting that memorizes to another model, dataset size or GPUs."""
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if processes <= 0:
        raise ValueError(f"processes must be positive, got {processes}")
    return config.steps * processes * config.batch_size * config.gradient_accumulation_steps / n_images


def notebook_preset(name: str, model: str | None = None, steps: int | None = None, seed: int = 0) -> TrainConfig:
    """The preset as the notebooks run it on this machine: ``model`` replaces the preset's base model (a local
    Stable Diffusion folder; it then trains at the preset's resolution, or at its own native one where that is
    smaller, e.g. a narrow test build), ``steps`` the preset's number of steps, and without a CUDA GPU mixed
    precision is off (the CPU refuses it)."""
    overrides: dict = {"seed": seed} | ({"steps": steps} if steps else {})
    if model is not None:
        native, wanted = folder_resolution(model), PRESETS[name].get("resolution") if name in PRESETS else None
        overrides |= {"model": str(model), "resolution": min(wanted, native) if wanted and native else None}
    if not torch.cuda.is_available():
        overrides["mixed_precision"] = "no"
    return preset(name, **overrides)


def gpu_presets() -> list[str]:
    """The presets for Stable Diffusion on a GPU (the others fine-tune the tiny model on a CPU)."""
    return [name for name, settings in PRESETS.items() if settings["model"] != "tiny"]
