import numpy as np
import torch

from entruth_lite.core import models, zoo
from entruth_lite.core import emoji as emoji_data


def test_random_shapes_are_images_in_range():
    shapes = zoo.random_shapes(6, 32, np.random.default_rng(0))
    assert shapes.shape == (6, 3, 32, 32)
    assert shapes.min() >= -1 and shapes.max() <= 1
    assert shapes.flatten(1).std(dim=1).min() > 0  # every image has some structure


def test_built_tokenizer_covers_every_byte():
    tokenizer = zoo.build_tokenizer(["an emoji of a red apple", "an emoji of a dog"], vocab_size=300)
    tokens = tokenizer.tokenize("an emoji of a Ωmega ✨ xqz 42")
    assert tokens and tokenizer.unk_token not in tokens
    assert tokenizer.model_max_length == models.TINY_MAX_TOKENS


def test_build_tiny_writes_a_loadable_pipeline(tmp_path, monkeypatch):
    # a few steps on a slice of the corpus: checks the whole build path, not the quality
    real_splits = emoji_data.emoji_splits

    def few_splits():
        splits = real_splits()
        return emoji_data.EmojiSplits(splits.pretrain[:48], splits.owner[:8], splits.probe[:4], splits.unnamed)

    monkeypatch.setattr(emoji_data, "emoji_splits", few_splits)
    config = zoo.TinyBuildConfig(vocab_size=300, vae_steps=3, unet_steps=3, vae_batch=4, unet_batch=4)
    out = zoo.build_tiny(tmp_path / "tiny", config, log=lambda *_: None)
    assert not list(tmp_path.glob(".tiny*")), "no staging folder left behind"
    pipe = models.load_pipeline(out, device="cpu")
    assert pipe.vae.config.scaling_factor > 0
    image = pipe(["an emoji of a dog"], num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
