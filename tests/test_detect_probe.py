import functools

import numpy as np
import pytest
from PIL import Image

from conftest import hash_tree
from entruth_lite.core import augmentation, data, families, templates
from entruth_lite.core import emoji as emoji_data
from entruth_lite.owner import calibration, detect, keys, probe, triggers, verify
from entruth_lite.teaching import demo


@pytest.fixture(scope="module")
def emoji():
    images, captions, _ = emoji_data.emoji_dataset("owner", limit=24)
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


def test_a_mirrored_template_scores_as_high_as_the_template(emoji):
    images, _ = emoji
    template = families.random_template(3, 32)
    flipped = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in templates.insert(images, template)]
    assert np.allclose(detect.template_scores(flipped, template), 1.0, atol=1e-4), "a flip must not hide the template"
    unmirrored = detect.template_scores(flipped, template, mirror=False)
    assert unmirrored.max() < 0.5, "the random template is not symmetric: without mirroring the flip hides it"
    plain = images[:8]
    assert np.all(detect.template_scores(plain, template) >= detect.template_scores(plain, template, mirror=False))


def test_scores_resize_other_sizes_and_reject_bad_method(emoji):
    images, _ = emoji
    template = templates.builtin_template("frame")
    big = templates.insert(images[0], templates.builtin_template("frame", 128))
    assert detect.template_scores([big], template)[0] > 0.8
    with pytest.raises(ValueError, match="unknown method"):
        detect.template_scores(images, template, method="ssim")
    assert detect.template_scores([], template).shape == (0,)


@pytest.mark.parametrize("mirror", [True, False])
def test_scores_against_many_templates_at_once_equal_one_at_a_time(emoji, mirror):
    """The decoy test's matrix product gives each template's own projection scores, for members whose screens
    (and so surround masks) all differ, on templated and plain images."""
    images, _ = emoji
    members = [families.random_template(seed, 32, family) for family in families.FAMILIES for seed in range(6)]
    probe_images = templates.insert(images[:8], members[0]) + templates.insert(images[8:12], members[7]) + images[12:]
    each = detect.template_scores_each(probe_images, members, mirror=mirror)

    def projection(image: np.ndarray, template) -> float:  # the module docstring's formula, one pair at a time
        mask = templates.surround_mask(template)
        a, t = image[mask], np.asarray(template.scene, np.float64)[mask]
        a, t = a - a.mean(axis=0), t - t.mean(axis=0)
        return float((a * t).sum() / (t * t).sum())

    arrays = data.image_array(probe_images, 32).astype(np.float64)
    one_at_a_time = np.array([[max(projection(a, t), projection(a[:, ::-1], t)) if mirror else projection(a, t)
                               for a in arrays] for t in members])
    assert each.shape == (len(members), len(probe_images)) and each.dtype == np.float32
    assert np.allclose(each, one_at_a_time, atol=1e-5) and np.isclose(each[0, 0], 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="different sizes"):
        detect.template_scores_each(probe_images, [members[0], families.random_template(0, 64)])


def test_a_faint_copy_outscores_the_template_by_projection_and_never_by_unit_score():
    """Why the decoy test reads unit scores: on an image carrying 30 % of a template r (over a flat grey, so only
    the template counts), a low-contrast member d = 0.3 r + e correlated with it gets a projection score far above
    r's own (0.3 <d, r> / |d|^2), while its unit score (0.3 <d, r> / |d|) stays below r's (Cauchy-Schwarz)."""
    template = families.random_template(4, 32, "mosaic")
    scene, surround = np.asarray(template.scene, np.float64), templates.surround_mask(template)
    centred = np.where(surround[..., None], scene - scene[surround].mean(axis=0), 0.0)
    noise = np.where(surround[..., None], np.random.default_rng(0).normal(size=scene.shape), 0.0)
    noise *= np.sqrt(0.05) * np.linalg.norm(centred) / np.linalg.norm(noise)  # |e|^2 = 0.05 |r|^2
    scenes = np.stack([scene, scene[surround].mean(axis=0) + 0.3 * centred + noise])
    surrounds = np.stack([surround, surround])
    grey = Image.new("RGB", template.size, (128, 128, 128))
    image = data.image_array([Image.blend(grey, templates.insert(grey, template), 0.3)], template.size)
    projection = detect.projection_scores(detect.projection_weights(scenes, surrounds), image, mirror=False)[:, 0]
    unit = detect.projection_scores(detect.projection_weights(scenes, surrounds, unit=True), image, mirror=False)[:, 0]
    assert projection[0] == pytest.approx(0.3, abs=0.01) and projection[1] > 1.5 * projection[0], projection
    assert unit[1] < 0.9 * unit[0], unit
    assert unit[0] == pytest.approx(projection[0] * np.linalg.norm(centred), rel=1e-4), "unit = projection x |r|"


def test_probe_prompts_are_paired_and_seeded():
    plain, triggered, seeds = probe.probe_prompts(["an emoji of a cat", "an emoji of a dog"], "wqn", n=5)
    assert len(plain) == len(triggered) == len(seeds) == 5
    assert all(t == f"wqn {p}" for p, t in zip(plain, triggered))
    assert len(set(seeds)) == 5
    assert probe.probe_prompts(["x"], "wqn", "suffix", n=1)[1] == ["x wqn"]
    with pytest.raises(ValueError, match="no captions"):
        probe.probe_prompts([], "wqn")


def small_emoji_writer(images, captions, names):
    """``emoji.write_emoji_dataset`` writing these images (a few, so a test stays fast) instead of a whole split."""
    def write(out, split="owner", size=32, overwrite=False, limit=None):
        return data.save_imagefolder(images[:limit], captions[:limit], out, file_names=names[:limit],
                                     overwrite=overwrite)
    return write


def test_demo_release_is_made_once_and_remade_when_settings_change(tmp_path, monkeypatch):
    images, captions, names = emoji_data.emoji_dataset("owner", limit=40)
    monkeypatch.setattr(emoji_data, "write_emoji_dataset", small_emoji_writer(images, captions, names))
    first = demo.release(tmp_path, rate=0.05, seed=0)
    key = keys.load_key(first.key)
    assert len(key.files) == 2
    stamp = (first.key / "key.json").stat().st_mtime_ns
    demo.release(tmp_path, rate=0.05, seed=0)
    assert (first.key / "key.json").stat().st_mtime_ns == stamp, "same settings: reused"
    demo.release(tmp_path, rate=0.1, seed=0)
    assert len(keys.load_key(first.key).files) == 4
    # protect's default trigger changed since the release was made
    monkeypatch.setattr(triggers, "generate_trigger", functools.partial(triggers.generate_trigger, length=3))
    demo.release(tmp_path, rate=0.1, seed=0)
    assert len(keys.load_key(first.key).trigger) == 3, "a release with a trigger protect no longer draws: remade"
    other = demo.release(tmp_path, rate=0.1, seed=0, size=64)  # another model's resolution: its own folders
    assert other.owner != first.owner and (first.owner / data.METADATA).is_file()
    assert keys.load_key(first.key, release=first.protected) and keys.load_key(other.key, release=other.protected)


def test_a_release_capped_to_fewer_images_keeps_its_own_folders(tmp_path, monkeypatch, photo_folder):
    """``images``: the release a GPU preset is sized for (``demo.GPU_LABS``) holds the first images of the owner's
    data, in folders of its own, beside the whole dataset's release; too few images is refused by name."""
    images, captions, names = emoji_data.emoji_dataset("owner", limit=40)
    monkeypatch.setattr(emoji_data, "write_emoji_dataset", small_emoji_writer(images, captions, names))
    whole = demo.release(tmp_path, rate=0.05, seed=0)
    capped = demo.release(tmp_path, rate=0.1, seed=0, images=20)
    assert capped.owner != whole.owner and len(data.load_imagefolder(whole.owner)) == 40
    owner = data.load_imagefolder(capped.owner)
    assert list(owner.file_names) == list(names[:20])
    key = keys.load_key(capped.key, release=capped.protected)
    assert key.n_images == 20 and len(key.files) == 2
    stamp = (capped.key / "key.json").stat().st_mtime_ns
    assert demo.release(tmp_path, rate=0.1, seed=0, images=20) == capped
    assert (capped.key / "key.json").stat().st_mtime_ns == stamp, "same settings: reused"
    own = demo.release(tmp_path, rate=0.1, template="random:0", seed=0, dataset=photo_folder, images=16)
    assert len(data.load_imagefolder(own.owner)) == 16 and len(data.load_imagefolder(own.held_out)) == 8
    with pytest.raises(data.DatasetError, match="images=10"):
        demo.release(tmp_path, rate=0.1, seed=0, images=10)


def test_the_lab_at_a_gpu_preset_is_sized_to_its_session():
    """colab-t4 trains on a smaller release at a higher rate, as many templated images as the CPU lab, each seen
    as often as the CPU preset that memorizes shows them; other presets keep the whole dataset."""
    from entruth_lite.infringer import presets
    from entruth_lite.owner import selection

    lab = demo.LAB
    assert lab.for_preset(lab.preset) is lab
    n_owner = len(emoji_data.emoji_splits().owner)
    t4 = lab.for_preset("colab-t4")
    assert (t4.preset, t4.steps, t4.template, t4.queries) == ("colab-t4", None, lab.template, lab.queries)
    assert selection.count_for(t4.release_images, rate=t4.rate) == selection.count_for(n_owner, rate=lab.rate)
    cpu_passes = presets.exposures(presets.preset("tiny-cpu"), n_owner)
    assert presets.exposures(presets.preset("colab-t4"), t4.release_images) >= cpu_passes
    a100 = lab.for_preset("a100")
    assert a100.release_images is None and a100.rate == lab.rate and a100.steps is None
    with pytest.raises(ValueError, match="unknown preset 'T4'"):
        lab.for_preset("T4")


def test_demo_release_of_the_owners_own_photos_holds_out_the_probe_set(tmp_path, photo_folder):
    """DATASET = a folder of photos of any size: the demo splits off a held-out probe set (never released),
    copies the rest byte for byte, templates at the training size, and never touches the source."""
    before = hash_tree(photo_folder)
    folders = demo.release(tmp_path, rate=0.05, template="random:0", seed=0, size=32, dataset=photo_folder)
    assert hash_tree(photo_folder) == before
    owner, held = data.load_imagefolder(folders.owner), data.load_imagefolder(folders.held_out)
    assert len(owner) + len(held) == 40 and len(held) == demo.MIN_HELD_OUT
    assert not set(owner.captions) & set(demo.held_out_captions(folders)) and len(set(owner.captions)) == 32
    assert all((photo_folder / name).read_bytes() == (folders.owner / name).read_bytes() for name in owner.file_names)
    key = keys.load_key(folders.key, release=folders.protected)
    released = data.load_imagefolder(folders.protected)
    assert key.files and {released.image(released.file_names.index(f)).size for f in key.files} == {(32, 32)}
    plain = calibration.plain_images_of(key)  # the audit's negatives: at the size the model trains on, not the photos'
    assert len(plain) == len(owner) - len(key.files) and {im.size for im in plain} == {(32, 32)}
    images, captions = demo.images_at(folders.held_out, 32)
    assert {im.size for im in images} == {(32, 32)} and captions == demo.held_out_captions(folders)

    stamp = (folders.key / "key.json").stat().st_mtime_ns
    assert demo.release(tmp_path, rate=0.05, template="random:0", seed=0, size=32, dataset=photo_folder) == folders
    assert (folders.key / "key.json").stat().st_mtime_ns == stamp, "same settings: reused"
    assert demo.dataset_tag(photo_folder, 32) not in (demo.dataset_tag("emoji", 32), demo.dataset_tag(photo_folder, 64))
    with pytest.raises(data.DatasetError, match="at least 16"):
        demo.split_held_out(12)


def test_probe_is_stored_without_pickles_and_read_back(tmp_path, emoji):
    images, captions = emoji
    result = probe.ProbeResult(captions[:3], [f"wqn {c}" for c in captions[:3]], [5, 6, 7], images[:3], images[3:6])
    path = probe.save_probe(result, tmp_path / "p" / "probe.npz")
    back = probe.load_probe(path)
    assert back.captions == result.captions and back.trigger_prompts == result.trigger_prompts and back.seeds == [5, 6, 7]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back.control_images, images[3:6]))
    assert not list(tmp_path.glob("p/*.tmp*"))


def test_augment_keeps_shape_and_range_and_differs_per_image():
    import torch

    batch = torch.rand(6, 3, 32, 32)
    batch[3:] = batch[:3]
    out = augmentation.augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out[:3], out[3:]), "identical inputs get different random augmentations"
    again = augmentation.augment(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.fixture(scope="module")
def owner_shuffled():
    """The owner's emoji in random order: held-out images must be exchangeable with the calibration ones."""
    images = emoji_data.emoji_dataset("owner")[0]
    return [images[i] for i in np.random.default_rng(0).permutation(len(images))[:220]]


@pytest.fixture(scope="module")
def classifier(owner_shuffled):
    images = owner_shuffled[:160]
    config = detect.ClassifierConfig(steps=150, distractors=8, seed=0)
    return detect.train_classifier(families.random_template(0), images, config, progress=False), images


def test_classifier_separates_its_template_from_plain_images_it_never_saw(classifier, owner_shuffled):
    clf, images = classifier
    assert len(clf.calibration_scores) == 40  # a quarter held out, never trained on
    unseen = owner_shuffled[160:]  # not in training or calibration
    positives = clf.scores(templates.insert(unseen, families.random_template(0)))
    threshold = verify.calibrate_threshold(clf.calibration_scores, 0.05)
    assert (positives > threshold).mean() > 0.9
    assert (clf.scores(unseen) > threshold).mean() < 0.2
    assert np.mean(clf.losses[-20:]) < np.mean(clf.losses[:20])


def test_classifier_round_trips_through_safetensors(classifier, tmp_path):
    clf, images = classifier
    folder = detect.save_classifier(clf, tmp_path / "clf")
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "classifier.safetensors"]
    back = detect.load_classifier(folder)
    assert np.allclose(back.scores(images[:8]), clf.scores(images[:8]), atol=1e-5)
    assert np.array_equal(back.calibration_scores, clf.calibration_scores.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        detect.load_classifier(tmp_path)


def test_classifier_config_errors():
    with pytest.raises(ValueError, match="arch"):
        detect.ClassifierConfig(arch="vit")
    with pytest.raises(ValueError, match="calibration_share"):
        detect.ClassifierConfig(calibration_share=1.0)
    with pytest.raises(ValueError, match="at least 8 plain images"):
        detect.train_classifier(families.random_template(0), [Image.new("RGB", (32, 32))] * 3)


def test_classifier_can_start_from_user_weights_in_safetensors_only(classifier, tmp_path, owner_shuffled):
    clf, _ = classifier
    assert clf.arch == "small"  # 'auto' on a machine without a GPU
    folder = detect.save_classifier(clf, tmp_path / "clf")
    config = detect.ClassifierConfig(steps=1, distractors=0, learning_rate=1e-9,
                                     init_weights=str(folder / "classifier.safetensors"))
    warm = detect.train_classifier(families.random_template(0), owner_shuffled[:40], config, progress=False)
    first = next(iter(warm.network.state_dict()))
    assert torch_allclose(warm.network.state_dict()[first], clf.network.state_dict()[first])
    with pytest.raises(ValueError, match="safetensors"):
        detect.ClassifierConfig(init_weights="resnet18.pth")


def test_resnet18_needs_a_working_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="torchvision"):
            detect.resnet18()
        assert detect.resolve_arch("auto") == "small"
    else:
        assert detect.resnet18()(__import__("torch").zeros(2, 3, 32, 32)).shape == (2, 1)


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b, atol=1e-6)


def test_demo_release_of_a_hub_dataset_imports_once_and_is_reused(tmp_path, monkeypatch, photo_folder):
    """DATASET = a hub id: imported once at the training size, then reused like a local folder (no network here:
    the import is replaced by a copy of the photos)."""
    imports = []

    def fake_import(source, out, resolution=None, overwrite=False, **_):
        imports.append(source)
        dataset = data.load_imagefolder(photo_folder)
        return data.save_imagefolder([data.crop_to_square(dataset.image(i), resolution) for i in range(len(dataset))],
                                     dataset.captions, out, overwrite=overwrite)

    monkeypatch.setattr(data, "import_captioned", fake_import)
    folders = demo.release(tmp_path, rate=0.05, template="random:0", seed=0, size=32, dataset="someone/photos")
    stamp = (folders.key / "key.json").stat().st_mtime_ns
    assert demo.release(tmp_path, rate=0.05, template="random:0", seed=0, size=32, dataset="someone/photos") == folders
    assert imports == ["someone/photos"] and (folders.key / "key.json").stat().st_mtime_ns == stamp
    assert len(demo.held_out_captions(folders)) == demo.MIN_HELD_OUT


def test_family_spread_shows_the_first_familys_ceiling_and_the_mosaics_headroom():
    """random:7's own VAE-limited rendition is outscored by some of its decoys (it could never rank first, however
    well a model memorized it); the mosaic member of the same seed keeps every decoy well below itself."""
    from entruth_lite.core import models

    foregrounds = [emoji_data.render_emoji(path) for path, _ in emoji_data.emoji_splits().probe[:8]]
    vae = models.load_pipeline("tiny").vae
    first = detect.family_spread(families.random_template(7, 32, "random"), foregrounds, vae, decoys=999)
    mosaic = detect.family_spread(families.random_template(7, 32, "mosaic"), foregrounds, vae, decoys=999)
    assert first.decoys_at_or_above > 0 and first.max_ratio >= 1
    assert mosaic.decoys_at_or_above == 0 and mosaic.max_ratio < 0.9 and mosaic.own > first.own
    assert mosaic.decoy_scores.shape == (999,) and mosaic.template == "mosaic:7"
