"""Rebuild the shipped tiny Stable-Diffusion components (``entruth-lite zoo build-tiny``).

Steps, all seeded: (1) a byte-level BPE ``CLIPTokenizer`` trained on every emoji caption; (2) an
``AutoencoderKL`` trained to reconstruct the pretraining emoji plus random coarse shapes (frames, bars,
blocks) so that a template's frame survives the round trip, its posterior then narrowed to about 1 % of the latent
spread (``narrow_posterior``: nearly deterministic, as Stable Diffusion's VAE is; the means stay exactly as they
were); (3) a ``UNet2DConditionModel`` and the small
``CLIPTextModel`` pretrained jointly on the pretraining corpus only (the owner's images are never seen),
with 10% caption dropout for classifier-free guidance and an EMA of the UNet weights.

The tokenizer is committed and reused: byte-level BPE training is not deterministic across processes,
so rebuilding it would change token ids and detach a trained text encoder from its prompts.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import data, emoji, files, models
from .diffusion import diffusion_loss, encode_images, tokenize
from .progress import tqdm

CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass
class TinyBuildConfig:
    vocab_size: int = 2048
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_shapes_share: float = 0.3
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    # the VAE's posterior sigma, as a share of the latent spread, after training (``narrow_posterior``): nearly
    # deterministic, as Stable Diffusion's VAE is, so that trainers encoding with latent_dist.sample() see the data
    posterior_relative_sigma: float = 0.01


def build_tokenizer(captions: list[str], vocab_size: int = 2048):
    """Train a CLIP-style byte-level BPE (CLIP's normaliser and pre-tokeniser, ``</w>`` word ends) and save
    it as a ``CLIPTokenizer``; every byte, alone or word-final, is in the vocabulary, so no text is unknown."""
    # imported here, not at the top: tokenizers is needed only to build the tokenizer; transformers is slow to import
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import CLIPTokenizer

    bpe = Tokenizer(
        tok_models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
    )
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    with tempfile.TemporaryDirectory() as raw:
        bpe.model.save(raw)
        vocab = json.loads(Path(raw, "vocab.json").read_text())
        for char in alphabet:
            for token in (char, char + "</w>"):
                vocab.setdefault(token, len(vocab))
        Path(raw, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        return CLIPTokenizer(str(Path(raw, "vocab.json")), str(Path(raw, "merges.txt")),
                             model_max_length=models.TINY_MAX_TOKENS)


def write_vocab_files(folder: Path) -> None:
    """Add ``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``: transformers 4.x (e.g. on Colab) builds a
    slow ``CLIPTokenizer`` from those two files, transformers 5 reads ``tokenizer.json``; same ids either way."""
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def random_shapes(n: int, size: int, generator: np.random.Generator) -> torch.Tensor:
    """Coarse synthetic images (flat fields, rectangles, frames, block rings) in [-1, 1] for VAE training."""
    images = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        image = np.broadcast_to(generator.uniform(0, 1, 3), (size, size, 3)).copy()
        for _ in range(generator.integers(1, 5)):
            x0, y0 = generator.integers(0, size - 2, 2)
            x1, y1 = x0 + generator.integers(2, size - x0 + 1), y0 + generator.integers(2, size - y0 + 1)
            colour = generator.uniform(0, 1, 3)
            if generator.random() < 0.5:
                image[y0:y1, x0:x1] = colour
            else:
                width = int(generator.integers(1, 5))
                image[y0:y1, x0 : x0 + width] = colour
                image[y0:y1, max(x1 - width, x0) : x1] = colour
                image[y0 : y0 + width, x0:x1] = colour
                image[max(y1 - width, y0) : y1, x0:x1] = colour
        if generator.random() < 0.3:  # a ring of alternating colour blocks, like a billboard's lights
            block, width = int(generator.integers(2, 6)), int(generator.integers(2, 6))
            colours = generator.uniform(0, 1, (3, 3))
            yy, xx = np.mgrid[0:size, 0:size]
            ring = (np.minimum.reduce([yy, xx, size - 1 - yy, size - 1 - xx]) < width)
            index = ((yy // block) + (xx // block)) % 3
            image[ring] = colours[index[ring]]
        images[i] = image
    return torch.from_numpy(images * 2 - 1).permute(0, 3, 1, 2).contiguous()


def train_vae(images: torch.Tensor, config: TinyBuildConfig, log=print, device="cpu"):
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    vae = models.tiny_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps, eta_min=config.vae_lr * 0.05)
    n_shapes = int(round(config.vae_batch * config.vae_shapes_share))
    bar = tqdm(range(config.vae_steps), desc="VAE", mininterval=5)
    for step in bar:
        index = torch.from_numpy(rng.integers(0, len(images), config.vae_batch - n_shapes))
        batch = torch.cat([images[index], random_shapes(n_shapes, images.shape[-1], rng)]).to(device)
        if rng.random() < 0.5:
            batch = batch.flip(-1)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (reconstruction - batch).pow(2).mean() + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 250 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=1.0)
    raw_latents = encode_images(vae, images)  # unscaled: encode_images multiplies by scaling_factor (now 1)
    vae.register_to_config(scaling_factor=float(1.0 / raw_latents.std()))
    return vae


@torch.no_grad()
def posterior_spread(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(mean posterior sigma, standard deviation of the posterior means) over ``images`` in [-1, 1], unscaled: how far
    a latent drawn with ``latent_dist.sample()`` (what diffusers' training scripts encode with) strays from the mean
    (what the base UNet was trained on), against how much the means themselves vary."""
    sigmas, means = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start:start + batch_size]).latent_dist
        sigmas.append(posterior.std.flatten())
        means.append(posterior.mean.flatten())
    return float(torch.cat(sigmas).mean()), float(torch.cat(means).std())


@torch.no_grad()
def narrow_posterior(vae, images: torch.Tensor, relative_sigma: float) -> float:
    """Make the VAE's posterior sigma ``relative_sigma`` of the latent spread on ``images`` (mean over latents) and
    leave its means exactly as they are: only the log-variance half of ``quant_conv``'s bias moves, so every sigma
    scales by one factor (returned). A briefly trained VAE keeps a wide posterior; Stable Diffusion's is nearly
    deterministic, and a trainer that encodes with ``sample()`` should see the data, not the VAE's noise."""
    if not 0 < relative_sigma < 1:
        raise ValueError(f"relative_sigma must be in (0, 1), got {relative_sigma}")
    if vae.quant_conv is None:
        raise ValueError("the VAE has no quant_conv (use_quant_conv=False): its log-variance cannot be moved alone")
    sigma, spread = posterior_spread(vae, images)
    factor = relative_sigma * spread / sigma
    vae.quant_conv.bias[vae.config.latent_channels:] += 2 * math.log(factor)  # logvar: sigma = exp(logvar / 2)
    return factor


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def pretrain_base(tokenizer, vae, images: torch.Tensor, captions: list[str], config: TinyBuildConfig, log=print,
                  device="cpu"):
    """Jointly pretrain the UNet and the text encoder on cached latents; returns (text_encoder, EMA UNet)."""
    # imported here, not at the top: diffusers is slow to import; transformers is slow to import
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    text_encoder = CLIPTextModel(models.tiny_text_encoder_config(len(tokenizer))).to(device)
    unet = models.tiny_unet(cross_attention_dim=text_encoder.config.hidden_size).to(device)
    scheduler = models.tiny_scheduler("ddpm")
    latents = encode_images(vae, images).to(device)
    ids = tokenize(tokenizer, captions).to(device)
    empty_ids = tokenize(tokenizer, [""]).to(device)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    warmup = min(200, config.unet_steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, config.unet_steps) / config.unet_steps)),
    )
    unet.train()
    text_encoder.train()
    bar = tqdm(range(config.unet_steps), desc="UNet", mininterval=5)
    for step in bar:
        index = torch.from_numpy(rng.integers(0, len(latents), config.unet_batch)).to(device)
        batch_ids = ids[index].clone()
        drop = torch.from_numpy(rng.random(config.unet_batch) < config.caption_dropout).to(device)
        batch_ids[drop] = empty_ids
        hidden = text_encoder(batch_ids)[0]
        loss = diffusion_loss(unet, scheduler, latents[index], hidden, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 250 == 0 or step == config.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.5f}")
    ema.copy_to(unet.parameters())
    return text_encoder.eval().requires_grad_(False).cpu(), unet.eval().requires_grad_(False).cpu()


def build_tiny(out: Path | str = models.TINY_MODEL_DIR, config: TinyBuildConfig | None = None,
               reuse_tokenizer: bool = True, log=print, device: str | None = None) -> Path:
    """Build all tiny components and ``save_pretrained`` them (safetensors) into ``out``.

    With ``reuse_tokenizer`` the committed tokenizer in ``out/tokenizer`` is kept (see the module doc).
    """
    # imported here, not at the top: diffusers is slow to import; transformers is slow to import
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    config = config or TinyBuildConfig()
    out = Path(out)
    files.check_replaceable(out)  # before the build's half hour, not after
    device = models.pick_device(device)
    start = time.time()
    splits = emoji.emoji_splits()
    if reuse_tokenizer and (out / "tokenizer" / "tokenizer_config.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
        log(f"reusing the committed tokenizer ({len(tokenizer)} tokens)")
    else:
        every_caption = [c for _, c in splits.pretrain + splits.owner + splits.probe]
        tokenizer = build_tokenizer(every_caption, config.vocab_size)
        log(f"built a new tokenizer ({len(tokenizer)} tokens)")
    pretrain_images = data.images_to_tensor(emoji.render_emoji(p) for p, _ in splits.pretrain)
    captions = [c for _, c in splits.pretrain]
    vae = train_vae(pretrain_images, config, log=log, device=device)
    factor = narrow_posterior(vae, pretrain_images.to(device), config.posterior_relative_sigma)
    log(f"VAE posterior sigma scaled by {factor:.4f} to {config.posterior_relative_sigma:.0%} of the latent spread")
    log(f"VAE round-trip PSNR on the pretraining emoji: {psnr(models.vae_reconstruct(vae, pretrain_images[:256]), pretrain_images[:256]):.2f} dB")
    text_encoder, unet = pretrain_base(tokenizer, vae, pretrain_images, captions, config, log=log, device=device)
    vae = vae.cpu()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=models.tiny_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = files.atomic_folder(out, overwrite=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    write_vocab_files(staging / "tokenizer")
    (staging / "build_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    files.commit_folder(staging, out)
    log(f"tiny model written to {out} in {time.time() - start:.0f} s on {device}")
    return out
