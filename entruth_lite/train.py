"""Training: the diffusion loss shared by the tiny base model's pretraining, and the fine-tuning loop.

Conventions follow diffusers' ``train_text_to_image_lora.py``: latents are ``vae.encode(x) * scaling_factor``,
the target is the noise (epsilon) or the velocity (v), depending on the scheduler's ``prediction_type``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import LORA_WEIGHTS_NAME, images_per_batch, place


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length, as Stable Diffusion pipelines do."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Latent means, scaled by the VAE's ``scaling_factor`` (images in [-1, 1], shape N x 3 x H x W); batches sized
    to the images by default (``models.images_per_batch``)."""
    batch_size = batch_size or images_per_batch(images.shape[-1], 64)
    param = next(vae.parameters())
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(param.device, param.dtype)
        chunks.append(vae.encode(batch).latent_dist.mean.float().cpu())
    return torch.cat(chunks) * vae.config.scaling_factor


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
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    return loss.mean() if reduction == "mean" else loss


# ============================================================================= fine-tuning (the infringer's side)

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
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        self.lora_targets = tuple(self.lora_targets)

    def fingerprint(self) -> str:
        """Hash of the settings that shape the trajectory (``checkpoint_every`` may change on resume). Fields added
        later count only when set, so runs saved before they existed keep their fingerprint."""
        settings = {k: v for k, v in asdict(self).items()
                    if k != "checkpoint_every" and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


_ADDED_LATER = {"augment_views": 0, "use_dora": False}  # field: its default (see TrainConfig.fingerprint)


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
    "colab-t4": dict(model="stable-diffusion-v1-5/stable-diffusion-v1-5", method="lora", lora_rank=8, resolution=512,
                     batch_size=1, gradient_accumulation_steps=4, learning_rate=1e-4, lr_scheduler="cosine",
                     lr_warmup_steps=50, steps=650, mixed_precision="fp16", gradient_checkpointing=True,
                     snr_gamma=5.0, random_flip=False, cache_latents=True, checkpoint_every=200),
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


def exposures(config: TrainConfig, n_images: int) -> float:
    """How many times a fine-tune shows the model each image on average (steps x batch x accumulation / images):
    the number to keep when moving a setting that memorizes to another model, dataset size or GPU."""
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    return config.steps * config.batch_size * config.gradient_accumulation_steps / n_images


def notebook_preset(name: str, model: str | None = None, steps: int | None = None, seed: int = 0) -> TrainConfig:
    """The preset as the notebooks run it on this machine: ``model`` replaces the preset's base model (a local
    Stable Diffusion folder; it then trains at its own native resolution), ``steps`` the preset's number of
    steps, and without a CUDA GPU mixed precision is off (the CPU refuses it)."""
    overrides: dict = {"seed": seed} | ({"steps": steps} if steps else {})
    if model is not None:
        overrides |= {"model": str(model), "resolution": None}
    if not torch.cuda.is_available():
        overrides["mixed_precision"] = "no"
    return preset(name, **overrides)


def gpu_presets() -> list[str]:
    """The presets for Stable Diffusion on a GPU (the others fine-tune the tiny model on a CPU)."""
    return [name for name, settings in PRESETS.items() if settings["model"] != "tiny"]


@dataclass
class TrainResult:
    out: Path
    config: TrainConfig
    losses: list[float]
    seconds: float
    trainable_parameters: int
    resumed_from: int = 0


# ----------------------------------------------------------------------------- data


def prepare_images(dataset, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` and crop the centre (or top-left): (N, 3, R, R) in [-1, 1]."""
    from .data import crop_to_square, images_to_tensor

    images = dataset.images() if hasattr(dataset, "images") else dataset
    return images_to_tensor(crop_to_square(image, resolution, center_crop)
                            for image in tqdm(images, desc="loading images", disable=len(dataset) < 500))


def check_resolution(resolution: int, pipe) -> None:
    factor = pipe.vae_scale_factor
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution {resolution} must be a positive multiple of the VAE factor {factor}")


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """All randomness of one micro-batch comes from (seed, step, micro, process): resuming replays it exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + micro) * 31 + process)


def augment_pixels(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Strong augmentation of a batch in [-1, 1]: ``augmentation.augment``'s random draw for each image."""
    from .augmentation import augment

    return augment((pixels + 1) / 2, generator) * 2 - 1


def augmented_latents(vae, pixels: torch.Tensor, views: int, seed: int, batch_size: int | None = None) -> torch.Tensor:
    """(views, N, C, h, w): ``views`` augmented copies of every image, encoded once (seeded, so resumable)."""
    batch_size = batch_size or images_per_batch(pixels.shape[-1], 64)
    generator = torch.Generator().manual_seed(seed * 104729 + 17)
    return torch.stack([
        torch.cat([encode_images(vae, augment_pixels(pixels[start : start + batch_size], generator))
                   for start in range(0, len(pixels), batch_size)])
        for _ in tqdm(range(views), desc="augmented views", disable=views < 4)])


def batch_indices(n: int, batch_size: int, global_batch: int, seed: int) -> torch.Tensor:
    """Indices of the ``global_batch``-th batch when the data is shuffled anew each epoch (seeded per epoch)."""
    positions = torch.arange(global_batch * batch_size, (global_batch + 1) * batch_size)
    epochs, offsets = positions // n, positions % n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        mask = epochs == epoch
        out[mask] = perm[offsets[mask]]
    return out


# ----------------------------------------------------------------------------- saving and loading


def _peft_config(rank: int, alpha: float | None, targets, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets),
                      use_dora=use_dora)


def save_lora(out: Path, unet, text_encoder=None) -> Path:
    """diffusers' format: ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(out)`` reads, with each
    adapter's LoRA config (rank, alpha, targets) in the file's metadata, as diffusers' training scripts write it, so
    a LoRA whose alpha is not its rank is loaded at the scale it was trained at."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = text_metadata = None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        text_metadata = text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_metadata,
    )
    return out / LORA_WEIGHTS_NAME


def dataset_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over what trains: ``metadata.jsonl`` and the image files it lists (names and bytes). Other files
    (a README, the release's key commitment, which changes with every key) do not change what a model learns."""
    from .data import METADATA, read_metadata

    digest = hashlib.sha256()
    root = Path(folder)
    for name in [METADATA] + sorted(record.file_name for record in read_metadata(root)):
        digest.update(name.encode() + b"\0" + hashlib.sha256((root / name).read_bytes()).digest())
    return digest.hexdigest()


def is_current(out: str | os.PathLike, config: TrainConfig, data: str | os.PathLike) -> bool:
    """True when ``out`` holds a finished fine-tune with these settings on exactly this data (so it can be reused)."""
    out = Path(out)
    try:
        saved = TrainConfig(**json.loads((out / "train_config.json").read_text()))
        trained_on = json.loads((out / "train_data.json").read_text())["sha256"]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return False
    return saved.fingerprint() == config.fingerprint() and trained_on == dataset_fingerprint(data)


def saved_losses(folder: str | os.PathLike) -> list[float]:
    """The loss history a finished fine-tune saved (to plot a run that was reused, not retrained)."""
    return json.loads((Path(folder) / "loss_history.json").read_text())


def ensure_finetuned(data: str | os.PathLike, out: str | os.PathLike, config: TrainConfig, pipe=None,
                     progress: bool = True) -> TrainResult | None:
    """Fine-tune unless ``out`` already holds this exact run (``is_current``); a run killed before it finished
    continues from its newest checkpoint. Returns the new result, or None when the finished run was reused."""
    if is_current(out, config, data):
        return None
    return finetune(data, out, config, pipe=pipe, overwrite=True, resume="latest", progress=progress)


def _side_by_side_worker(index: int, data: str, out: str, config: TrainConfig, threads: int, events) -> None:
    """One run of ``finetune_side_by_side``, in its own process: steps and the result (or the error) go back on
    ``events``; its own progress bars stay quiet (the parent draws one for all runs)."""
    import sys
    import traceback

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (a child's bars and warnings would land in the server log)
    torch.set_num_threads(threads)
    try:
        result = finetune(data, out, config, overwrite=True, resume="latest", progress=False, device="cpu",
                          on_step=lambda step, loss: events.put(("step", index, step)))
        events.put(("done", index, result))
    except BaseException as error:  # noqa: BLE001 (reported to the parent, which raises it)
        events.put(("error", index, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def finetune_side_by_side(jobs: list[tuple[str | os.PathLike, str | os.PathLike]], config: TrainConfig,
                          progress: bool = True) -> list[TrainResult | None]:
    """``ensure_finetuned`` for several ``(data, out)`` runs at once on the CPU, one process each with an equal
    share of the cores: a small model keeps two cores only partly busy in one process, so two runs side by side
    finish sooner than one after the other (``benchmarks/train_speed.py``). Finished runs are reused (None), an
    interrupted one resumes from its checkpoint; a run that fails stops the others and raises its error."""
    import multiprocessing
    import queue

    results: list[TrainResult | None] = [None] * len(jobs)
    todo = [i for i, (data, out) in enumerate(jobs) if not is_current(out, config, data)]
    if not todo:
        return results
    context = multiprocessing.get_context("spawn")  # a forked child would inherit the parent's thread pools
    events = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(todo))
    workers = {i: context.Process(target=_side_by_side_worker, daemon=True,
                                  args=(i, str(jobs[i][0]), str(jobs[i][1]), config, threads, events))
               for i in todo}
    steps_done = dict.fromkeys(todo, 0)
    bar = tqdm(total=config.steps * len(todo), desc=f"fine-tuning {len(todo)} runs side by side ({config.method})",
               disable=not progress, mininterval=2)
    try:
        for worker in workers.values():
            worker.start()
        pending = set(todo)
        while pending:
            try:
                kind, i, payload = events.get(timeout=5)
            except queue.Empty:
                for i in pending:
                    if not workers[i].is_alive():
                        raise RuntimeError(f"the fine-tune into {jobs[i][1]} stopped without a result (exit code "
                                           f"{workers[i].exitcode}); rerun to resume it from its last checkpoint")
                continue
            if kind == "step":
                bar.update(payload - steps_done[i])
                steps_done[i] = payload
            elif kind == "done":
                results[i] = payload
                pending.discard(i)
            else:
                raise RuntimeError(f"the fine-tune into {jobs[i][1]} failed:\n{payload}")
    finally:
        bar.close()
        for worker in workers.values():  # on an error or an interrupt: no run keeps training unseen
            if worker.is_alive():
                worker.terminate()
            worker.join()
        events.close()
        events.join_thread()
    return results


def _atomic_write_dir(target: Path, write) -> None:
    """Build ``target`` in a temporary sibling folder with ``write(tmp)``, then rename it into place."""
    from .data import atomic_folder, commit_folder

    tmp = atomic_folder(target, overwrite=True)
    try:
        write(tmp)
        commit_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(folder: Path, step: int, config: TrainConfig, trainables: dict[str, torch.nn.Module],
                    optimizer, lr_scheduler, losses: list[float], data: dict | None = None) -> Path:
    """Trainable weights and optimizer tensors in safetensors, the rest in JSON; written atomically."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        weights = {f"{name}.{k}": p.detach().cpu().contiguous()
                   for name, module in trainables.items()
                   for k, p in module.named_parameters() if p.requires_grad}
        save_file(weights, tmp / "trainable.safetensors")
        opt_state = optimizer.state_dict()
        tensors, meta = {}, {}
        for index, state in opt_state["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    meta[f"{index}.{key}"] = value
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "fingerprint": config.fingerprint(), "config": asdict(config),
            "param_groups": opt_state["param_groups"], "optimizer_scalars": meta,
            "lr_scheduler": lr_scheduler.state_dict(), "losses": losses, "data": data,
        }, default=list))

    target = folder / f"step-{step:07d}"
    _atomic_write_dir(target, write)
    return target


def _trainable_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def latest_checkpoint(folder: Path) -> Path | None:
    candidates = sorted(Path(folder).glob("step-*"))
    candidates = [c for c in candidates if (c / "state.json").is_file()]
    return candidates[-1] if candidates else None


def load_checkpoint(path: Path, config: TrainConfig, trainables: dict[str, torch.nn.Module], optimizer,
                    lr_scheduler, data: dict | None = None) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != config.fingerprint():
        raise ValueError(f"checkpoint {path} was made with other training settings; "
                         "resume with the same settings or start a new output folder")
    saved = state.get("data")
    if data is not None and saved is not None and saved["sha256"] != data["sha256"]:
        raise ValueError(f"checkpoint {path} was trained on {saved['data']}, not on {data['data']} (their files "
                         "differ): resume on the same data, or start a new output folder")
    weights = load_file(path / "trainable.safetensors")
    for name, module in trainables.items():
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing = _trainable_names(module) - set(own)
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} trainable tensors of {name}")
        module.load_state_dict(own, strict=False)
    tensors = load_file(path / "optimizer.safetensors")
    opt_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        index, name = key.split(".", 1)
        opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return int(state["step"]), list(state["losses"])


# ----------------------------------------------------------------------------- the loop


def _optimizer(params, config: TrainConfig):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError("use_8bit_adam needs bitsandbytes (pip install bitsandbytes), which is not installed") from error
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)


@torch.no_grad()
def encode_captions(text_encoder, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    param = next(text_encoder.parameters())
    return torch.cat([text_encoder(ids[i : i + batch_size].to(param.device))[0].float().cpu()
                      for i in range(0, len(ids), batch_size)])


@torch.no_grad()
def denoising_losses(pipe, images, captions: list[str], repeats: int = 4, seed: int = 0, batch_size: int | None = None):
    """Per-image denoising loss of ``pipe`` on (image, caption) pairs, averaged over ``repeats`` draws of noise
    and timestep that are the same for every model (seeded): held-out loss as a cheap quality measure, and the
    membership signal of loss-based inference (lower on images the model was trained on)."""
    import numpy as np
    from diffusers import DDPMScheduler

    from .data import images_to_tensor
    from .models import default_resolution

    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need as many captions as images (got {len(images)} images, {len(captions)} captions)")
    size = default_resolution(pipe)
    batch_size = batch_size or images_per_batch(size, 64)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    latents = encode_images(pipe.vae, images_to_tensor(images, size=size))
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


@dataclass
class TrainingData:
    """What the loop reads: pixels, token ids, and (encoders frozen) cached latents and text embeddings."""

    pixels: torch.Tensor | None  # None once the latents are cached
    ids: torch.Tensor
    empty_ids: torch.Tensor
    latents: torch.Tensor | None = None
    flipped: torch.Tensor | None = None  # latents of the mirrored images (random_flip)
    views: torch.Tensor | None = None  # latents of augmented views (augment_views)
    embeddings: torch.Tensor | None = None  # frozen text encoder: the captions' hidden states
    empty_embedding: torch.Tensor | None = None


def _prepare_data(dataset, tokenizer, vae, config: TrainConfig, resolution: int, device, weight_dtype) -> TrainingData:
    """Pixels at ``resolution`` and token ids; latents encoded once when ``cache_latents``."""
    batch = TrainingData(prepare_images(dataset, resolution, config.center_crop), tokenize(tokenizer, dataset.captions),
                         tokenize(tokenizer, [""]))
    place(vae.requires_grad_(False), device, weight_dtype)
    if config.cache_latents:
        batch.latents = encode_images(vae, batch.pixels)
        batch.flipped = encode_images(vae, batch.pixels.flip(-1)) if config.random_flip else None
        batch.views = augmented_latents(vae, batch.pixels, config.augment_views, config.seed) \
            if config.augment_views else None
        batch.pixels = None  # the latents are all the loop reads: free a 512 px dataset's pixels (GBs of RAM)
    return batch


def _trainable_modules(unet, text_encoder, config: TrainConfig, device, weight_dtype) -> dict[str, torch.nn.Module]:
    """The full UNet, or LoRA adapters on it (and on the text encoder when ``train_text_encoder``)."""
    unet.requires_grad_(config.method == "full")
    text_encoder.requires_grad_(False)
    torch.manual_seed(config.seed)  # peft draws the gaussian LoRA init from the global generator
    if config.method == "lora":
        place(unet, device, weight_dtype)
        unet.add_adapter(_peft_config(config.lora_rank, config.lora_alpha, config.lora_targets, config.use_dora))
    if config.train_text_encoder:
        place(text_encoder, device, weight_dtype)
        # peft directly: transformers' add_adapter wants a newer peft than PyPI has (0.21.2 here)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(_peft_config(config.lora_rank, config.lora_alpha, LORA_TEXT_TARGETS, config.use_dora),
                                text_encoder)
    unet.to(device)
    text_encoder.to(device)
    trainables = {"unet": unet} | ({"text_encoder": text_encoder} if config.train_text_encoder else {})
    if config.mixed_precision != "no":
        from diffusers.training_utils import cast_training_params

        cast_training_params(list(trainables.values()), dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:  # non-reentrant: reentrant checkpointing passes no gradient to LoRA weights
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainables


def _batch(batch: TrainingData, index: torch.Tensor, flip, config: TrainConfig, vae, generator) -> torch.Tensor:
    """The latents of one micro-batch: cached (mirrored or an augmented view where asked) or encoded now."""
    if batch.latents is not None:
        latents = batch.latents[index].clone()
        if flip is not None:
            latents[flip] = batch.flipped[index][flip]
        if batch.views is not None:
            latents = batch.views[torch.randint(len(batch.views), (len(index),), generator=generator), index]
        return latents
    pixels = batch.pixels[index].clone()
    if flip is not None:
        pixels[flip] = pixels[flip].flip(-1)
    if config.augment_views:
        pixels = augment_pixels(pixels, generator)
    return encode_images(vae, pixels)


def _hidden_states(batch: TrainingData, index, drop, trainables, device, weight_dtype) -> torch.Tensor:
    """Caption embeddings of one micro-batch, dropped captions replaced by the empty caption's."""
    if "text_encoder" in trainables:
        ids = batch.ids[index].clone()
        ids[drop] = batch.empty_ids
        return trainables["text_encoder"](ids.to(device))[0]
    hidden = batch.embeddings[index].clone()
    hidden[drop] = batch.empty_embedding
    return hidden.to(device, weight_dtype)


def _save_finetuned(out: Path, config: TrainConfig, unet, text_encoder, data_record: dict, losses: list[float]) -> None:
    """diffusers' formats (a LoRA file, or ``unet/``), the settings, the data's fingerprint and the loss history."""
    out.mkdir(parents=True, exist_ok=True)
    if config.method == "lora":
        _atomic_write_dir(out / ".lora", lambda tmp: save_lora(tmp, unet, text_encoder))
        os.replace(out / ".lora" / LORA_WEIGHTS_NAME, out / LORA_WEIGHTS_NAME)
        shutil.rmtree(out / ".lora")
    else:
        _atomic_write_dir(out / "unet", lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (out / "train_data.json").write_text(json.dumps(data_record, indent=2) + "\n")
    (out / "loss_history.json").write_text(json.dumps(losses) + "\n")


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: str | None = None,
    pipe=None,
    overwrite: bool = False,
    progress: bool = True,
    on_step=None,
    device: str | None = None,
) -> TrainResult:
    """Fine-tune a text-to-image model on an imagefolder, LoRA or full, as diffusers' training script does.

    Writes ``out/pytorch_lora_weights.safetensors`` (LoRA) or ``out/unet/`` (full), ``out/train_config.json``,
    ``out/train_data.json`` (the data's fingerprint) and ``out/loss_history.json``; checkpoints go to ``out/checkpoints/step-N`` every ``checkpoint_every``
    steps. ``resume="latest"`` continues from the newest checkpoint with identical results on the CPU.
    ``pipe`` (optional) is a loaded base pipeline; it is not modified. ``on_step(step, loss)`` is called
    after every optimizer step. ``device="cpu"`` keeps a run on the CPU when a GPU is present.
    """
    import copy

    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from .data import check_writable_parent, load_imagefolder
    from .models import default_resolution, is_pipeline_of, load_pipeline

    # -- setup: settings, data, the accelerator, private copies of the base model
    config = config or preset("tiny-cpu")
    out = Path(out)
    if resume not in (None, "latest"):
        raise ValueError(f"resume must be None or 'latest', got {resume!r}")
    if out.exists() and any(out.iterdir()) and resume is None and not overwrite:
        raise FileExistsError(f"{out} is not empty: resume it (resume='latest'; CLI --resume latest) or replace it "
                              "(overwrite=True; CLI --overwrite)")
    dataset = load_imagefolder(data)
    data_record = {"data": str(Path(data).resolve()), "sha256": dataset_fingerprint(data)}  # which data, exactly
    check_writable_parent(out)
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if config.mixed_precision != "no" and on_cpu:
        raise ValueError(f"mixed_precision={config.mixed_precision!r} needs a CUDA GPU; use 'no' on the CPU")
    _reset_accelerate()  # an earlier run in this kernel (e.g. notebook 02's LoRA in fp16) fixed its own precision
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device == "cpu",
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    if pipe is not None and is_pipeline_of(pipe, config.model) is False:
        raise ValueError(f"the base pipeline given was loaded from {pipe.config._name_or_path}, but the settings name "
                         f"{config.model!r}: load the preset's model (load_pipeline(config.model)) or set model=")
    base = pipe if pipe is not None else load_pipeline(config.model, device="cpu", dtype=torch.float32)
    # copies: the caller's pipeline is never moved, cast or given adapters
    vae, unet, text_encoder = (copy.deepcopy(m) for m in (base.vae, base.unet, base.text_encoder))
    unet, text_encoder = unet.float(), text_encoder.float()
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)  # training noise, as the model was trained
    resolution = config.resolution or default_resolution(base)
    check_resolution(resolution, base)

    batch = _prepare_data(dataset, base.tokenizer, vae, config, resolution, device, weight_dtype)
    trainables = _trainable_modules(unet, text_encoder, config, device, weight_dtype)
    params = [p for m in trainables.values() for p in m.parameters() if p.requires_grad]
    if not config.train_text_encoder:
        batch.embeddings = encode_captions(text_encoder, batch.ids)
        batch.empty_embedding = encode_captions(text_encoder, batch.empty_ids)
    optimizer = _optimizer(params, config)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.steps)
    start_step, losses = 0, []
    checkpoints = out / "checkpoints"
    if resume == "latest" and (found := latest_checkpoint(checkpoints)) is not None:
        start_step, losses = load_checkpoint(found, config, trainables, optimizer, lr_scheduler, data_record)
    prepared = accelerator.prepare(*trainables.values(), optimizer)
    trainables = dict(zip(trainables, prepared[:-1]))
    optimizer = prepared[-1]

    # -- the loop: every random draw of a step comes from (seed, step), so a resumed run replays exactly
    n, accum = len(batch.ids), config.gradient_accumulation_steps
    process, n_processes = accelerator.process_index, accelerator.num_processes
    for module in trainables.values():
        module.train()
    started = time.time()
    bar = tqdm(range(start_step, config.steps), desc=f"fine-tuning ({config.method})", initial=start_step,
               total=config.steps, disable=not progress or not accelerator.is_local_main_process, mininterval=2)
    for step in bar:
        step_loss = 0.0
        for micro in range(accum):
            generator = step_generator(config.seed, step, micro, process)
            index = batch_indices(n, config.batch_size, (step * accum + micro) * n_processes + process, config.seed)
            flip = (torch.rand(config.batch_size, generator=generator) < 0.5) if config.random_flip else None
            drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
            latents = _batch(batch, index, flip, config, vae, generator).to(device, weight_dtype)
            with accelerator.accumulate(*trainables.values()):
                hidden = _hidden_states(batch, index, drop, trainables, device, weight_dtype)
                with accelerator.autocast():
                    loss = diffusion_loss(trainables["unet"], noise_scheduler, latents, hidden, generator=generator,
                                          noise_offset=config.noise_offset, snr_gamma=config.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().item() / accum
        lr_scheduler.step()
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
        if on_step is not None:
            on_step(step + 1, step_loss)
        done = step + 1
        if accelerator.is_main_process and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < config.steps:
            unwrapped = {k: accelerator.unwrap_model(m) for k, m in trainables.items()}
            save_checkpoint(checkpoints, done, config, unwrapped, optimizer, lr_scheduler, losses, data_record)

    # -- the result, in diffusers' formats
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_finetuned(out, config, accelerator.unwrap_model(trainables["unet"]),
                        accelerator.unwrap_model(trainables["text_encoder"]) if config.train_text_encoder else None,
                        data_record, losses)
    result = TrainResult(out=out, config=config, losses=losses, seconds=time.time() - started,
                         trainable_parameters=sum(p.numel() for p in params), resumed_from=start_step)
    # free the copies and optimizer state now, so a second fine-tune in the same kernel fits on the GPU
    del trainables, optimizer, params, unet, text_encoder, vae, batch, prepared
    accelerator.free_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _reset_accelerate() -> None:
    """Forget the process-wide state an earlier ``Accelerator`` fixed (its mixed precision): one fine-tune runs at
    a time here, so each may choose its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
