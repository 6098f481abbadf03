"""The diffusion primer's functions (notebook 00b) show what they claim on the tiny model."""

import numpy as np
import pytest
import torch

from entruth_lite.core import emoji as emoji_data
from entruth_lite.core import models
from entruth_lite.teaching import primer


@pytest.fixture(scope="module")
def setting():
    pipe = models.load_pipeline("tiny", device="cpu")
    images, captions, _ = emoji_data.emoji_dataset("owner", limit=1)
    return pipe, images[0], captions[0]


def distance(a, b) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


def test_noise_hides_the_image_more_at_later_timesteps(setting):
    pipe, image, _ = setting
    steps = primer.noised(pipe, image, [0, 300, 600, 999])
    gaps = [distance(x, image) for x in steps]
    assert gaps == sorted(gaps) and gaps[0] < 20 < gaps[-1], gaps  # t = 0 is the autoencoder's round trip
    assert distance(steps[0], primer.decode(pipe, primer.encode(pipe, [image]))[0]) < 1


def test_the_unets_clean_estimate_is_good_early_and_poor_late(setting):
    pipe, image, caption = setting
    early, late = primer.predicted_clean(pipe, image, caption, [50, 950])
    assert distance(early, image) < distance(late, image)
    assert 0 <= primer.loss_at_timestep(pipe, image, caption, 50) < primer.loss_at_timestep(pipe, image, caption, 950)


def test_the_sampling_trajectory_ends_at_the_generated_image(setting):
    pipe, _, caption = setting
    trajectory = primer.sampling_trajectory(pipe, caption, seed=3, steps=6)
    generated = pipe([caption], num_inference_steps=6, height=32, width=32,
                     generator=torch.Generator().manual_seed(3)).images[0]
    assert len(trajectory) == 6 and distance(trajectory[-1], generated) < 1


def test_lora_counts():
    assert primer.lora_parameters(768, 320, 4) == (768 * 320, 4 * (768 + 320))
    with pytest.raises(ValueError, match="rank"):
        primer.lora_parameters(8, 8, 0)
