"""The infringer's fine-tuning: one loop for LoRA and full fine-tunes, CPU and GPU, run through accelerate.

It follows diffusers' ``train_text_to_image_lora.py`` (latents, noise, the scheduler's target, AdamW, an LR
schedule, LoRA adapters from peft) and adds what a long run on a Colab GPU needs: checkpoints that resume a killed
run exactly, and outputs written atomically (``checkpoints``). The settings are a ``presets.TrainConfig``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core import files
from ..core.augmentation import augment
from ..core.data import crop_to_square, images_to_tensor, load_imagefolder
from ..core.diffusion import diffusion_loss, encode_captions, encode_images, encode_posterior, sample_latents, tokenize
from ..core.files import atomic_write, check_writable_parent
from ..core.models import (
    LORA_WEIGHTS_NAME,
    default_resolution,
    images_per_batch,
    is_pipeline_of,
    launched_processes,
    load_pipeline,
    place,
)
from ..core.progress import tqdm
from .checkpoints import dataset_fingerprint, is_current, latest_checkpoint, load_checkpoint, save_checkpoint, save_lora
from .presets import LORA_TEXT_TARGETS, TrainConfig, preset


@dataclass
class TrainResult:
    out: Path
    config: TrainConfig
    losses: list[float]
    seconds: float
    trainable_parameters: int
    resumed_from: int = 0
    processes: int = 1  # accelerate's processes: each step saw processes x batch x accumulation images

    @property
    def global_batch(self) -> int:
        return self.processes * self.config.batch_size * self.config.gradient_accumulation_steps


# ----------------------------------------------------------------------------- data


def prepare_images(dataset, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` and crop the centre (or top-left): (N, 3, R, R) in [-1, 1]."""
    images = dataset.images() if hasattr(dataset, "images") else dataset
    return images_to_tensor(crop_to_square(image, resolution, center_crop)
                            for image in tqdm(images, desc="loading images", disable=len(dataset) < 500))


def check_resolution(resolution: int, pipe) -> None:
    factor = pipe.vae_scale_factor
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution {resolution} must be a positive multiple of the VAE factor {factor}")


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """All randomness of one micro-batch comes from (seed, step, micro): resuming replays it exactly. Under
    several processes ``micro`` counts the step's micro-batches across them (``global_micro``), so P processes at
    accumulation A draw what one process draws at accumulation A x P."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + micro) * 31)


def global_micro(micro: int, process: int, n_processes: int) -> int:
    """The index, within its step, of process ``process``'s ``micro``-th micro-batch among all processes' ones."""
    return micro * n_processes + process


def augment_pixels(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Strong augmentation of a batch in [-1, 1]: ``augmentation.augment``'s random draw for each image."""
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


def _peft_config(rank: int, alpha: float | None, targets, use_dora: bool = False):
    # imported here, not at the top: peft is slow to import
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets),
                      use_dora=use_dora)


def ensure_finetuned(data: str | os.PathLike, out: str | os.PathLike, config: TrainConfig, pipe=None,
                     progress: bool = True) -> TrainResult | None:
    """Fine-tune unless ``out`` already holds this exact run (``is_current``); a run killed before it finished
    continues from its newest checkpoint. Returns the new result, or None when the finished run was reused."""
    if is_current(out, config, data, processes=launched_processes()):
        return None
    return finetune(data, out, config, pipe=pipe, overwrite=True, resume="latest", progress=progress)


# ----------------------------------------------------------------------------- the loop


def _optimizer(params, config: TrainConfig):
    if config.use_8bit_adam:
        try:
            # imported here, not at the top: optional package
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError("use_8bit_adam needs bitsandbytes (pip install bitsandbytes), which is not installed") from error
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)


@dataclass
class TrainingData:
    """What the loop reads: pixels, token ids, and (encoders frozen) cached latents and text embeddings."""

    pixels: torch.Tensor | None  # None once the latents are cached
    ids: torch.Tensor
    empty_ids: torch.Tensor
    latents: torch.Tensor | None = None
    flipped: torch.Tensor | None = None  # latents of the mirrored images (random_flip)
    latent_stds: torch.Tensor | None = None  # sample_latents: the posterior's standard deviations (and of the mirrored)
    flipped_stds: torch.Tensor | None = None
    views: torch.Tensor | None = None  # latents of augmented views (augment_views)
    embeddings: torch.Tensor | None = None  # frozen text encoder: the captions' hidden states
    empty_embedding: torch.Tensor | None = None


def _prepare_data(dataset, tokenizer, vae, config: TrainConfig, resolution: int, device, weight_dtype) -> TrainingData:
    """Pixels at ``resolution`` and token ids; latents encoded once when ``cache_latents``."""
    batch = TrainingData(prepare_images(dataset, resolution, config.center_crop), tokenize(tokenizer, dataset.captions),
                         tokenize(tokenizer, [""]))
    place(vae.requires_grad_(False), device, weight_dtype)
    if config.cache_latents:
        batch.latents, stds = encode_posterior(vae, batch.pixels)
        batch.latent_stds = stds if config.sample_latents else None
        if config.random_flip:
            batch.flipped, stds = encode_posterior(vae, batch.pixels.flip(-1))
            batch.flipped_stds = stds if config.sample_latents else None
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
        # imported here, not at the top: diffusers is slow to import
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
        stds = None if batch.latent_stds is None else batch.latent_stds[index].clone()
        if flip is not None:
            latents[flip] = batch.flipped[index][flip]
            if stds is not None:
                stds[flip] = batch.flipped_stds[index][flip]
        if batch.views is not None:
            latents = batch.views[torch.randint(len(batch.views), (len(index),), generator=generator), index]
        return latents if stds is None else sample_latents(latents, stds, generator)
    pixels = batch.pixels[index].clone()
    if flip is not None:
        pixels[flip] = pixels[flip].flip(-1)
    if config.augment_views:
        pixels = augment_pixels(pixels, generator)
    if config.sample_latents:
        return sample_latents(*encode_posterior(vae, pixels), generator)
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
        atomic_write(out / ".lora", lambda tmp: save_lora(tmp, unet, text_encoder))
        os.replace(out / ".lora" / LORA_WEIGHTS_NAME, out / LORA_WEIGHTS_NAME)
        shutil.rmtree(out / ".lora")
    else:
        atomic_write(out / "unet", lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))
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
    snapshots: tuple[int, ...] = (),
) -> TrainResult:
    """Fine-tune a text-to-image model on an imagefolder, LoRA or full, as diffusers' training script does.

    Writes ``out/pytorch_lora_weights.safetensors`` (LoRA) or ``out/unet/`` (full), ``out/train_config.json``,
    ``out/train_data.json`` (the data's fingerprint) and ``out/loss_history.json``; checkpoints go to ``out/checkpoints/step-N`` every ``checkpoint_every``
    steps. ``resume="latest"`` continues from the newest checkpoint with identical results on the CPU.
    ``pipe`` (optional) is a loaded base pipeline; it is not modified. ``on_step(step, loss)`` is called
    after every optimizer step. ``device="cpu"`` keeps a run on the CPU when a GPU is present. ``snapshots``: steps
    after which the weights are also saved as a finished run would be, in ``out/snapshots/step-N`` (a curve along
    one run; they do not change the run).
    """

    # imported here, not at the top: accelerate is slow to import; diffusers is slow to import
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    # -- setup: settings, data, the accelerator, private copies of the base model
    config = config or preset("tiny-cpu")
    out = Path(out)
    if resume not in (None, "latest"):
        raise ValueError(f"resume must be None or 'latest', got {resume!r}")
    if out.exists() and any(out.iterdir()) and resume is None and not overwrite:
        raise FileExistsError(f"{out} is not empty: resume it (resume='latest'; CLI --resume latest) or replace it "
                              "(overwrite=True; CLI --overwrite)")
    files.check_replaceable(out, (files.MARKER, "train_config.json", "checkpoints"))  # only a fine-tune's own folder
    dataset = load_imagefolder(data)
    check_writable_parent(out)
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if config.mixed_precision != "no" and on_cpu:
        raise ValueError(f"mixed_precision={config.mixed_precision!r} needs a CUDA GPU; use 'no' on the CPU")
    _reset_accelerate()  # an earlier run in this kernel (e.g. notebook 02's LoRA in fp16) fixed its own precision
    # cpu=True also when processes were launched on a machine without CUDA: only then does accelerate join them
    # (gloo); on its own a CPU process keeps cpu=False, so a Mac's MPS stays available
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              cpu=device == "cpu" or (on_cpu and launched_processes() > 1),
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    device, n_processes = accelerator.device, accelerator.num_processes
    # which data exactly, and on how many processes (the global batch): a resume or a reuse must match both
    data_record = {"data": str(Path(data).resolve()), "sha256": dataset_fingerprint(data), "processes": n_processes}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        files.adopt(out)
    accelerator.wait_for_everyone()
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
    n, accum, process = len(batch.ids), config.gradient_accumulation_steps, accelerator.process_index
    for module in trainables.values():
        module.train()
    started = time.time()
    bar = tqdm(range(start_step, config.steps), desc=f"fine-tuning ({config.method})", initial=start_step,
               total=config.steps, disable=not progress or not accelerator.is_local_main_process, mininterval=2)
    for step in bar:
        step_loss = 0.0
        for micro in range(accum):
            generator = step_generator(config.seed, step, global_micro(micro, process, n_processes))
            index = batch_indices(n, config.batch_size, step * accum * n_processes
                                  + global_micro(micro, process, n_processes), config.seed)
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
        if n_processes > 1:  # the step's loss over every process's micro-batches, as one process would log it
            step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), reduction="mean").item()
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
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            accelerator.wait_for_everyone()  # a process killed now finds the checkpoint whole, whichever it was
        if accelerator.is_main_process and done in snapshots:
            _save_finetuned(snapshot_folder(out, done), config, accelerator.unwrap_model(trainables["unet"]),
                            accelerator.unwrap_model(trainables["text_encoder"]) if config.train_text_encoder else None,
                            data_record, losses)

    # -- the result, in diffusers' formats
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_finetuned(out, config, accelerator.unwrap_model(trainables["unet"]),
                        accelerator.unwrap_model(trainables["text_encoder"]) if config.train_text_encoder else None,
                        data_record, losses)
    result = TrainResult(out=out, config=config, losses=losses, seconds=time.time() - started,
                         trainable_parameters=sum(p.numel() for p in params), resumed_from=start_step,
                         processes=n_processes)
    # free the copies and optimizer state now, so a second fine-tune in the same kernel fits on the GPU
    del trainables, optimizer, params, unet, text_encoder, vae, batch, prepared
    accelerator.free_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def snapshot_folder(out: str | os.PathLike, step: int) -> Path:
    """Where ``finetune(snapshots=...)`` saves the weights after ``step`` (loadable like the run's own folder)."""
    return Path(out) / "snapshots" / f"step-{step:07d}"


def _reset_accelerate() -> None:
    """Forget the process-wide state an earlier ``Accelerator`` fixed (its mixed precision): one fine-tune runs at
    a time here, so each may choose its own."""
    # imported here, not at the top: accelerate is slow to import
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
