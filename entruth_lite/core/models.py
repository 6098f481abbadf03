"""One way to get a text-to-image pipeline: real Stable Diffusion on a GPU, or the shipped tiny one on CPU.

``load_pipeline("tiny")`` assembles a diffusers ``StableDiffusionPipeline`` from the components stored in
``entruth_lite/assets/tiny-sd`` (the same classes as Stable Diffusion: CLIPTokenizer, CLIPTextModel,
AutoencoderKL, UNet2DConditionModel, DDIMScheduler), so every notebook has a single code path.
Weights are read with safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # entruth_lite/
REPO_ROOT = PACKAGE_ROOT.parent
ASSETS = PACKAGE_ROOT / "assets"  # package data: reachable after a plain pip install
TINY_MODEL_DIR = ASSETS / "tiny-sd"
TINY_ALIASES = {"tiny", "tiny-sd"}
TINY_RESOLUTION = 32
TINY_MAX_TOKENS = 32
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name

# SD-2-style noise schedule: in a trial here DDPM defaults (linear betas, epsilon) gave colour noise.
TINY_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="trailing",
)


def launched_processes() -> int:
    """How many processes ``accelerate launch`` (or torchrun) started this one among; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_launched_process() -> bool:
    """True in the process that writes and prints (rank 0), or when run directly."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU; ``preferred`` (or env ``ENTRUTH_DEVICE``) overrides."""
    preferred = preferred or os.environ.get("ENTRUTH_DEVICE")
    if preferred:
        return torch.device(preferred)
    if torch.cuda.is_available():  # under accelerate launch, each process its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if launched_processes() > 1 \
            else torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- tiny component configs


def tiny_text_encoder_config(vocab_size: int):
    # imported here, not at the top: transformers is slow to import
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=64,
    )


def tiny_vae():
    # imported here, not at the top: diffusers is slow to import
    from diffusers import AutoencoderKL

    # 8 latent channels: in a trial, 4-channel VAEs this small blurred away coarse patterns.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        mid_block_add_attention=False,
    )


def tiny_unet(cross_attention_dim: int = 64):
    # imported here, not at the top: diffusers is slow to import
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_scheduler(kind: str = "ddim"):
    # imported here, not at the top: diffusers is slow to import
    from diffusers import DDIMScheduler, DDPMScheduler

    # from_config drops the keys a scheduler class does not take (DDPM has no set_alpha_to_one)
    return DDIMScheduler(**TINY_SCHEDULER_CONFIG) if kind == "ddim" else DDPMScheduler.from_config(TINY_SCHEDULER_CONFIG)


# ----------------------------------------------------------------------------- loading


def _is_tiny(name: str | os.PathLike) -> bool:
    return str(name) in TINY_ALIASES


def _dtype_argument(dtype: torch.dtype) -> dict:
    """Newer diffusers take ``dtype=`` and deprecate ``torch_dtype=``; older releases know only ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  present where dtype= exists
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_pipeline(
    name_or_path: str | os.PathLike = "tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
    config: str | os.PathLike | None = None,
):
    """A ``StableDiffusionPipeline`` for ``"tiny"``, a hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``),
    a local ``save_pretrained`` folder, or a single-file checkpoint (``.safetensors`` in the original / A1111 layout,
    read with diffusers' ``from_single_file``; ``config``: a pipeline folder or hub id whose configs describe its
    architecture, else diffusers infers them, which needs the hub). fp16 on CUDA for real models, fp32 elsewhere;
    safetensors only."""
    # imported here, not at the top: diffusers is slow to import
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = pick_device(str(device) if device is not None else None)
    path = TINY_MODEL_DIR if _is_tiny(name_or_path) else name_or_path
    if _is_tiny(name_or_path) and not (TINY_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the tiny model is missing at {TINY_MODEL_DIR}; rebuild it with `entruth-lite zoo build-tiny`"
        )
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" and not _is_tiny(name_or_path) else torch.float32
    if local_files_only is None:
        local_files_only = Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
    settings = dict(**_dtype_argument(dtype), safety_checker=None, requires_safety_checker=False,
                    local_files_only=local_files_only)
    if Path(path).is_file():
        pipe = _from_single_file(Path(path), config, settings)
    elif Path(path).is_dir():
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, use_safetensors=True, **settings)
        except OSError as error:
            refuse_pickles(Path(path))  # the weights it found are pickles: say so and why, not diffusers' traceback
            raise FileNotFoundError(f"{path} is not a complete pipeline folder with safetensors weights "
                                    f"({str(error).splitlines()[0]})") from error
    else:  # a hub id: from the local cache when offline
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(path), use_safetensors=True, **settings)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(f"no model at {path}: not a pipeline folder or checkpoint file here, and not a "
                                    f"hub id that could be loaded ({str(error).splitlines()[0]})") from error
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.vae.enable_slicing()  # decode a batch one image at a time: 512 px batches fit a small GPU
    return pipe.to(device)


def _from_single_file(path: Path, config, settings: dict):
    """A whole pipeline from one checkpoint file, refused unless it is safetensors with finite weights."""
    # imported here, not at the top: diffusers is slow to import
    from diffusers import StableDiffusionPipeline

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is a pickle file; pickles can run code when loaded, so entruth-lite reads "
                         "safetensors only: convert it to .safetensors first")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors checkpoint")
    read_safetensors(path)  # a clear error for a broken file or NaN weights
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(config) if config is not None else None, **settings)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        hint = "" if config is not None else " (give the base model's configs: --config DIR or a hub id)"
        raise ValueError(f"{path} is not a Stable Diffusion checkpoint this loader can read: {error}{hint}") from error


def model_source(name_or_path: str | os.PathLike) -> str:
    """Where ``load_pipeline(name_or_path)`` reads a model from: the tiny model's folder, a local folder (resolved)
    or a hub id."""
    if _is_tiny(name_or_path):
        return str(TINY_MODEL_DIR.resolve())
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else str(name_or_path)


def is_pipeline_of(pipe, name_or_path: str | os.PathLike) -> bool | None:
    """Whether ``pipe`` was loaded from ``name_or_path``; None when the pipeline does not say (built in memory)."""
    loaded_from = str(getattr(pipe.config, "_name_or_path", "") or "")
    if not loaded_from:
        return None
    return model_source(loaded_from) == model_source(name_or_path)


def default_resolution(pipe) -> int:
    """Image side the pipeline was trained at: 32 for the tiny model, 512 for SD 1.5."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def folder_resolution(folder: str | os.PathLike) -> int | None:
    """``default_resolution`` of a diffusers pipeline folder, read from its configs without loading it (None when
    ``folder`` is not one, e.g. a single-file checkpoint or a hub id)."""
    unet, vae = Path(folder) / "unet" / "config.json", Path(folder) / "vae" / "config.json"
    if not (unet.is_file() and vae.is_file()):
        return None
    blocks = len(json.loads(vae.read_text()).get("block_out_channels", [0]))
    return int(json.loads(unet.read_text())["sample_size"]) * 2 ** (blocks - 1)


def images_per_batch(side: int, at_32px: int) -> int:
    """A batch size that keeps the pixels per batch of ``at_32px`` images of 32 px at any image side: the tiny
    model's batches unchanged, one image at a time at 512 px (a T4's memory)."""
    return max(1, at_32px * 32 * 32 // (int(side) ** 2))


@torch.no_grad()
def vae_reconstruct(vae, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Encode (latent means) and decode images in [-1, 1] on the VAE's device and dtype; returns CPU float.
    What survives this round trip is the most a latent diffusion model can learn of a template. ``batch_size``:
    by default sized to the images (``images_per_batch``)."""
    batch_size = batch_size or images_per_batch(images.shape[-1], 64)
    param = next(vae.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(param.device, param.dtype)
        out.append(vae.decode(vae.encode(batch).latent_dist.mean).sample.float().cpu())
    return torch.cat(out)


def place(module, device, dtype):
    """Move a module; change its dtype only when needed (diffusers warns on needless casts)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


# ----------------------------------------------------------------------------- a suspect's weights (untrusted)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickles(folder: Path) -> None:
    """A suspect's weights are untrusted: only safetensors are read, pickle files are refused outright."""
    folder = Path(folder)
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds pickle weight files ({', '.join(pickles)}); pickles can run code when loaded, "
            "so entruth-lite reads safetensors only: convert them to .safetensors first"
        )


def read_safetensors(path: Path) -> dict:
    """Every tensor of a safetensors file, with a clear error naming a file that is not one (empty, truncated,
    a bad header) or whose tensors hold NaN or infinite values (broken weights prove nothing either way)."""
    try:
        state = load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError and OSError variants
        raise _unreadable(path, error) from error
    check_finite(state.items(), path)
    return state


def _unreadable(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file ({error}): it is empty, truncated or not safetensors")


def check_finite(named_tensors, path: Path) -> None:
    """Refuse weights holding NaN or infinite values, naming the file and a tensor."""
    broken = [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise ValueError(f"{path} holds NaN or infinite values in {len(broken)} tensor(s) (e.g. {broken[0]!r}): the "
                         "weights are broken, and an audit of them could neither clear nor accuse anyone")


def load_finetuned(pipe, weights: str | os.PathLike):
    """Apply fine-tuned weights to a base pipeline, in place: a LoRA folder, a full fine-tune's ``unet/``, or a
    single LoRA file as model-sharing sites publish them (diffusers' or kohya / AUTOMATIC1111's key layout, UNet and
    text-encoder parts, each module's alpha honoured: diffusers' own loader converts it).

    Raises if a file is a pickle (refused without being opened), is not valid safetensors, holds NaN or infinite
    values, or does not fit the base architecture (missing or unexpected keys)."""
    weights = Path(weights)
    if weights.is_file():
        if weights.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"{weights} is a pickle file; pickles can run code when loaded, so entruth-lite reads "
                             "safetensors only: convert it to .safetensors first")
        if weights.suffix.lower() != ".safetensors":
            raise ValueError(f"{weights} is not a .safetensors file: give a LoRA .safetensors file or a weights folder")
        _load_lora_strict(pipe, weights)
        return pipe
    if not weights.is_dir():
        raise FileNotFoundError(f"weights folder or file not found: {weights}")
    refuse_pickles(weights)
    if (weights / LORA_WEIGHTS_NAME).is_file():
        _load_lora_strict(pipe, weights / LORA_WEIGHTS_NAME)
    elif (weights / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        # imported here, not at the top: diffusers is slow to import
        from diffusers import UNet2DConditionModel

        if not (weights / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"{weights / 'unet' / 'config.json'} is missing: a full fine-tune's unet/ folder "
                                    "needs the config.json that save_pretrained writes beside the weights")
        file = weights / "unet" / "diffusion_pytorch_model.safetensors"
        try:
            unet = UNet2DConditionModel.from_pretrained(weights / "unet", use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise _unreadable(file, error) from error
        check_finite(unet.named_parameters(), file)
        if _architecture(unet.config) != _architecture(pipe.unet.config):
            raise ValueError(f"{weights / 'unet'} is a UNet of another architecture than the base model's")
        pipe.unet = place(unet, pipe.device, pipe.unet.dtype)
    else:
        raise FileNotFoundError(
            f"{weights} holds neither {LORA_WEIGHTS_NAME} (LoRA) nor unet/diffusion_pytorch_model.safetensors (full)"
        )
    return pipe


def _architecture(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _load_lora_strict(pipe, file: Path) -> None:
    """Load one LoRA file, refusing it unless every module it adapts exists in the base model (diffusers would skip
    a stray module with a warning, and a partly applied LoRA is not the suspect model)."""
    read_safetensors(file)  # a clear error for a broken file or NaN weights, before diffusers reads it
    try:  # diffusers' key layout, whatever the file's (kohya / A1111 keys are converted here)
        state, _ = pipe.lora_state_dict(str(file.parent), weight_name=file.name)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"{file} is not a LoRA this loader knows ({error})") from error
    if not any(k.startswith(("unet.", "text_encoder.")) for k in state):
        raise ValueError(f"{file} holds no UNet or text-encoder LoRA weights (e.g. {next(iter(state), 'nothing')!r})")
    # imported here, not at the top: diffusers is slow to import
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    # peft's key layout, as diffusers converts each part before loading it (older layouts name modules otherwise)
    to_peft = {"unet.": convert_unet_state_dict_to_peft,
               "text_encoder.": lambda sd: convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))}
    for prefix, part, label in (("unet.", pipe.unet, "UNet"), ("text_encoder.", pipe.text_encoder, "text encoder")):
        base_modules = {_unnested(name) for name, _ in part.named_modules()}
        part_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part_state:  # a LoRA of the UNet only (or of the text encoder only)
            continue
        peft_keys = to_peft[prefix](part_state)
        targets = {_unnested(_module_of(prefix + k, prefix)) for k in peft_keys}
        missing = sorted(targets - base_modules)
        if missing:
            raise ValueError(
                f"{file} does not fit this model: {len(missing)} LoRA target modules are not "
                f"in its {label} (e.g. {missing[0]!r}); it was trained for another architecture"
            )
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.ERROR))  # a misfit file makes the loaders log every tensor: the error says it
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"{file} does not fit this model: {loader_error(error)}") from error
    finally:
        logging.disable(disabled)
    _set_text_encoder_dora_magnitudes(pipe.text_encoder, state, file)


def loader_error(error: Exception) -> str:
    """A loader's error in one line: torch lists every tensor of the wrong shape, one a line; name the first and
    count them."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mismatched = [line for line in lines if line.startswith("size mismatch")]
    if mismatched:
        return (f"{len(mismatched)} tensor(s) have another shape than the model's (e.g. {mismatched[0]}): it was "
                "trained for another architecture or rank")
    return lines[0] if lines else type(error).__name__


def _set_text_encoder_dora_magnitudes(text_encoder, state: dict, file: Path) -> None:
    """A DoRA of the text encoder learns a norm per output of each adapted layer; transformers' loader drops these
    (its key names a ``.weight`` the file's key has not) and leaves the norms at their untrained start, which would
    audit another model than the suspect's. Set them from the file, for the adapter just loaded."""
    suffix = ".lora_magnitude_vector"
    wanted = {_unnested(k[len("text_encoder."):-len(suffix)]): v
              for k, v in state.items() if k.startswith("text_encoder.") and k.endswith(suffix)}
    if not wanted:
        return
    layers = {_unnested(name): module for name, module in text_encoder.named_modules()}
    adapter = list(text_encoder.peft_config)[-1]
    for name, magnitude in wanted.items():
        vectors = getattr(layers.get(name), "lora_magnitude_vector", None)
        if vectors is None or adapter not in vectors or vectors[adapter].weight.shape != magnitude.shape:
            raise ValueError(f"{file} has a DoRA magnitude for text-encoder layer {name!r} that this model cannot take")
        with torch.no_grad():
            vectors[adapter].weight.copy_(magnitude.to(vectors[adapter].weight))


def _module_of(key: str, prefix: str = "unet.") -> str:
    """'unet.down_blocks.1.attentions.0...to_q.lora.down.weight' -> the module path of the base layer in the part
    ``prefix`` names (text-encoder keys end in '.lora_linear_layer.down.weight')."""
    key = key[len(prefix):]
    for marker in (".lora_A", ".lora_B", ".lora.down", ".lora.up", ".lora_linear_layer", ".lora_magnitude_vector"):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def _unnested(name: str) -> str:
    """transformers 4 nests CLIPTextModel's layers under ``text_model.``, 5 does not; diffusers loads either."""
    return name.removeprefix("text_model.")
