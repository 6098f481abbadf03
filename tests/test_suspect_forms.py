"""Suspects as they exist in the wild (issue #19): a single LoRA file in diffusers' or kohya / AUTOMATIC1111's key
layout (with its own alphas), and a whole fine-tuned pipeline folder. Each must be the same model as the weights it
came from: same images, same p-value."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import protected_suspect
from entruth_lite import cli
from entruth_lite.core import models
from entruth_lite.infringer import presets, train
from entruth_lite.owner import probe

PROMPTS = ["an emoji of a red apple", "an emoji of a blue car"]
# the published kohya / A1111 naming: lora_unet_<module path with dots as underscores>.lora_down|lora_up.weight and
# .alpha per module; text-encoder modules as lora_te_text_model_<path>
KOHYA_ENDS = {".lora.down.weight": "lora_down", ".lora.up.weight": "lora_up", ".lora_A.weight": "lora_down",
              ".lora_B.weight": "lora_up", ".lora_linear_layer.down.weight": "lora_down",
              ".lora_linear_layer.up.weight": "lora_up"}


def to_kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A diffusers / peft LoRA state dict in kohya's key layout, ``alpha`` stored per module (test-only converter)."""
    out = {}
    for key, tensor in state.items():
        part, rest = key.split(".", 1)
        end = next(e for e in KOHYA_ENDS if rest.endswith(e))
        module = rest[: -len(end)]
        if part == "text_encoder":
            module = "text_model." + module.removeprefix("text_model.")
        base = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part] + module.replace(".", "_")
        out[f"{base}.{KOHYA_ENDS[end]}.weight"] = tensor
        out[f"{base}.alpha"] = torch.tensor(alpha)
    return out


def images(pipe) -> np.ndarray:
    """Float images (no uint8 rounding hides a small difference)."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=4, height=32, width=32, generator=generators, output_type="np").images


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """A protected release, a full fine-tune (``full``) and a LoRA on UNet and text encoder with alpha = 2 x rank,
    made strong enough that a wrong scale shows (``lora/``)."""
    root = protected_suspect(tmp_path_factory.mktemp("forms"))
    config = presets.preset("tiny-cpu", steps=2, method="lora", lora_rank=4, lora_alpha=8.0, train_text_encoder=True)
    train.finetune(root / "protected", root / "lora", config, progress=False)
    file = root / "lora" / models.LORA_WEIGHTS_NAME
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    state = {k: v * 30 if (".up." in k or "lora_B" in k) else v for k, v in load_file(file).items()}
    save_file(state, file, metadata=metadata)  # two steps move B little: scale it so the LoRA changes the images
    return root


def test_single_lora_files_in_both_layouts_are_the_trained_model(suspect, tmp_path):
    state = load_file(suspect / "lora" / models.LORA_WEIGHTS_NAME)
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("unet.") for k in state)
    base = images(models.load_pipeline("tiny", device="cpu"))
    folder = images(models.load_finetuned(models.load_pipeline("tiny", device="cpu"), suspect / "lora"))
    assert np.abs(folder - base).max() > 1e-2, "the LoRA must change the images for this test to mean anything"

    as_file = images(models.load_finetuned(models.load_pipeline("tiny", device="cpu"),
                                           suspect / "lora" / models.LORA_WEIGHTS_NAME))
    save_file(to_kohya(state, alpha=8.0), tmp_path / "suspect_kohya.safetensors")
    kohya = images(models.load_finetuned(models.load_pipeline("tiny", device="cpu"),
                                         tmp_path / "suspect_kohya.safetensors"))
    assert np.allclose(as_file, folder, atol=1e-6) and np.allclose(kohya, folder, atol=1e-5)

    save_file(to_kohya(state, alpha=4.0), tmp_path / "wrong_alpha.safetensors")  # alpha = rank: half the scale
    wrong = images(models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "wrong_alpha.safetensors"))
    assert np.abs(wrong - folder).max() > 1e-3, "each module's alpha is honoured"


def test_a_single_file_that_does_not_fit_or_is_a_pickle_is_refused(suspect, tmp_path):
    state = load_file(suspect / "lora" / models.LORA_WEIGHTS_NAME)
    deeper = {k.replace("text_encoder.encoder.layers.0.", "text_encoder.encoder.layers.11."): v for k, v in state.items()}
    save_file(to_kohya(deeper, alpha=8.0), tmp_path / "deeper.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "deeper.safetensors")
    pickle = tmp_path / "suspect.ckpt"
    pickle.write_bytes(b"never opened")
    with pytest.raises(ValueError, match="pickle"):
        models.load_finetuned(models.load_pipeline("tiny", device="cpu"), pickle)
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "not_a_lora.safetensors")
    with pytest.raises(ValueError, match="not_a_lora.safetensors"):
        models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / "not_a_lora.safetensors")


def audit_json(capsys, *args) -> dict:
    assert cli.main(["audit", *args, "--queries", "4", "--decoys", "199", "--alpha", "0.05", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_form_gives_the_same_p_value(suspect, tmp_path, capsys):
    """The LoRA as a folder, as its file and in kohya's layout; the full fine-tune as weights and as a whole
    pipeline folder (``--model`` alone): each audit gives its original's p-value and records the file hashes."""
    key = ["--key", str(suspect / "key")]
    folder = audit_json(capsys, "--weights", str(suspect / "lora"), *key)
    single = audit_json(capsys, "--weights", str(suspect / "lora" / models.LORA_WEIGHTS_NAME), *key)
    save_file(to_kohya(load_file(suspect / "lora" / models.LORA_WEIGHTS_NAME), alpha=8.0), tmp_path / "k.safetensors")
    kohya = audit_json(capsys, "--weights", str(tmp_path / "k.safetensors"), *key)
    assert folder["p_value"] == single["p_value"] == kohya["p_value"]
    assert [q["trigger_score"] for q in kohya["queries"]] == pytest.approx([q["trigger_score"] for q in folder["queries"]], abs=1e-6)
    assert list(single["model"]["weight_files"]) == [models.LORA_WEIGHTS_NAME]

    full = audit_json(capsys, "--weights", str(suspect / "full"), *key)
    pipe = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), suspect / "full")
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(probe.default_captions("tiny")))
    whole = audit_json(capsys, "--model", str(tmp_path / "pipeline"), "--captions", str(captions), *key)
    assert whole["p_value"] == full["p_value"]
    assert "unet/diffusion_pytorch_model.safetensors" in whole["model"]["base_files"]


def test_a_lora_of_the_unet_only_loads_in_either_layout(suspect, tmp_path):
    """Most published LoRAs adapt the UNet alone: nothing of the text encoder to check or convert."""
    unet_only = {k: v for k, v in load_file(suspect / "lora" / models.LORA_WEIGHTS_NAME).items() if k.startswith("unet.")}
    save_file(unet_only, tmp_path / "unet_only.safetensors")
    save_file(to_kohya(unet_only, alpha=8.0), tmp_path / "unet_only_kohya.safetensors")
    for name in ("unet_only.safetensors", "unet_only_kohya.safetensors"):
        pipe = models.load_finetuned(models.load_pipeline("tiny", device="cpu"), tmp_path / name)
        assert pipe.unet.peft_config and not getattr(pipe.text_encoder, "peft_config", None), name
