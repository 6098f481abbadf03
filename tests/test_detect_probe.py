import numpy as np
import pytest
from PIL import Image

from entruth_lite import data, demo, detect, probe, protect, templates


@pytest.fixture(scope="module")
def emoji():
    images, captions, _ = data.emoji_dataset("owner", limit=24)
    return images, captions


@pytest.mark.parametrize("name", templates.list_templates())
def test_templated_images_score_one_plain_images_near_zero(emoji, name):
    images, _ = emoji
    template = templates.builtin_template(name)
    templated = detect.template_scores(templates.insert(images, template), template)
    plain = detect.template_scores(images, template)
    assert np.allclose(templated, 1.0, atol=1e-4)
    assert np.abs(plain).max() < 0.35 and templated.min() > plain.max() + 0.5


def test_projection_is_zero_on_flat_images_where_ncc_is_not_defined_by_content():
    template = templates.builtin_template("billboard")
    flat = [Image.new("RGB", (32, 32), c) for c in [(255, 255, 255), (0, 0, 0), (200, 10, 10)]]
    assert np.allclose(detect.template_scores(flat, template), 0.0, atol=1e-6)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert abs(detect.template_scores([noisy], template, "ncc")[0]) < 0.2


def test_scores_resize_other_sizes_and_reject_bad_method(emoji):
    images, _ = emoji
    template = templates.builtin_template("frame")
    big = templates.insert(images[0], templates.builtin_template("frame", 128))
    assert detect.template_scores([big], template)[0] > 0.8
    with pytest.raises(ValueError, match="unknown method"):
        detect.template_scores(images, template, method="ssim")
    assert detect.template_scores([], template).shape == (0,)


def test_probe_prompts_are_paired_and_seeded():
    plain, triggered, seeds = probe.probe_prompts(["an emoji of a cat", "an emoji of a dog"], "wqn", n=5)
    assert len(plain) == len(triggered) == len(seeds) == 5
    assert all(t == f"wqn {p}" for p, t in zip(plain, triggered))
    assert len(set(seeds)) == 5
    assert probe.probe_prompts(["x"], "wqn", "suffix", n=1)[1] == ["x wqn"]
    with pytest.raises(ValueError, match="no captions"):
        probe.probe_prompts([], "wqn")


def test_demo_release_is_made_once_and_remade_when_settings_change(tmp_path, monkeypatch):
    images, captions, names = data.emoji_dataset("owner", limit=40)
    monkeypatch.setattr(data, "write_emoji_dataset",
                        lambda out, size=32, overwrite=False: data.save_imagefolder(images, captions, out, file_names=names,
                                                                           overwrite=overwrite))
    first = demo.release(tmp_path, rate=0.05, seed=0)
    key = protect.load_key(first.key)
    assert len(key.files) == 2
    stamp = (first.key / "key.json").stat().st_mtime_ns
    demo.release(tmp_path, rate=0.05, seed=0)
    assert (first.key / "key.json").stat().st_mtime_ns == stamp, "same settings: reused"
    demo.release(tmp_path, rate=0.1, seed=0)
    assert len(protect.load_key(first.key).files) == 4
