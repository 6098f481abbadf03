"""What a fine-tune leaves on disk: its LoRA in diffusers' format, checkpoints that resume a killed run exactly
(safetensors and JSON, written atomically), and the fingerprint of the data it trained on."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.data import METADATA, read_metadata
from ..core.files import atomic_write
from ..core.models import LORA_WEIGHTS_NAME
from .presets import TrainConfig


def save_lora(out: Path, unet, text_encoder=None) -> Path:
    """diffusers' format: ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(out)`` reads, with each
    adapter's LoRA config (rank, alpha, targets) in the file's metadata, as diffusers' training scripts write it, so
    a LoRA whose alpha is not its rank is loaded at the scale it was trained at."""
    # imported here, not at the top: diffusers is slow to import; peft is slow to import
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
    digest = hashlib.sha256()
    root = Path(folder)
    for name in [METADATA] + sorted(record.file_name for record in read_metadata(root)):
        digest.update(name.encode() + b"\0" + hashlib.sha256((root / name).read_bytes()).digest())
    return digest.hexdigest()


def is_current(out: str | os.PathLike, config: TrainConfig, data: str | os.PathLike, processes: int = 1) -> bool:
    """True when ``out`` holds a finished fine-tune with these settings on exactly this data, on as many processes
    (the same global batch), so it can be reused."""
    out = Path(out)
    try:
        saved = TrainConfig(**json.loads((out / "train_config.json").read_text()))
        record = json.loads((out / "train_data.json").read_text())
        trained_on = record["sha256"]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return False
    return saved.fingerprint() == config.fingerprint() and trained_on == dataset_fingerprint(data) \
        and record.get("processes", 1) == processes


def saved_losses(folder: str | os.PathLike) -> list[float]:
    """The loss history a finished fine-tune saved (to plot a run that was reused, not retrained)."""
    return json.loads((Path(folder) / "loss_history.json").read_text())


def save_checkpoint(folder: Path, step: int, config: TrainConfig, trainables: dict[str, torch.nn.Module],
                    optimizer, lr_scheduler, losses: list[float], data: dict | None = None) -> Path:
    """Trainable weights and optimizer tensors in safetensors, the rest in JSON; written atomically."""
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
    atomic_write(target, write)
    return target


def _trainable_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def latest_checkpoint(folder: Path) -> Path | None:
    candidates = sorted(Path(folder).glob("step-*"))
    candidates = [c for c in candidates if (c / "state.json").is_file()]
    return candidates[-1] if candidates else None


def load_checkpoint(path: Path, config: TrainConfig, trainables: dict[str, torch.nn.Module], optimizer,
                    lr_scheduler, data: dict | None = None) -> tuple[int, list[float]]:
    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != config.fingerprint():
        raise ValueError(f"checkpoint {path} was made with other training settings; "
                         "resume with the same settings or start a new output folder")
    saved = state.get("data")
    if data is not None and saved is not None and saved["sha256"] != data["sha256"]:
        raise ValueError(f"checkpoint {path} was trained on {saved['data']}, not on {data['data']} (their files "
                         "differ): resume on the same data, or start a new output folder")
    written_on, resuming_on = (saved or {}).get("processes", 1), (data or {}).get("processes", 1)
    if written_on != resuming_on:
        raise ValueError(f"checkpoint {path} was written by a run on {written_on} process(es), and this one has "
                         f"{resuming_on}: the global batch would change mid-run. Resume with `accelerate launch "
                         f"--num_processes {written_on}`, or start a new output folder")
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
