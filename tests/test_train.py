"""Fine-tuning: formats, resume, determinism and bad input. Runs on a slice of the owner data, a few steps."""

import hashlib
import json
import logging
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from entruth_lite import cli
from entruth_lite.core import data, diffusion, models
from entruth_lite.core import emoji as emoji_data
from entruth_lite.infringer import checkpoints, presets, train
from entruth_lite.teaching import demo

pytestmark = pytest.mark.skipif(
    not (models.TINY_MODEL_DIR / "model_index.json").is_file(), reason="shipped tiny model missing"
)
FAST = dict(steps=4, batch_size=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    images, captions, names = emoji_data.emoji_dataset("owner", limit=12)
    return data.save_imagefolder(images, captions, tmp_path_factory.mktemp("ds") / "owner", file_names=names)


@pytest.fixture(scope="module")
def base():
    return models.load_pipeline("tiny", device="cpu")


def lora_config(**extra):
    return presets.TrainConfig(method="lora", lora_rank=4, **(FAST | extra))


def test_lora_file_loads_into_a_fresh_pipeline_with_no_stray_keys(dataset, base, tmp_path, caplog):
    result = train.finetune(dataset, tmp_path / "lora", lora_config(), pipe=base, progress=False)
    weights = load_file(tmp_path / "lora" / models.LORA_WEIGHTS_NAME)
    assert weights and all(k.startswith("unet.") for k in weights)
    assert result.trainable_parameters == sum(v.numel() for v in weights.values())
    before = base.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"].clone()
    fresh = models.load_pipeline("tiny", device="cpu")
    with caplog.at_level(logging.WARNING):
        models.load_finetuned(fresh, tmp_path / "lora")
    messages = [r.getMessage().lower() for r in caplog.records]
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], messages
    # every saved LoRA tensor is in the pipeline, with the trained values
    loaded = {k: v for k, v in fresh.unet.state_dict().items() if "lora" in k}
    assert len(loaded) == len(weights)
    assert torch.equal(base.unet.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"], before), \
        "fine-tuning must not modify the caller's pipeline"
    image = fresh(["an emoji of a cat"], num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)


def test_lora_changes_the_output_and_full_finetune_round_trips(dataset, base, tmp_path):
    config = presets.TrainConfig(method="full", learning_rate=1e-3, **FAST)
    train.finetune(dataset, tmp_path / "full", config, pipe=base, progress=False)
    assert (tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "full").rglob("*.bin"))
    tuned = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "full")
    prompt = dict(prompt=["an emoji of a cat"], num_inference_steps=4, height=32, width=32, output_type="np")
    a = base(**prompt, generator=torch.Generator().manual_seed(0)).images
    b = tuned(**prompt, generator=torch.Generator().manual_seed(0)).images
    assert abs(a - b).mean() > 1e-3


def test_interrupted_and_resumed_run_ends_with_the_same_weights(dataset, base, tmp_path):
    config = lora_config(steps=6, checkpoint_every=2, random_flip=True, caption_dropout=0.2)
    whole = train.finetune(dataset, tmp_path / "whole", config, pipe=base, progress=False)

    class Interrupted(Exception):
        pass

    def stop_at_five(step, loss):
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        train.finetune(dataset, tmp_path / "cut", config, pipe=base, progress=False, on_step=stop_at_five)
    assert checkpoints.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-0000004"
    resumed = train.finetune(dataset, tmp_path / "cut", config, pipe=base, progress=False, resume="latest")
    assert resumed.resumed_from == 4
    assert resumed.losses == whole.losses
    a = load_file(tmp_path / "whole" / models.LORA_WEIGHTS_NAME)
    b = load_file(tmp_path / "cut" / models.LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(dataset, base, tmp_path):
    train.finetune(dataset, tmp_path / "run", lora_config(steps=4, checkpoint_every=2), pipe=base, progress=False)
    with pytest.raises(ValueError, match="other training settings"):
        train.finetune(dataset, tmp_path / "run", lora_config(steps=4, checkpoint_every=2, learning_rate=1.0),
                       pipe=base, progress=False, resume="latest")


def test_existing_output_is_not_overwritten(dataset, base, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        train.finetune(dataset, tmp_path / "mine", lora_config(), pipe=base, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(steps=0), "steps must be positive"),
        (dict(steps=-3), "steps must be positive"),
        (dict(method="dora"), "method must be"),
        (dict(learning_rate=0), "learning_rate must be positive"),
        (dict(mixed_precision="fp8"), "mixed_precision must be"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        presets.TrainConfig(**settings)


def test_bad_inputs_get_clear_errors(dataset, base, tmp_path):
    with pytest.raises(data.DatasetError, match="dataset folder not found"):
        train.finetune(tmp_path / "nowhere", tmp_path / "o1", lora_config(), pipe=base, progress=False)
    with pytest.raises(ValueError, match="multiple of the VAE factor 2"):
        train.finetune(dataset, tmp_path / "o2", lora_config(resolution=33), pipe=base, progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        presets.preset("tpu-pod")


def test_lora_for_another_architecture_is_refused(base, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "alien"
    folder.mkdir()
    save_file({"unet.mid_block.attentions.7.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(4, 96)},
              folder / models.LORA_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="another architecture"):
        models.load_finetuned(models.load_pipeline("tiny", device="cpu"), folder)


def test_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "suspect"
    folder.mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="pickle"):
        models.load_finetuned(None, folder)


def test_batches_cover_each_epoch_once():
    seen = torch.cat([train.batch_indices(10, 5, b, seed=0) for b in range(2)])
    assert sorted(seen.tolist()) == list(range(10))
    assert not torch.equal(train.batch_indices(10, 5, 0, 0), train.batch_indices(10, 5, 2, 0))


def test_exposures_count_how_often_each_image_is_seen():
    assert presets.exposures(presets.preset("tiny-cpu"), 1005) == pytest.approx(1500 * 32 / 1005)
    assert presets.exposures(presets.preset("colab-t4", steps=2000), 160) == pytest.approx(2000 * 4 * 1 / 160)
    with pytest.raises(ValueError, match="n_images must be positive"):
        presets.exposures(presets.preset("tiny-cpu"), 0)


def test_gpu_presets_checkpoint_so_a_disconnected_runtime_can_resume():
    assert all(presets.preset(name).checkpoint_every > 0 for name in ("colab-t4", "a100"))


def test_presets_are_valid_configs():
    for name in presets.PRESETS:
        config = presets.preset(name)
        assert config.steps > 0
    assert presets.preset("colab-t4").mixed_precision == "fp16"
    assert presets.preset("tiny-cpu", steps=5).steps == 5


def test_cli_train(dataset, tmp_path, capsys):
    code = cli.main(["train", "--model", "tiny", "--data", str(dataset), "--out", str(tmp_path / "cli"),
                     "--lora-rank", "4", "--steps", "2", "--batch-size", "4", "--seed", "1", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["method"] == "lora" and len(summary["losses"]) == 2
    assert (tmp_path / "cli" / models.LORA_WEIGHTS_NAME).is_file()
    assert cli.main(["train", "--data", str(dataset), "--out", str(tmp_path / "bad"), "--steps", "0"]) == 2


def test_text_encoder_lora_and_loss_options(dataset, base, tmp_path):
    config = lora_config(train_text_encoder=True, snr_gamma=5.0, noise_offset=0.05, caption_dropout=0.3,
                         random_flip=True, cache_latents=False, lr_scheduler="cosine", lr_warmup_steps=1)
    result = train.finetune(dataset, tmp_path / "te", config, pipe=base, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    weights = load_file(tmp_path / "te" / models.LORA_WEIGHTS_NAME)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    fresh = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "te")
    assert any("lora" in name for name, _ in fresh.text_encoder.named_parameters())


def test_cli_lora_rank_takes_alpha_equal_to_the_rank_unless_given(dataset, tmp_path, capsys):
    """tiny-cpu-lora's alpha (32^1.5) belongs to its rank 32: another rank must not inherit it."""
    def trained(*extra):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        assert cli.main(["train", "--data", str(dataset), "--out", str(out), "--preset", "tiny-cpu-lora", "--steps", "1",
                         "--batch-size", "2", "--json", *extra]) == 0
        return json.loads((out / "train_config.json").read_text())

    preset, rank4 = trained(), trained("--lora-rank", "4")
    assert (preset["lora_rank"], preset["lora_alpha"]) == (32, presets.PRESETS["tiny-cpu-lora"]["lora_alpha"])
    assert (rank4["lora_rank"], rank4["lora_alpha"]) == (4, None)
    assert trained("--lora-rank", "4", "--lora-alpha", "8")["lora_alpha"] == 8
    capsys.readouterr()


def test_lora_alpha_is_saved_and_loaded_at_the_trained_scale(dataset, base, tmp_path):
    """A LoRA's effect is scaled by alpha / rank: loaded at alpha = rank, a LoRA trained at another alpha would be
    audited at the wrong strength. diffusers keeps each adapter's config in the file's metadata."""
    from safetensors import safe_open

    config = lora_config(lora_alpha=16, train_text_encoder=True)  # rank 4
    train.finetune(dataset, tmp_path / "a", config, pipe=base, progress=False)
    with safe_open(str(tmp_path / "a" / models.LORA_WEIGHTS_NAME), "pt") as weights:
        assert weights.metadata() and any("metadata" in key for key in weights.metadata())
    fresh = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "a")
    for module in (fresh.unet, fresh.text_encoder):
        assert [(c.r, c.lora_alpha) for c in module.peft_config.values()] == [(4, 16)]


def test_a_second_finetune_in_one_kernel_may_use_another_precision(dataset, base, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # whatever earlier tests left, then
    Accelerator(mixed_precision="bf16", cpu=True)  # what an earlier fine-tune at another precision leaves behind
    result = train.finetune(dataset, tmp_path / "again", lora_config(), pipe=base, progress=False)
    assert len(result.losses) == lora_config().steps


def test_text_encoder_lora_learns_with_gradient_checkpointing(dataset, base, tmp_path):
    config = lora_config(train_text_encoder=True, gradient_checkpointing=True, learning_rate=1e-2)
    train.finetune(dataset, tmp_path / "ckpt", config, pipe=base, progress=False)
    weights = load_file(tmp_path / "ckpt" / models.LORA_WEIGHTS_NAME)
    up = [w for k, w in weights.items() if k.startswith("text_encoder.") and ("lora_B" in k or ".up." in k)]
    assert up and all(w.abs().sum() > 0 for w in up), "LoRA's B matrices start at zero: they moved only with gradients"


def test_finetune_refuses_a_base_model_other_than_the_settings_model(dataset, base, tmp_path):
    config = lora_config(model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(ValueError, match="loaded from .*tiny-sd.*stable-diffusion-v1-5"):
        train.finetune(dataset, tmp_path / "wrong", config, pipe=base, progress=False)
    assert models.is_pipeline_of(base, "tiny") and models.is_pipeline_of(base, models.TINY_MODEL_DIR)


def test_min_snr_weighting_changes_the_loss(base):
    latents = torch.randn(4, 8, 16, 16)
    hidden = torch.randn(4, 32, 64)
    scheduler = base.scheduler
    plain = diffusion.diffusion_loss(base.unet, scheduler, latents, hidden, torch.Generator().manual_seed(0))
    weighted = diffusion.diffusion_loss(base.unet, scheduler, latents, hidden, torch.Generator().manual_seed(0), snr_gamma=1.0)
    assert plain.item() != weighted.item()
    per_sample = diffusion.diffusion_loss(base.unet, scheduler, latents, hidden, torch.Generator().manual_seed(0),
                                      reduction="none")
    assert per_sample.shape == (4,) and torch.isclose(per_sample.mean(), plain)


def test_gradient_checkpointing_gives_the_same_losses(dataset, base, tmp_path):
    """The memory-saving path GPU presets use; on the CPU it must not change the arithmetic."""
    plain = train.finetune(dataset, tmp_path / "a", lora_config(steps=3), pipe=base, progress=False)
    checkpointed = train.finetune(dataset, tmp_path / "b", lora_config(steps=3, gradient_checkpointing=True),
                                  pipe=base, progress=False)
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(checkpointed.losses), atol=1e-6)


def test_mixed_precision_needs_a_gpu(dataset, base, tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train.finetune(dataset, tmp_path / "fp16", lora_config(mixed_precision="fp16"), pipe=base,
                       progress=False, device="cpu")


def test_finetune_records_which_data_it_saw(dataset, base, tmp_path):
    train.finetune(dataset, tmp_path / "m", lora_config(steps=1), pipe=base, progress=False)
    record = json.loads((tmp_path / "m" / "train_data.json").read_text())
    assert record["sha256"] == checkpoints.dataset_fingerprint(dataset)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(dataset, copy)
    assert checkpoints.dataset_fingerprint(copy) == record["sha256"]
    lines = (copy / "metadata.jsonl").read_text().splitlines()
    (copy / "metadata.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    assert checkpoints.dataset_fingerprint(copy) != record["sha256"]


def test_demo_models_are_reused_only_when_settings_and_data_match(dataset, base, tmp_path, monkeypatch):
    from entruth_lite.teaching import demo

    release = demo.Release(owner=dataset, protected=dataset, key=tmp_path / "unused")
    calls = []
    real = train.finetune
    monkeypatch.setattr(train, "finetune", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    config = lora_config(steps=1)
    folders = demo.finetuned(tmp_path, release, config, pipe=base, progress=False, side_by_side=False)
    assert set(folders) == {"protected", "clean"} and len(calls) == 2
    assert all(demo.saved_seconds(folder) > 0 for folder in folders.values()), "the lab shows how long each took"
    demo.finetuned(tmp_path, release, config, pipe=base, progress=False, side_by_side=False)
    assert len(calls) == 2, "same settings, same data: reused"
    again = demo.finetuned(tmp_path, release, lora_config(steps=2), pipe=base, progress=False, side_by_side=False)
    assert len(calls) == 4, "other settings: trained again"
    assert set(again.values()).isdisjoint(folders.values()), "in new folders: a finished fine-tune is never overwritten"
    assert all(checkpoints.is_current(folders[n], config, dataset) for n in folders)
    assert checkpoints.saved_losses(folders["clean"]) and len(checkpoints.saved_losses(again["clean"])) == 2


def test_side_by_side_runs_train_as_one_run_does_and_report_a_failure(dataset, base, tmp_path):
    """Two runs in two processes end with the weights this process trains (up to the summation order of other
    thread counts), are reused the next time, and a run that fails raises its error, naming its data."""
    config = lora_config(steps=3)
    with pytest.raises(RuntimeError, match="no-such-folder"):
        demo.finetune_side_by_side([(dataset, tmp_path / "a"), (tmp_path / "no-such-folder", tmp_path / "b")],
                                    config, progress=False)
    results = demo.finetune_side_by_side([(dataset, tmp_path / "a"), (dataset, tmp_path / "c")], config,
                                          progress=False)
    here = train.finetune(dataset, tmp_path / "here", config, pipe=base, progress=False)
    assert [len(r.losses) for r in results] == [3, 3] and np.allclose(results[0].losses, here.losses, atol=1e-5)
    weights = [load_file(folder / models.LORA_WEIGHTS_NAME) for folder in (tmp_path / "a", tmp_path / "here")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[1])
    assert demo.finetune_side_by_side([(dataset, tmp_path / "a"), (dataset, tmp_path / "c")], config,
                                       progress=False) == [None, None], "finished runs are reused"


def test_denoising_losses_are_replayable_and_lower_on_training_images(dataset, base, tmp_path):
    images, captions, _ = emoji_data.emoji_dataset("owner", limit=12)
    held_images, held_captions, _ = emoji_data.emoji_dataset("probe", limit=12)
    before = diffusion.image_losses(base, images, captions, repeats=2)
    assert before.shape == (12,) and np.array_equal(before, diffusion.image_losses(base, images, captions, repeats=2))
    train.finetune(dataset, tmp_path / "m", presets.TrainConfig(method="full", steps=60, batch_size=12,
                                                              learning_rate=1e-3), pipe=base, progress=False)
    tuned = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "m")
    seen = diffusion.image_losses(tuned, images, captions, repeats=2)
    unseen = diffusion.image_losses(tuned, held_images, held_captions, repeats=2)
    assert seen.mean() < before.mean() and seen.mean() < unseen.mean()
    with pytest.raises(ValueError, match="as many captions"):
        diffusion.image_losses(base, images, captions[:3])


def test_strong_augmentation_changes_training_and_keeps_old_fingerprints(dataset, base, tmp_path):
    plain = lora_config(steps=2)
    # the hash as it was computed before augment_views, use_dora and sample_latents existed: saved models are reused
    before = {k: v for k, v in asdict(plain).items()
              if k not in ("checkpoint_every", "augment_views", "use_dora", "sample_latents")}
    assert plain.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    augmented = lora_config(steps=2, augment_views=3)
    assert augmented.fingerprint() != plain.fingerprint(), "a run with augmentation must not be reused as plain"
    with pytest.raises(ValueError, match="augment_views"):
        lora_config(augment_views=-1)
    a = train.finetune(dataset, tmp_path / "plain", plain, pipe=base, progress=False).losses
    b = train.finetune(dataset, tmp_path / "aug", augmented, pipe=base, progress=False).losses
    c = train.finetune(dataset, tmp_path / "aug-uncached", lora_config(steps=2, augment_views=3, cache_latents=False),
                       pipe=base, progress=False).losses
    assert a != b and all(torch.isfinite(torch.tensor(b + c)))


def test_augmented_views_differ_from_the_images_and_from_each_other(base):
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    views = train.augmented_latents(base.vae, pixels, 3, seed=0)
    plain = diffusion.encode_images(base.vae, pixels)
    assert views.shape == (3, *plain.shape)
    assert (views[0] - plain).abs().mean() > 1e-3 and (views[0] - views[1]).abs().mean() > 1e-3
    assert torch.equal(views, train.augmented_latents(base.vae, pixels, 3, seed=0)), "seeded: a resume redraws them"


def test_the_data_fingerprint_is_what_trains(dataset, tmp_path):
    """Re-protecting the same data writes a new key commitment; that must not make a finished run look stale."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    before = checkpoints.dataset_fingerprint(copy)
    (copy / "entruth-commitment.json").write_text('{"key_sha256": "another key"}')
    (copy / "README.md").write_text("credits")
    assert checkpoints.dataset_fingerprint(copy) == before
    first = data.read_metadata(copy)[0].file_name
    (copy / first).write_bytes((copy / first).read_bytes() + b"\0")
    assert checkpoints.dataset_fingerprint(copy) != before


def test_dora_saves_its_magnitudes_and_reloads_them(dataset, base, tmp_path):
    """DoRA adds a learned norm per output of each adapted layer: the file must carry it and the loader apply it to
    the UNet and the text encoder (transformers' loader drops the latter), or the suspect is audited as another model."""
    config = lora_config(use_dora=True, train_text_encoder=True, learning_rate=1e-2)
    train.finetune(dataset, tmp_path / "dora", config, pipe=base, progress=False)
    weights = load_file(tmp_path / "dora" / models.LORA_WEIGHTS_NAME)
    magnitudes = {k.removesuffix(".lora_magnitude_vector"): v for k, v in weights.items() if "magnitude" in k}
    assert {k.split(".")[0] for k in magnitudes} == {"unet", "text_encoder"}
    fresh = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "dora")
    assert [c.use_dora for c in fresh.unet.peft_config.values()] == [True]
    layers = {f"{part}.{name.removeprefix('text_model.')}": module
              for part in ("unet", "text_encoder") for name, module in getattr(fresh, part).named_modules()}
    learned = 0
    for name, magnitude in magnitudes.items():
        (vector,) = layers[name].lora_magnitude_vector.values()
        assert torch.equal(vector.weight, magnitude), name
        learned += not torch.allclose(magnitude, layers[name].base_layer.weight.norm(dim=1), atol=1e-4)
    assert learned, "the magnitudes start at the weights' norms and must have learned"
    assert config.fingerprint() != lora_config(train_text_encoder=True, learning_rate=1e-2).fingerprint()


def test_sampled_latents_are_posterior_draws_seeded_by_the_step(dataset, base, tmp_path):
    """``sample_latents``: each step encodes a draw from the posterior, as diffusers' example trainers do; seeded,
    so a run replays exactly, and cached or not the same draws (the default, the mean, is left as it was)."""
    means, stds = diffusion.encode_posterior(base.vae, train.prepare_images(data.load_imagefolder(dataset), 32))
    generator = torch.Generator().manual_seed(3)
    drawn = diffusion.sample_latents(means, stds, generator)
    assert not torch.equal(drawn, means) and torch.allclose(drawn, means, atol=float(8 * stds.max()))
    assert torch.equal(diffusion.encode_images(base.vae, train.prepare_images(data.load_imagefolder(dataset), 32)), means)
    config = lora_config(sample_latents=True)
    first = train.finetune(dataset, tmp_path / "a", config, pipe=base, progress=False)
    again = train.finetune(dataset, tmp_path / "b", config, pipe=base, progress=False)
    uncached = train.finetune(dataset, tmp_path / "c", lora_config(sample_latents=True, cache_latents=False), pipe=base,
                              progress=False)
    plain = train.finetune(dataset, tmp_path / "d", lora_config(), pipe=base, progress=False)
    assert first.losses == again.losses and np.allclose(first.losses, uncached.losses, rtol=1e-4)
    assert first.losses != plain.losses, "the draws change the trajectory"
    assert config.fingerprint() != lora_config().fingerprint(), "a sampling run is not reused as a mean run"


def test_a_finetune_on_sampled_latents_improves_the_held_out_loss(base, tmp_path):
    """The shipped VAE is nearly deterministic, as Stable Diffusion's is, so a trainer that encodes with
    ``latent_dist.sample()`` learns the data rather than the VAE's noise: the held-out loss falls."""
    images, captions, names = emoji_data.emoji_dataset("owner", limit=100)
    owner = data.save_imagefolder(images, captions, tmp_path / "owner", file_names=names)
    held, held_captions, _ = emoji_data.emoji_dataset("probe", limit=32)
    before = diffusion.image_losses(base, held, held_captions, repeats=2).mean()
    config = presets.preset("tiny-cpu", method="full", learning_rate=1e-4, steps=40, sample_latents=True)
    train.finetune(owner, tmp_path / "m", config, pipe=base, progress=False)
    tuned = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "m")
    assert diffusion.image_losses(tuned, held, held_captions, repeats=2).mean() < before
