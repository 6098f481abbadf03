import itertools
import json

import numpy as np
import pytest
from PIL import Image

from entruth_lite.core import families, template_io, templates
from entruth_lite.core.templates import Template, builtin_template, insert, surround_mask, validate_corners

RECT = [(4, 4), (28, 4), (28, 28), (4, 28)]


def solid(colour, size=(20, 20)):
    return Image.new("RGB", size, colour)


def plain_template(size=32, corners=RECT, colour=(10, 200, 30)):
    return Template("plain", solid(colour, (size, size)), corners)


# ----------------------------------------------------------------------------- corners


@pytest.mark.parametrize(
    "order",
    [
        [(4, 4), (28, 4), (28, 28), (4, 28)],  # already TL, TR, BR, BL
        [(4, 28), (28, 28), (28, 4), (4, 4)],  # counter-clockwise from BL
        [(28, 28), (4, 4), (4, 28), (28, 4)],  # scrambled (a "bow tie" listing)
        [(28, 4), (28, 28), (4, 28), (4, 4)],  # clockwise from TR
    ],
)
def test_corner_order_is_normalised_to_clockwise_from_top_left(order):
    assert validate_corners(order, (32, 32)) == ((4.0, 4.0), (28.0, 4.0), (28.0, 28.0), (4.0, 28.0))


def test_slanted_quad_keeps_its_corners():
    corners = [(27.5, 6.5), (5, 4.5), (5, 27.5), (27.5, 25.5)]
    assert validate_corners(corners, (32, 32)) == ((5.0, 4.5), (27.5, 6.5), (27.5, 25.5), (5.0, 27.5))


@pytest.mark.parametrize(
    "corners, message",
    [
        ([(4, 4), (28, 4), (28, 28)], "exactly 4 corners, got 3"),
        ([(4, 4), (28, 4), (28, 28), (4, 28), (16, 30)], "exactly 4 corners, got 5"),
        ([(4, 4), (40, 4), (28, 28), (4, 28)], r"corner \(40, 4\) lies outside the 32x32 image"),
        ([(-1, 4), (28, 4), (28, 28), (4, 28)], "outside"),
        ([(4, 4), (28, 4), (10, 10), (4, 28)], "not form a convex"),  # a dart: (10, 10) is inside the triangle
        ([(4, 4), (16, 4), (28, 4), (16, 28)], "collinear"),
        ([(4, 4), (4, 4), (28, 28), (4, 28)], "coincide"),
        ([(4, 4), (4.5, 4), (4.5, 4.5), (4, 4.5)], "degenerate"),
        ([(4, 4), (28, 4), (28, float("nan")), (4, 28)], "finite"),
        ([(4, 4, 1), (28, 4, 1), (28, 28, 1), (4, 28, 1)], "shape"),
    ],
)
def test_bad_corners_are_refused_with_the_problem_named(corners, message):
    with pytest.raises(ValueError, match=message):
        validate_corners(corners, (32, 32))


def test_template_validates_on_construction():
    with pytest.raises(ValueError, match="outside"):
        Template("t", solid((0, 0, 0), (16, 16)), [(0, 0), (20, 0), (16, 16), (0, 16)])
    with pytest.raises(ValueError, match="name"):
        Template("", solid((0, 0, 0), (16, 16)), RECT[:])


def test_corners_may_touch_the_image_border():
    template = Template("full", solid((1, 2, 3), (16, 16)), [(0, 0), (16, 0), (16, 16), (0, 16)])
    assert not surround_mask(template).any()


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", templates.list_templates())
@pytest.mark.parametrize("size", [32, 128])
def test_builtin_templates(name, size):
    template = builtin_template(name, size)
    assert template.scene.size == (size, size) and template.scene.mode == "RGB"
    assert template.name == name
    assert 0.35 < template.screen_area < 0.65  # a big screen, and a big surround
    surround = np.asarray(template.scene)[surround_mask(template)]
    assert surround.std(axis=0).max() > 40  # high contrast, not a flat colour
    assert template.corners == validate_corners(template.corners, template.size)
    again = builtin_template(name, size)
    assert np.array_equal(np.asarray(again.scene), np.asarray(template.scene))  # deterministic


def test_builtins_scale_and_differ():
    assert set(templates.list_templates()) >= {"billboard", "frame", "window", "tv"}
    small, big = builtin_template("billboard", 32), builtin_template("billboard", 128)
    assert np.allclose(np.asarray(big.corners) / 4, np.asarray(small.corners))
    shrunk = np.asarray(big.scene.resize((32, 32), Image.Resampling.BOX), dtype=float)
    assert np.abs(shrunk - np.asarray(small.scene, dtype=float)).mean() < 2  # the same design at any size
    scenes = [np.asarray(builtin_template(n).scene, dtype=float) for n in templates.list_templates()]
    for i in range(len(scenes)):
        for j in range(i + 1, len(scenes)):
            assert np.abs(scenes[i] - scenes[j]).mean() > 30


def test_billboard_screen_is_in_perspective_and_sizes_can_be_rectangular():
    corners = np.asarray(builtin_template("billboard").corners)
    left, right = corners[3, 1] - corners[0, 1], corners[2, 1] - corners[1, 1]
    assert left != right
    template = builtin_template("tv", (48, 32))
    assert template.size == (48, 32)


def test_builtin_errors():
    with pytest.raises(ValueError, match="unknown template 'poster'.*billboard"):
        builtin_template("poster")
    with pytest.raises(ValueError, match="too small"):
        builtin_template("tv", 4)


# ----------------------------------------------------------------------------- insertion


@pytest.mark.parametrize("name", templates.list_templates())
def test_insert_keeps_surround_and_shows_the_foreground(name):
    template = builtin_template(name, 32)
    out = insert(solid((250, 20, 120), (72, 72)), template)
    assert out.size == template.size and out.mode == "RGB"
    surround = surround_mask(template)
    assert np.array_equal(np.asarray(out)[surround], np.asarray(template.scene)[surround])
    cx, cy = np.asarray(template.corners).mean(axis=0)
    assert tuple(np.asarray(out)[int(cy), int(cx)]) == (250, 20, 120)
    assert surround.mean() > 0.3 and (~surround).mean() > 0.3


def test_insert_is_deterministic_and_takes_any_size_and_mode():
    template = builtin_template("billboard", 32)
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    first, second = insert(noisy, template), insert(noisy, template)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    rgba = Image.new("RGBA", (9, 13), (0, 0, 255, 255))
    grey = Image.new("L", (100, 100), 77)
    assert insert(rgba, template).size == (32, 32)
    centre = np.asarray(insert(grey, template))[16, 16]
    assert tuple(centre) == (77, 77, 77)


def test_insert_maps_the_foreground_upright_into_the_screen():
    # left half red, right half blue: after insertion the screen's left part is red, the right part blue
    foreground = Image.new("RGB", (40, 40), (255, 0, 0))
    foreground.paste((0, 0, 255), (20, 0, 40, 40))
    top = Image.new("RGB", (40, 40), (0, 255, 0))
    top.paste((255, 255, 0), (0, 20, 40, 40))
    template = plain_template()
    out = np.asarray(insert(foreground, template))
    assert tuple(out[16, 8]) == (255, 0, 0) and tuple(out[16, 24]) == (0, 0, 255)
    out = np.asarray(insert(top, template))
    assert tuple(out[8, 16]) == (0, 255, 0) and tuple(out[24, 16]) == (255, 255, 0)


def test_insert_edges_are_anti_aliased():
    template = plain_template(corners=[(4.5, 4.5), (27.5, 4.5), (27.5, 27.5), (4.5, 27.5)], colour=(0, 0, 0))
    out = np.asarray(insert(solid((200, 200, 200)), template))
    assert tuple(out[16, 4]) == (100, 100, 100)  # half-covered edge pixel: half scene, half foreground
    assert tuple(out[16, 3]) == (0, 0, 0) and tuple(out[16, 5]) == (200, 200, 200)


def test_insert_batch_matches_single_calls():
    template = builtin_template("frame", 32)
    images = [solid((i * 40, 100, 200 - i * 30), (16 + i, 16)) for i in range(5)]
    batch = insert(images, template)
    assert isinstance(batch, list) and len(batch) == 5
    for image, result in zip(images, batch):
        assert np.array_equal(np.asarray(result), np.asarray(insert(image, template)))
    assert insert([], template) == []


def test_screen_coverage_matches_area():
    template = builtin_template("billboard", 64)
    coverage = templates.screen_coverage(template)
    assert coverage.min() == 0 and coverage.max() == 1
    assert coverage.sum() == pytest.approx(templates.quad_area(template.corners), rel=0.01)


# ----------------------------------------------------------------------------- user templates and IO


def test_template_from_image_with_corners():
    scene = solid((30, 30, 30), (40, 30))
    template = templates.template_from_image(scene, corners=[(30, 25), (5, 5), (35, 5), (5, 25)], name="mine")
    assert template.name == "mine" and template.size == (40, 30)
    assert template.corners == ((5.0, 5.0), (35.0, 5.0), (30.0, 25.0), (5.0, 25.0))


def test_template_from_key_colour_fits_the_screen():
    scene = solid((200, 50, 50), (40, 40))
    scene.paste((0, 255, 0), (6, 8, 30, 36))  # the green screen: x 6..30, y 8..36 (exclusive ends)
    noisy = np.asarray(scene).copy()
    noisy[10, 10] = (10, 240, 15)  # within tolerance of the key colour
    template = templates.template_from_image(Image.fromarray(noisy), key_colour=(0, 255, 0), tolerance=30)
    assert template.corners == ((6.0, 8.0), (30.0, 8.0), (30.0, 36.0), (6.0, 36.0))
    assert surround_mask(template).sum() == 40 * 40 - 24 * 28


def test_template_from_key_colour_on_a_slanted_screen():
    from PIL import ImageDraw

    scene = solid((200, 50, 50), (64, 64))
    ImageDraw.Draw(scene).polygon([(10, 8), (54, 14), (54, 50), (10, 56)], fill=(0, 255, 0))
    template = templates.template_from_image(scene, key_colour=(0, 255, 0))
    corners = np.asarray(template.corners)
    assert np.abs(corners - [(10, 8), (55, 14), (55, 51), (10, 57)]).max() <= 1.5


def test_template_from_image_errors():
    scene = solid((200, 50, 50), (20, 20))
    with pytest.raises(ValueError, match="empty"):
        templates.template_from_image(scene, key_colour=(0, 255, 0))
    with pytest.raises(ValueError, match="exactly one"):
        templates.template_from_image(scene)
    with pytest.raises(ValueError, match="exactly one"):
        templates.template_from_image(scene, corners=RECT, key_colour=(0, 0, 0))
    with pytest.raises(ValueError, match="triple"):
        templates.template_from_image(scene, key_colour=(0, 255))


def test_save_and_load_template(tmp_path):
    template = builtin_template("window", 48)
    template_io.save_template(template, tmp_path / "tpl")
    meta = json.loads((tmp_path / "tpl" / "template.json").read_text())
    assert meta["name"] == "window" and meta["size"] == [48, 48] and len(meta["corners"]) == 4
    back = template_io.load_template(tmp_path / "tpl")
    assert back.name == template.name and back.corners == template.corners
    assert np.array_equal(np.asarray(back.scene), np.asarray(template.scene))
    assert template_io.resolve_template(str(tmp_path / "tpl")).corners == template.corners
    Image.new("RGB", (48, 48)).save(tmp_path / "tpl" / "template.png")
    with pytest.raises(ValueError, match="does not match the scene hash"):
        template_io.load_template(tmp_path / "tpl")
    with pytest.raises(FileNotFoundError):
        template_io.load_template(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown template"):
        template_io.resolve_template("nope")


def test_vae_round_trip_with_a_stand_in_vae():
    import torch

    class Identity(torch.nn.Module):
        """Encodes to the image itself: the round trip must give the images back."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return type("Out", (), {"latent_dist": type("D", (), {"mean": x})()})()

        def decode(self, z):
            return type("Out", (), {"sample": z})()

    images = [builtin_template("tv").scene, solid((5, 6, 7), (32, 32))]
    pipe = type("Pipe", (), {"vae": Identity()})()
    back = templates.vae_round_trip(pipe, images)
    for a, b in zip(images, back):
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1


def test_surround_distance():
    template = builtin_template("tv", 32)
    templated = insert(solid((255, 0, 0)), template)
    assert templates.surround_distance(templated, template) == 0
    assert templates.surround_distance(solid((255, 255, 255), (32, 32)), template) > 50
    big = insert(solid((255, 0, 0)), builtin_template("tv", 128))
    assert templates.surround_distance(big, template) < 10  # compared at the template's size


def test_surround_view_greys_the_screen_only():
    template = builtin_template("frame", 32)
    view = np.asarray(templates.surround_view(template))
    surround = surround_mask(template)
    assert np.array_equal(view[surround], np.asarray(template.scene)[surround])
    assert (view[~surround] == 128).all()


def test_vae_round_trip_with_the_tiny_vae_architecture():
    import torch

    from entruth_lite.core import models

    torch.manual_seed(0)
    vae = models.tiny_vae().eval()  # untrained: only shapes and plumbing are checked here
    images = insert([solid((200, 0, 0)), solid((0, 0, 200))], builtin_template("tv"))
    back = templates.vae_round_trip(vae, images)
    assert [b.size for b in back] == [(32, 32), (32, 32)] and all(b.mode == "RGB" for b in back)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_random_family_is_seeded_distinct_and_scales(family):
    a, again, b = (families.random_template(s, 32, family) for s in (3, 3, 4))
    assert a.name == f"{family}:3" and a.family == family
    assert np.array_equal(np.asarray(a.scene), np.asarray(again.scene)) and a.corners == again.corners
    assert not np.array_equal(np.asarray(a.scene), np.asarray(b.scene))
    big = families.random_template(3, 128, family)
    assert big.size == (128, 128) and np.allclose(np.asarray(big.corners) / 4, np.asarray(a.corners))
    assert 0.3 < a.screen_area < 0.7  # a big screen, a wide surround
    assert template_io.resolve_template(f"{family}:3", 64).name == f"{family}:3"
    with pytest.raises(ValueError, match="integer seed"):
        template_io.resolve_template(f"{family}:x")


def test_fresh_draws_come_from_the_default_family_and_unknown_families_are_refused():
    assert families.random_template().family == families.DEFAULT_FAMILY  # a fresh secret seed
    assert template_io.resolve_template(families.DEFAULT_FAMILY).family == families.DEFAULT_FAMILY
    first, second = (template_io.resolve_template("ring") for _ in range(2))
    assert first.family == "ring" and first.name != second.name, "a family name is a fresh secret draw each time"
    with pytest.raises(ValueError, match="'random' no longer names a template: give a family name"):
        template_io.resolve_template("random")
    with pytest.raises(ValueError, match="unknown template family 'stripes'"):
        families.random_template(0, 32, "stripes")


# Keys name their template "<family>:<seed>" and are verified by redrawing it, so a member must never change.
FROZEN_MEMBERS = {
    "ring": "d537f12a1f613a78101270f5be4683b310fb5be1bad57d3853f730b85dbbd745",  # first released as "random"
    "mosaic": "7eab3004f81608ec5133f7d65e6c4c80729b5bbec527c7ee93f62ffe874c5daf",
}


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_family_members_never_change(family):
    import hashlib

    member = families.random_template(7, 32, family)
    assert hashlib.sha256(np.asarray(member.scene).tobytes()).hexdigest() == FROZEN_MEMBERS[family]


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_members_of_the_family_do_not_match_each_other(family):
    from entruth_lite.owner import detect

    owner = families.random_template(0, 32, family)
    others = [families.random_template(s, 32, family) for s in range(1, 41)]
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    scores = np.array([detect.template_scores([templates.insert(white, t)], owner)[0] for t in others])
    assert np.median(np.abs(scores)) < 0.25, "decoys must be genuinely different templates"


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_decoys_are_reproducible_exclude_the_release_and_need_a_family_template(family):
    owner = families.random_template(11, 32, family)
    decoys = families.decoy_templates(owner, 20, salt="key-hash")
    names = [d.name for d in decoys]
    assert len(set(names)) == 20 and owner.name not in names
    assert names == [d.name for d in families.decoy_templates(owner, 20, salt="key-hash")]
    assert names != [d.name for d in families.decoy_templates(owner, 20, salt="other")]
    assert all(d.family == family and d.name.startswith(f"{family}:") and d.size == owner.size for d in decoys)
    with pytest.raises(ValueError, match="not drawn from a random family"):
        families.decoy_templates(templates.builtin_template("billboard"), 5)
    with pytest.raises(ValueError, match="positive"):
        families.decoy_templates(owner, 0)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_family_survives_save_and_load(tmp_path, family):
    owner = families.random_template(5, 32, family)
    loaded = template_io.load_template(template_io.save_template(owner, tmp_path))
    assert loaded.family == family and loaded.name == f"{family}:5"
    assert template_io.load_template(template_io.save_template(templates.builtin_template("tv"), tmp_path / "b")).family is None


def test_the_ring_familys_first_name_draws_the_same_members_and_keeps_their_decoys():
    """Keys and benchmark runs made before the rename name their template ``random:<seed>``: it must resolve to the
    same drawing, keep its name (the decoys are drawn from the name) and so keep its decoys, exactly."""
    old, new = template_io.resolve_template("random:7"), template_io.resolve_template("ring:7")
    assert np.array_equal(np.asarray(old.scene), np.asarray(new.scene)) and old.corners == new.corners
    assert (old.name, old.family) == ("random:7", "random") and families.is_family("random")
    assert "random" not in families.FAMILIES, "the old name is accepted, not offered"
    decoys = families.decoy_templates(old, 3, salt="key")  # as drawn before the rename (frozen)
    assert [d.name for d in decoys] == ["random:1447385078", "random:1337432758", "random:1661513731"]
    assert [d.name for d in families.decoy_templates(new, 3, salt="key")] != [d.name for d in decoys]


@pytest.mark.parametrize("family", ["mosaic", "ring"])
def test_members_drawn_many_at_once_equal_the_templates_pixel_for_pixel(family):
    # seed 173 at 40 px has box averages at exactly .5, where the float32 mean decides the rounding
    for size, seeds in ((32, list(range(40))), (40, [173, 5, 6]), (64, [7, 8, 9]), (37, [10, 11])):
        scenes, surrounds = families.member_arrays(family, seeds, size)
        for seed, scene, surround in zip(seeds, scenes, surrounds):
            member = families.random_template(seed, size, family)
            assert np.array_equal(np.asarray(member.scene, np.float64), scene), (family, size, seed)
            assert np.array_equal(surround_mask(member), surround), (family, size, seed)


def test_many_screens_mask_their_surrounds_as_one_screen_does():
    rng = np.random.default_rng(0)
    shapes = [builtin_template("billboard", 32), builtin_template("frame", 48)]
    for _ in range(30):  # random convex screens, some with horizontal edges
        w, h = int(rng.integers(16, 70)), int(rng.integers(16, 70))
        x0, x1, y0, y1 = rng.uniform(0, 0.4 * w), rng.uniform(0.6 * w, w), rng.uniform(0, 0.4 * h), rng.uniform(0.6 * h, h)
        corners = [(x0, y0), (x1, y0 if rng.random() < 0.3 else rng.uniform(0, 0.4 * h)), (x1, y1), (x0 + 1, y1)]
        shapes.append(Template("random screen", Image.new("RGB", (w, h)), corners))
    for shape in shapes:
        masks = templates.surround_masks(np.array([shape.corners]), *shape.size)
        assert np.array_equal(masks[0], surround_mask(shape)), shape.corners


def test_decoy_seeds_stream_the_decoys_in_order():
    template = families.random_template(4, 32, "mosaic")
    stream = list(itertools.islice(families.decoy_seeds(template, "salt"), 300))
    names = [d.name for d in families.decoy_templates(template, 300, "salt")]
    assert names == [f"mosaic:{seed}" for seed in stream], "the first K of the stream are the K-decoy test's decoys"
    assert 4 not in stream and len(set(stream)) == 300
