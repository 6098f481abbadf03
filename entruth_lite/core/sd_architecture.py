"""Stable Diffusion 1.5's architecture with random weights, built from its configs kept in the repository
(``entruth_lite/assets/sd15-configs``; nothing downloads).

Why: the GPU path (``load_pipeline`` of SD 1.5, the ``colab-t4`` / ``a100`` presets, LoRA on the UNet and text
encoder) can then be tested on a CPU. ``build_sd15(out, "full")`` is SD 1.5 module for module and parameter for
parameter; ``"narrow"`` keeps every module name, block type, layer count and the attention layout (so LoRA targets
and saved keys are the same as on SD 1.5) but shrinks the channel widths so that a fine-tune runs in seconds.

Where the values come from: the ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` configs and
``model_index.json`` of huggingface.co/runwayml/stable-diffusion-v1-5 (now stable-diffusion-v1-5/stable-diffusion-v1-5),
as vendored in the public mirrors github.com/HDRJ-One/runwayml-stable-diffusion-v1-5 and
github.com/bigdataai-lab/stable-diffusion-v1-5. The text encoder is CLIP ViT-L/14's (openai/clip-vit-large-patch14),
including its legacy token ids (bos 0, eos 2, pad 1). Keys a config file leaves out take diffusers' defaults, as
loading SD 1.5 does.

The tokenizer cannot be downloaded, so ``sd15_tokenizer`` writes one of the real one's shape: CLIP's byte-level
alphabet in CLIP's order (ids 0-511), made-up merges up to the size wanted, ``<|startoftext|>`` and ``<|endoftext|>``
as the last two ids (49406 and 49407 at full size, as in CLIP), 77 tokens, pad = eos. Its ids mean nothing, which
does not matter for weights that are random anyway.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .files import MARKER, atomic_folder, commit_folder

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WIDTHS = ("full", "narrow")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "assets" / "sd15-configs"


def _config(name: str) -> dict:
    """One of SD 1.5's component configs, as its ``<name>/config.json`` (tokenizer: tokenizer_config.json,
    scheduler: scheduler_config.json) gives it, kept in ``entruth_lite/assets/sd15-configs``."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))


SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER, SD15_TOKENIZER, SD15_SCHEDULER = (
    _config(name) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))

# "narrow": what changes from SD 1.5, widths only. Channels keep SD's 1:2:4:4 steps, so the same blocks change
# width and get a ``conv_shortcut`` (same parameter names); four VAE blocks keep vae_scale_factor = 2 ** 3 = 8.
NARROW_UNET = dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=8, cross_attention_dim=64, sample_size=8)
NARROW_VAE = dict(block_out_channels=(16, 32, 64, 64), norm_num_groups=8, sample_size=64)
NARROW_TEXT_ENCODER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=64)
NARROW_VOCAB_SIZE = 1024


def sd15_configs(width: str = "full") -> dict[str, dict]:
    """The component configs (unet, vae, text_encoder, tokenizer, scheduler) at SD 1.5's size or narrow."""
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}, got {width!r}")
    narrow = width == "narrow"
    tokenizer = SD15_TOKENIZER | (dict(vocab_size=NARROW_VOCAB_SIZE) if narrow else {})
    text_encoder = SD15_TEXT_ENCODER | (NARROW_TEXT_ENCODER if narrow else {}) | dict(vocab_size=tokenizer["vocab_size"])
    return dict(
        unet=SD15_UNET | (NARROW_UNET if narrow else {}),
        vae=SD15_VAE | (NARROW_VAE if narrow else {}),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=dict(SD15_SCHEDULER),
    )


# ----------------------------------------------------------------------------- the tokenizer


def _merge_order(alphabet: list[str]) -> list[str]:
    """The alphabet with lowercase letters and digits first: made-up merges then join them before anything else."""
    common = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789" if c in alphabet]
    return common + [c for c in alphabet if c not in common]


def made_up_merges(alphabet: list[str], n: int) -> list[tuple[str, str]]:
    """``n`` valid BPE merges of two alphabet characters (inside a word or word-final), common characters first;
    each makes a new token, so the vocabulary grows by exactly ``n``."""
    order = _merge_order(alphabet)
    merges: list[tuple[str, str]] = []
    for k, newest in enumerate(order):
        for other in order[: k + 1]:
            for a, b in [(newest, other)] + ([(other, newest)] if other != newest else []):
                merges += [(a, b + "</w>"), (a, b)]
        if len(merges) >= n:
            break
    if len(merges) < n:
        raise ValueError(f"the alphabet allows {len(merges)} two-character merges, fewer than {n}")
    return merges[:n]


def tokenizer_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of CLIP's layout: 256 byte characters, the same word-final, merges, then bos and eos."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # CLIP's byte alphabet, in its vocabulary order

    alphabet = list(bytes_to_unicode().values())
    base = alphabet + [c + "</w>" for c in alphabet]
    merges = made_up_merges(alphabet, vocab_size - len(base) - 2)
    tokens = base + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def sd15_tokenizer(config: dict | None = None):
    """A ``CLIPTokenizer`` of the real one's shape (see the module doc), written from scratch."""
    # imported here, not at the top: transformers is slow to import
    from transformers import CLIPTokenizer

    config = config or SD15_TOKENIZER
    vocab, merges = tokenizer_vocab(config["vocab_size"])
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=config["model_max_length"], **special)


def write_vocab_files(folder: Path, tokenizer_config: dict) -> None:
    """``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``: transformers 4.x builds its slow CLIPTokenizer
    from those two files (transformers 5 reads ``tokenizer.json``); same ids either way."""
    vocab, merges = tokenizer_vocab(tokenizer_config["vocab_size"])
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")


# ----------------------------------------------------------------------------- the pipeline


def sd15_components(width: str = "full", seed: int = 0) -> dict:
    """The pipeline's components with random weights; each drawn from its own seed so one does not shift another."""
    # imported here, not at the top: diffusers is slow to import; transformers is slow to import
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd15_configs(width)  # the text encoder's vocab_size is the tokenizer's
    tokenizer = sd15_tokenizer(configs["tokenizer"])
    torch.manual_seed(seed * 3)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed * 3 + 1)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(seed * 3 + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=PNDMScheduler.from_config(configs["scheduler"]))  # keeps clip_sample for DDIM


def build_sd15(out_dir: str | os.PathLike, width: str = "full", seed: int = 0) -> Path:
    """Save a ``StableDiffusionPipeline`` of SD 1.5's architecture with random (seeded) weights to ``out_dir``
    (safetensors, no safety checker; an earlier build there is replaced), written under a temporary name and renamed
    into place so a killed build leaves no half model; ``load_pipeline(out_dir)`` reads it."""
    # imported here, not at the top: diffusers is slow to import
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    pipe = StableDiffusionPipeline(**sd15_components(width, seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = atomic_folder(out, overwrite=True, ours=(MARKER, "model_index.json"))  # a test model: rebuilt at will
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_vocab_files(tmp / "tokenizer", sd15_configs(width)["tokenizer"])
        commit_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
