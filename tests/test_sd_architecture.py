"""Stable Diffusion 1.5's code path on the CPU (issue #17): SD 1.5's architecture with random weights, built from the
configs in ``sd_architecture`` (nothing downloads). The narrow build has SD 1.5's module names and block layout, so
the ``colab-t4`` preset, its LoRA keys, the loader and the audit run as they would on the real model."""

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from entruth_lite.core import diffusion, models, sd_architecture
from entruth_lite.core.templates import vae_round_trip
from entruth_lite.infringer import presets, train
from entruth_lite.owner import audit, calibration, keys, probe, protect, record, verify

SIZE = 64  # the narrow model's native size: sample_size 8 x vae_scale_factor 8
HELD_OUT = ["a photo of a purple circle", "a photo of an orange square", "a photo of a white bar",
            "a photo of a black circle"]
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}  # SD 1.5's published sizes


DIFFUSERS_LORA_NAMES = {".lora.down.": "lora_A", ".lora.up.": "lora_B",  # UNet keys
                        ".lora_linear_layer.down.": "lora_A", ".lora_linear_layer.up.": "lora_B"}  # text encoder keys


def lora_pairs(module: torch.nn.Module, saved: dict[str, torch.Tensor], prefix: str):
    """(key, saved tensor, the loaded module's tensor) for every ``prefix`` key of a diffusers LoRA file."""
    state = module.state_dict()
    adapter = next(iter(module.peft_config))
    for key, tensor in saved.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            for old, new in DIFFUSERS_LORA_NAMES.items():
                name = name.replace(old, f".{new}.{adapter}.")
            yield key, tensor, state[name]


def one_token_attention(key: str) -> bool:
    """The mid block's self-attention q/k at 64 px: one latent pixel there, so softmax over one key is constant and
    they get no gradient (on SD 1.5 at 512 px the mid block has 8 x 8)."""
    return "mid_block.attentions.0.transformer_blocks.0.attn1.to_" in key and any(
        f"attn1.to_{x}." in key for x in "qk")


def colab_t4(model_dir, **overrides) -> presets.TrainConfig:
    """The GPU preset with only what a CPU run must change overridden (size, steps, no fp16)."""
    settings = dict(model=str(model_dir), resolution=SIZE, steps=3, batch_size=2, gradient_accumulation_steps=1,
                    mixed_precision="no", train_text_encoder=True)
    return presets.preset("colab-t4", **(settings | overrides))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are so small that each op takes microseconds: a second intra-op thread only adds
    synchronisation, which costs orders of magnitude more when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory):
    return sd_architecture.build_sd15(tmp_path_factory.mktemp("sd15") / "narrow", width="narrow", seed=0)


@pytest.fixture(scope="module")
def base(narrow_dir):
    return models.load_pipeline(narrow_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def release(tmp_path_factory, base, photo_folder):
    """(owner data, protected release, its key): 40 photos of mixed sizes and formats (one over 1024 px), 2 of them
    templated at the training resolution with a member of the random family."""
    root = tmp_path_factory.mktemp("release")
    protect.protect(photo_folder, "random:1", root / "protected", root / "key", count=2, seed=0,
                    tokenizer=base.tokenizer, resolution=SIZE)
    return photo_folder, root / "protected", keys.load_key(root / "key", release=root / "protected")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, release, base, narrow_dir):
    out = tmp_path_factory.mktemp("finetune") / "lora"
    result = train.finetune(release[1], out, colab_t4(narrow_dir), pipe=base, device="cpu", progress=False)
    return out, result


# ----------------------------------------------------------------------------- the architecture


def test_narrow_build_has_sd15s_module_names_and_block_layout():
    """Same names, block types and layer counts as SD 1.5 (built on the meta device: no weights allocated), so a LoRA
    trained on the narrow model targets exactly the modules it would on SD 1.5; only the widths differ."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    full, narrow = sd_architecture.sd15_configs("full"), sd_architecture.sd15_configs("narrow")
    with torch.device("meta"):
        unets = [UNet2DConditionModel(**c["unet"]) for c in (full, narrow)]
        vaes = [AutoencoderKL(**c["vae"]) for c in (full, narrow)]
        encoders = [CLIPTextModel(CLIPTextConfig(**c["text_encoder"])) for c in (full, narrow)]
    for pair in (unets, vaes):
        assert [n for n, _ in pair[0].named_parameters()] == [n for n, _ in pair[1].named_parameters()]
    for key in ("down_block_types", "up_block_types", "mid_block_type", "layers_per_block", "attention_head_dim",
                "in_channels", "out_channels", "use_linear_projection"):
        assert narrow["unet"][key] == full["unet"][key], key
    assert narrow["vae"]["latent_channels"] == 4 and len(narrow["vae"]["block_out_channels"]) == 4
    assert narrow["text_encoder"]["max_position_embeddings"] == narrow["tokenizer"]["model_max_length"] == 77
    # the text encoder keeps its layer naming (fewer layers): LoRA targets q/k/v/out_proj exist in both
    narrow_names = {n for n, _ in encoders[1].named_modules()}
    assert narrow_names <= {n for n, _ in encoders[0].named_modules()}
    assert {n.rsplit(".", 1)[-1] for n in narrow_names} >= set(presets.LORA_TEXT_TARGETS)


def test_tokenizer_has_the_real_ones_shape():
    tokenizer = sd_architecture.sd15_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    ids = diffusion.tokenize(tokenizer, ["an emoji of a red apple"])[0].tolist()
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and max(ids) < 49408


def test_narrow_build_loads_with_the_projects_loader(base):
    """``load_pipeline`` reads the folder as it reads SD 1.5: PNDM swapped for DDIM with SD's schedule, fp32 on CPU."""
    from diffusers import DDIMScheduler

    assert isinstance(base.scheduler, DDIMScheduler)
    assert base.scheduler.config.clip_sample is False and base.scheduler.config.prediction_type == "epsilon"
    assert base.vae_scale_factor == 8 and models.default_resolution(base) == SIZE
    assert base.text_encoder.config.vocab_size == len(base.tokenizer) and base.tokenizer.model_max_length == 77
    assert base.unet.dtype == torch.float32
    image = base(["a photo of a cat"], num_inference_steps=2, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (SIZE, SIZE)


def test_build_is_seeded(tmp_path, narrow_dir):
    again = sd_architecture.build_sd15(tmp_path / "again", width="narrow", seed=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(narrow_dir / part), load_file(again / part)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------- the colab-t4 preset, on the CPU


def test_colab_t4_lora_with_text_encoder_saves_both_and_reloads_strictly(finetuned, narrow_dir, caplog):
    out, result = finetuned
    saved = load_file(out / models.LORA_WEIGHTS_NAME)
    assert any(k.startswith("unet.") for k in saved) and any(k.startswith("text_encoder.") for k in saved)
    assert result.config.gradient_checkpointing and len(result.losses) == 3 and np.isfinite(result.losses).all()
    assert result.trainable_parameters == sum(v.numel() for v in saved.values())

    fresh = models.load_pipeline(narrow_dir, device="cpu", dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        models.load_finetuned(fresh, out)  # raises on a misfit
    messages = [r.getMessage().lower() for r in caplog.records]
    assert not [m for m in messages if "unexpected" in m or "missing" in m], messages
    for module, prefix in ((fresh.unet, "unet."), (fresh.text_encoder, "text_encoder.")):
        pairs = list(lora_pairs(module, saved, prefix))
        assert pairs and all(torch.equal(a, b) for _, a, b in pairs), prefix


def test_colab_t4_text_encoder_lora_gets_gradients_under_checkpointing(finetuned):
    """LoRA's B matrices start at zero and weight decay keeps a zero at zero: a non-zero B took a gradient step,
    so the text-encoder adapters were trained through gradient checkpointing (which can cut them off)."""
    saved = load_file(finetuned[0] / models.LORA_WEIGHTS_NAME)
    for prefix in ("unet.", "text_encoder."):
        ups = {k: v for k, v in saved.items() if k.startswith(prefix) and ".up." in k and not one_token_attention(k)}
        still_zero = [k for k, v in ups.items() if not v.abs().sum() > 0]
        assert ups and not still_zero, f"{len(still_zero)} {prefix} LoRA B matrices never moved, e.g. {still_zero[:1]}"


def test_probe_and_audit_run_on_the_finetuned_sd_architecture(finetuned, release, narrow_dir):
    key = release[2]
    pipe = models.load_finetuned(models.load_pipeline(narrow_dir, device="cpu", dtype=torch.float32), finetuned[0])
    config = audit.AuditConfig(queries=4, decoys=99, num_inference_steps=2, alpha=0.05)  # 99 decoys can reach 0.05
    probed = probe.probe_model(pipe, HELD_OUT, key.trigger, key.placement, n=4, seed=config.probe_seed,
                         num_inference_steps=2, guidance_scale=config.guidance_scale, progress=False)
    assert len(probed.trigger_images) == len(probed.control_images) == 4
    assert {i.size for i in probed.trigger_images + probed.control_images} == {(SIZE, SIZE)}

    negatives = calibration.plain_images_of(key)  # the 38 untemplated photos, cropped to the training size
    assert len(negatives) == 38 and {im.size for im in negatives} == {(SIZE, SIZE)}
    result = audit.audit(pipe, key, HELD_OUT, config, negatives=negatives, progress=False)
    # the audit's queries replay: same prompts and seeds give the same images
    assert result.probe.seeds == probed.seeds and result.probe.trigger_prompts == probed.trigger_prompts
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.probe.trigger_images, probed.trigger_images))
    head = result.headline
    assert head is not None and head.test == "decoy" and 1 / 100 <= head.p_value <= 1
    decoy = result.verdicts[0]  # the decoys it read, in draw order: all 99, or up to the 20th that reached it
    assert result.evidence.decoy_statistics.shape == (decoy.draws,) and result.evidence.trigger_scores.shape == (4,)
    assert decoy.draws == 99 or (decoy.at_least == verify.STOP_AFTER and decoy.draws < 99)

    verdicts, evidence = audit.evaluate(probed, key.template, config, negatives=vae_round_trip(pipe, negatives),
                                        salt=key.key_sha256, progress=False)
    assert [(v.test, v.p_value) for v in verdicts] == [(v.test, v.p_value) for v in result.verdicts]
    assert np.array_equal(evidence.decoy_statistics, result.evidence.decoy_statistics)


def test_lora_alpha_survives_the_reload(tmp_path, release, base, narrow_dir):
    """A LoRA trained at alpha != rank must load at the same scale, or the suspect model audited is not the one
    trained."""
    out = tmp_path / "alpha"
    train.finetune(release[1], out, colab_t4(narrow_dir, steps=1, lora_alpha=16.0), pipe=base, device="cpu",
                   progress=False)
    fresh = models.load_finetuned(models.load_pipeline(narrow_dir, device="cpu", dtype=torch.float32), out)
    layer = fresh.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling[next(iter(layer.scaling))] == pytest.approx(16.0 / 8)


def test_a_text_encoder_lora_that_does_not_fit_is_refused(finetuned, narrow_dir, tmp_path):
    """A LoRA trained for a deeper text encoder (layer 11 of SD 1.5's 12; the narrow one has 2) must be refused as
    its UNet part would be: a partly applied LoRA is not the suspect model."""
    from safetensors.torch import save_file

    saved = load_file(finetuned[0] / models.LORA_WEIGHTS_NAME)
    moved = {k.replace(".encoder.layers.0.", ".encoder.layers.11.") if k.startswith("text_encoder.") else k: v
             for k, v in saved.items()}
    (tmp_path / "deeper").mkdir()
    save_file(moved, tmp_path / "deeper" / models.LORA_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="does not fit"):
        models.load_finetuned(models.load_pipeline(narrow_dir, device="cpu", dtype=torch.float32), tmp_path / "deeper")


# ----------------------------------------------------------------------------- mixed precision on the CPU


def test_finetune_refuses_bf16_on_the_cpu(release, base, narrow_dir, tmp_path):
    """The a100 preset's bf16 is a CUDA setting: ``finetune`` says so before any work rather than autocasting on CPU."""
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train.finetune(release[1], tmp_path / "bf16", colab_t4(narrow_dir, mixed_precision="bf16"), pipe=base,
                       device="cpu", progress=False)


def test_bf16_autocast_loss_and_lora_gradients_on_the_sd_architecture(base):
    """What ``finetune`` does under bf16 on a GPU, on the CPU by hand: frozen weights in bf16, LoRA in fp32
    (``cast_training_params``), the loss under autocast; it must be finite and reach the LoRA weights in fp32."""
    import copy

    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = copy.deepcopy(base.unet).to(torch.bfloat16).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(presets.LORA_UNET_TARGETS)))
    cast_training_params(unet, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator).to(torch.bfloat16)
    hidden = diffusion.encode_captions(base.text_encoder, diffusion.tokenize(base.tokenizer, ["a", "b"])).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion.diffusion_loss(unet, DDPMScheduler.from_config(base.scheduler.config), latents, hidden, generator)
    loss.backward()
    ups = [p for n, p in unet.named_parameters() if "lora_B" in n and not one_token_attention(n)]  # A's is 0 while B is
    assert torch.isfinite(loss) and ups and all(p.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in ups)


# ----------------------------------------------------------------------------- full size


def test_full_size_build_saves_loads_and_has_sd15s_parameter_counts(tmp_path):
    """SD 1.5 itself, random: 4.3 GB of fp32 safetensors, deleted at the end (pytest keeps recent tmp folders)."""
    import shutil

    try:
        out = sd_architecture.build_sd15(tmp_path / "full", width="full", seed=0)
        pipe = models.load_pipeline(out, device="cpu", dtype=torch.float32)
        counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in SD15_PARAMETERS}
        assert counts == SD15_PARAMETERS
        assert models.default_resolution(pipe) == 512 and len(pipe.tokenizer) == 49408
        assert pipe.text_encoder.config.vocab_size == 49408 and pipe.unet.config.cross_attention_dim == 768
    finally:
        shutil.rmtree(tmp_path / "full", ignore_errors=True)


# ----------------------------------------------------------------------------- a suspect as one checkpoint file


def test_a_single_file_checkpoint_is_the_pipeline_it_was_exported_from(finetuned, release, narrow_dir, tmp_path):
    """A fine-tune exported as one checkpoint in the original (A1111) layout, as model-sharing sites publish them,
    read back with diffusers' ``from_single_file`` and the base's configs: the same weights as the pipeline folder
    it came from, and the same audit (images, scores, p-values)."""
    from safetensors.torch import save_file

    from ldm_layout import to_ldm

    pipe = models.load_finetuned(models.load_pipeline(narrow_dir, device="cpu", dtype=torch.float32), finetuned[0])
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    save_file(to_ldm(pipe), tmp_path / "suspect.safetensors")

    single = models.load_pipeline(tmp_path / "suspect.safetensors", device="cpu", config=narrow_dir)
    folder = models.load_pipeline(tmp_path / "pipeline", device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), part

    key = release[2]
    config = audit.AuditConfig(queries=4, decoys=99, num_inference_steps=2, alpha=0.05, methods=("decoy", "paired"))
    from_folder = audit.audit(folder, key, HELD_OUT, config, progress=False)
    from_file = audit.audit(record.load_suspect(str(tmp_path / "suspect.safetensors"), device="cpu", config=narrow_dir),
                            key, HELD_OUT, config, progress=False)
    assert [v.p_value for v in from_file.verdicts] == [v.p_value for v in from_folder.verdicts]
    # equal weights, loaded by two routes (tensors laid out differently in memory): scores agree to float rounding
    assert np.allclose(from_file.evidence.trigger_scores, from_folder.evidence.trigger_scores, rtol=1e-3, atol=1e-6)
    info = record.model_info(str(tmp_path / "suspect.safetensors"), None, narrow_dir)
    assert list(info["base_files"]) == ["suspect.safetensors"] and info["config"] == str(narrow_dir)

    (tmp_path / "suspect.ckpt").write_bytes(b"never opened")
    with pytest.raises(ValueError, match="pickle"):
        models.load_pipeline(tmp_path / "suspect.ckpt", device="cpu")
