"""Offline generation quality: FID/KID on a small emoji-category network's features."""

import numpy as np
import pytest
import torch

from entruth_lite.core import emoji as emoji_data
from entruth_lite.evaluation import quality


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return quality.load_feature_net(quality.build_feature_net(tmp_path_factory.mktemp("f"), steps=30, limit=300,
                                                              progress=False))


def test_categories_of_emoji_files():
    split = emoji_data.emoji_splits()
    categories = quality.emoji_categories([p for p, _ in split.pretrain[:200]])
    assert "Other" not in categories[:50] and len(set(categories)) >= 3


def test_features_take_any_image_size(net):
    import torch

    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    assert net(torch.randint(0, 255, (2, 3, 299, 299), dtype=torch.uint8)).shape == (2, 64)


def test_fid_and_kid_are_small_for_the_same_distribution_and_large_for_another(net):
    images = emoji_data.emoji_dataset("owner")[0]
    order = np.random.default_rng(0).permutation(len(images))
    a, b = [images[i] for i in order[:150]], [images[i] for i in order[150:300]]
    from PIL import Image

    noise = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(150)]
    same, other = quality.fid_kid(a, b, net), quality.fid_kid(a, noise, net)
    assert same["fid"] < other["fid"] and same["kid"] < other["kid"]
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    assert quality.fid_kid(a, b, net) == same, "KID's random subsets are seeded: a rerun reports the same numbers"
    assert torch.rand(1) == expected_draw, "the caller's random state is left alone"
    with pytest.raises(ValueError, match="at least 2"):
        quality.fid_kid(a[:1], b, net)


def test_shipped_feature_network_loads_or_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-features"):
        quality.load_feature_net(tmp_path)
    if (quality.FEATURES_DIR / "features.safetensors").is_file():
        assert len(quality.load_feature_net().classes) >= 5


def test_inception_fid_fails_clearly_offline():
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed: Inception FID may work here")
    images = emoji_data.emoji_dataset("owner", limit=4)[0]
    with pytest.raises(RuntimeError, match="offline features"):
        quality.inception_fid(images, images)


def test_quality_cost_is_paired_by_seed():
    import pandas as pd

    results = pd.DataFrame(dict(method=["clean", "entruth", "clean", "entruth", "entruth"], seed=[0, 0, 1, 1, 2],
                                fid=[1.0, 3.0, 5.0, 6.0, 9.0], kid=[0.1, 0.15, 0.2, 0.2, 0.9]))
    cost = quality.cost_against_clean(results)
    assert cost.seed.tolist() == [0, 1], "a seed without its clean model has no cost"
    assert cost.fid.tolist() == [2.0, 1.0] and cost.kid.tolist() == pytest.approx([0.05, 0.0])


def test_clip_score_runs_on_local_weights_and_refuses_to_download(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from entruth_lite.core import models

    # a tiny random CLIP saved to disk: the same code path as real weights in a local cache
    tokenizer = CLIPTokenizer.from_pretrained(models.TINY_MODEL_DIR / "tokenizer")
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # pooled at the EOS token
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(1)  # a random CLIP whose mean cosine on these pairs is positive (torchmetrics clips at 0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "clip")
    images, captions, _ = emoji_data.emoji_dataset("owner", limit=8)
    score = quality.clip_score(images, captions, model=str(tmp_path / "clip"))
    with torch.no_grad():  # the definition: 100 x the mean cosine of each image with its own prompt
        out = clip(**processor(text=captions, images=images, return_tensors="pt", padding=True))
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).mean()
    assert 0 < score == pytest.approx(100 * cosine.item(), rel=1e-4)
    assert quality.clip_score(images, captions[::-1], model=str(tmp_path / "clip")) != pytest.approx(score)
    with pytest.raises(RuntimeError, match="not available here"):
        quality.clip_score(images, captions, model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="one prompt per image"):
        quality.clip_score(images, captions[:2], model=str(tmp_path / "clip"))
