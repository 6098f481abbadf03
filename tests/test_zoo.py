import numpy as np
import pytest
import torch

from entruth_lite.core import data, diffusion, models, zoo
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


def test_narrowing_the_posterior_keeps_every_mean_and_shrinks_every_sigma_by_one_factor():
    vae = models.tiny_vae().eval().requires_grad_(False)
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    before = vae.encode(images).latent_dist
    factor = zoo.narrow_posterior(vae, images, 0.01)
    after = vae.encode(images).latent_dist
    assert torch.equal(before.mean, after.mean), "the UNet was trained on the means: they must not move"
    assert torch.allclose(after.std, before.std * factor, rtol=1e-4)
    sigma, spread = zoo.posterior_spread(vae, images)
    assert sigma / spread == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ValueError, match="relative_sigma"):
        zoo.narrow_posterior(vae, images, 1.5)


def test_the_shipped_vae_is_nearly_deterministic_as_stable_diffusions_is():
    """A trainer that encodes with latent_dist.sample() (diffusers' scripts) must see about what the base UNet was
    trained on, the posterior means: the draws stray by about 1 % of the latents' spread, and the base model's loss
    on them is the loss on the means."""
    pipe = models.load_pipeline("tiny", device="cpu")
    held, captions, _ = emoji_data.emoji_dataset("probe", limit=32)
    sigma, spread = zoo.posterior_spread(pipe.vae, data.images_to_tensor(held))
    assert sigma / spread < 0.02
    on_means = diffusion.image_losses(pipe, held, captions, repeats=2).mean()
    on_draws = diffusion.image_losses(pipe, held, captions, repeats=2, sample_posterior=True).mean()
    assert abs(on_draws - on_means) < 0.02 * on_means
