import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import entruth_lite as e
from entruth_lite.core import diffusion, models
from entruth_lite.core import emoji as emoji_data

pytestmark = pytest.mark.skipif(
    not (models.TINY_MODEL_DIR / "model_index.json").is_file(), reason="shipped tiny model missing"
)

PROMPTS = ["an emoji of a red apple", "an emoji of a smiling face with open mouth"]


@pytest.fixture(scope="module")
def pipe():
    return e.load_pipeline("tiny", device="cpu")


def generate(pipe, seed, prompts=PROMPTS, steps=8):
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompts, num_inference_steps=steps, height=32, width=32, generator=generator, output_type="np")
    return out.images


def test_tiny_pipeline_is_stable_diffusion(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert 1e6 <= sum(p.numel() for p in pipe.unet.parameters()) <= 3.5e6
    assert models.default_resolution(pipe) == 32


def test_same_seed_same_image_other_seed_other_image(pipe):
    a, b, c = generate(pipe, 0), generate(pipe, 0), generate(pipe, 1)
    assert a.shape == (2, 32, 32, 3)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_prompt_changes_the_image(pipe):
    a = generate(pipe, 0, prompts=["an emoji of a red apple"])
    b = generate(pipe, 0, prompts=["an emoji of a blue car"])
    assert np.abs(a - b).mean() > 0.01


def test_save_and_reload_gives_identical_outputs(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy", safe_serialization=True)
    assert not list((tmp_path / "copy").rglob("*.bin")), "only safetensors may be written"
    again = e.load_pipeline(tmp_path / "copy", device="cpu")
    assert np.array_equal(generate(pipe, 3), generate(again, 3))


def test_shipped_weights_are_safetensors_and_small():
    files = [p for p in models.TINY_MODEL_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


TOKENIZE = (
    "import json, sys; from transformers import CLIPTokenizer; "
    "t = CLIPTokenizer.from_pretrained(sys.argv[1]); "
    "print(json.dumps([t(c).input_ids for c in json.loads(sys.argv[2])]))"
)


def test_tokenizer_ids_are_stable_across_processes(pipe):
    captions = PROMPTS + ["an emoji of a flag of the xqz", "[Frm] an emoji of a man playing handball"]
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", TOKENIZE, str(models.TINY_MODEL_DIR / "tokenizer"), json.dumps(captions)],
                check=True, capture_output=True, text=True,
            ).stdout
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1] == [pipe.tokenizer(c).input_ids for c in captions]
    unk = pipe.tokenizer.unk_token_id
    assert unk not in sum(runs[0], []) or unk == pipe.tokenizer.eos_token_id


def test_tokenizer_knows_every_word_of_the_captions(pipe):

    splits = emoji_data.emoji_splits()
    words = {w for _, c in splits.pretrain for w in c.split()}
    tokens = pipe.tokenizer.tokenize(" ".join(sorted(words)))
    assert pipe.tokenizer.unk_token not in tokens


def test_missing_tiny_model_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "TINY_MODEL_DIR", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="zoo build-tiny"):
        e.load_pipeline("tiny")


def test_pick_device(monkeypatch):
    monkeypatch.delenv("ENTRUTH_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else None
    device = e.pick_device()
    assert device.type in {"cuda", "mps", "cpu"}
    if expected:
        assert device.type == expected
    monkeypatch.setenv("ENTRUTH_DEVICE", "cpu")
    assert e.pick_device().type == "cpu"


def test_batch_sizes_follow_the_resolution():
    """Fixed batches of 64 images run a small GPU out of memory at 512 px; the tiny model's batches stay as they were."""
    import torch

    from entruth_lite.core import models

    assert [models.images_per_batch(side, 64) for side in (32, 64, 256, 512)] == [64, 16, 1, 1]
    seen = []

    class CountingVAE(torch.nn.Module):
        config = type("Config", (), {"scaling_factor": 1.0})()

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def encode(self, batch):
            seen.append(len(batch))
            mean = batch[:, :1, ::8, ::8]
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": mean, "std": mean * 0})()})()

    diffusion.encode_images(CountingVAE(), torch.zeros(3, 3, 256, 256))
    assert seen == [1, 1, 1]
    seen.clear()
    diffusion.encode_images(CountingVAE(), torch.zeros(70, 3, 32, 32))
    assert seen == [64, 6]


def test_images_to_tensor_names_mixed_sizes_and_keeps_values():
    import numpy as np
    from PIL import Image

    from entruth_lite.core import data

    images = [Image.new("RGB", (4, 4), (0, 127, 255)), Image.new("RGB", (4, 4), (255, 255, 255))]
    tensor = data.images_to_tensor(images)
    assert tensor.shape == (2, 3, 4, 4) and tensor.min() == -1 and tensor.max() == 1
    assert np.allclose(tensor[0, :, 0, 0].numpy(), [-1, 127 / 127.5 - 1, 1])
    with pytest.raises(ValueError, match="image 1 is 8x8.*give a size"):
        data.images_to_tensor([images[0], Image.new("RGB", (8, 8))])
    assert data.images_to_tensor([images[0], Image.new("RGB", (8, 8))], size=4).shape == (2, 3, 4, 4)


def test_a_plain_pip_install_ships_the_tiny_model(tmp_path):
    """Colab users may `pip install` the repository without cloning it: the wheel must carry the assets."""
    import subprocess
    import sys
    import zipfile

    repo = models.REPO_ROOT
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(repo)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("entruth_lite-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"entruth_lite/{p.relative_to(repo / 'entruth_lite').as_posix()}"
               for p in models.ASSETS.rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)[:5]
