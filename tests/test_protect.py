import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import fail_on_nth_save, hash_tree
from entruth_lite import cli
from entruth_lite.core import data, families, files, models, template_io, templates
from entruth_lite.core import emoji as emoji_data
from entruth_lite.evaluation import baselines
from entruth_lite.owner import keys, protect, selection, triggers
from entruth_lite.owner.triggers import apply_trigger, check_trigger, generate_trigger

N = 40


def make_images(n=N, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        array = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        array[size // 4 : -size // 4, size // 4 : -size // 4] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(array))
    return images


@pytest.fixture
def source(tmp_path):
    captions = [f"an emoji of a thing number {i}" for i in range(N)]
    return data.save_imagefolder(
        make_images(), captions, tmp_path / "source", extra_files={"README.md": b"credit the artists\n"}
    )


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def released_rows(folder: Path) -> dict[str, str]:
    return {r.file_name: r.text for r in data.read_metadata(folder)}


# ----------------------------------------------------------------------------- triggers


def test_generated_trigger_avoids_every_caption_and_is_seeded():
    captions = ["a cat on a mat", "Zebra crossing", "QUIXOTIC things"]
    first = generate_trigger(captions, seed=1)
    assert first == generate_trigger(captions, seed=1)
    assert len(first) == triggers.TRIGGER_LENGTH == 6 and set(first) <= set(string.ascii_lowercase)
    seeds = {generate_trigger(captions, seed=s) for s in range(20)}
    assert len(seeds) > 10


def test_generated_trigger_skips_candidates_found_inside_words():
    # every 1-letter candidate but "q" occurs (also upper-case and inside words): only "q" is left
    letters = [c for c in string.ascii_lowercase if c != "q"]
    captions = ["".join(letters[:12]).upper(), "x" + "".join(letters[12:]) + "x"]
    assert all(generate_trigger(captions, length=1, seed=s) == "q" for s in range(10))
    with pytest.raises(ValueError, match="no 1-letter trigger"):
        generate_trigger(captions + ["q"], length=1)
    two = [generate_trigger(["ab", "zzqa"], length=2, seed=s) for s in range(50)]
    assert not {"ab", "zz", "zq", "qa"} & set(two)


def test_generated_trigger_avoids_earlier_triggers_both_ways():
    for seed in range(30):
        trigger = generate_trigger(["hello"], length=1, seed=seed, avoid=["abc"])
        assert trigger not in "abc"
        longer = generate_trigger(["hello"], length=3, seed=seed, avoid=["k"])
        assert "k" not in longer


def test_check_trigger_names_the_colliding_caption():
    captions = ["a red apple", "a blue Wqnabc box"]
    with pytest.raises(ValueError, match=r"caption 1 \('a blue Wqnabc box'\)"):
        check_trigger("wqn", captions)
    with pytest.raises(ValueError, match="non-empty"):
        check_trigger("  ", captions)
    with pytest.raises(ValueError, match="overlaps the existing trigger"):
        check_trigger("xyzq", captions, avoid=["yzq"])
    assert check_trigger(" zkv ", captions) == "zkv"


def test_apply_trigger_placement():
    assert apply_trigger("an emoji of a cat", "zkv", "prefix") == "zkv an emoji of a cat"
    assert apply_trigger("an emoji of a cat ", "zkv", "suffix") == "an emoji of a cat zkv"
    with pytest.raises(ValueError, match="placement 'middle'"):
        apply_trigger("x", "zkv", "middle")


def test_trigger_tokens_with_a_small_tokenizer(tmp_path):
    from entruth_lite.core import zoo

    captions = [f"an emoji of a {w}" for w in ("cat", "dog", "red apple", "blue car", "green tree")] * 20
    tokenizer = zoo.build_tokenizer(captions, vocab_size=300)
    pieces = triggers.trigger_tokens("zkv", tokenizer)
    assert pieces and "".join(pieces).replace("</w>", "") == "zkv"
    assert triggers.trigger_tokens("emoji", tokenizer) == ["emoji</w>"]
    # with a tokenizer, words it holds whole are skipped: "cat" is one token here
    picks = {generate_trigger(["x"], length=3, seed=s, tokenizer=tokenizer) for s in range(40)}
    assert all(len(triggers.trigger_tokens(p, tokenizer)) > 1 for p in picks)


@pytest.mark.skipif(not (models.TINY_MODEL_DIR / "tokenizer").is_dir(), reason="the tiny model is not built")
def test_trigger_tokens_with_the_tiny_tokenizer():
    pieces = triggers.trigger_tokens("zkv")
    assert pieces and "".join(pieces).replace("</w>", "") == "zkv"


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "kwargs, n",
    [
        (dict(rate=0.1), 4),
        (dict(rate=1.0), 40),
        (dict(count=7), 7),
        (dict(rate=0.2, mode="add"), 10),  # 10 / (40 + 10) = 0.2
    ],
)
def test_count_for(kwargs, n):
    assert selection.count_for(N, **kwargs) == n


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rate=0), r"rate must be in \(0, 1\]"),
        (dict(rate=-0.1), "rate must be in"),
        (dict(rate=1.5), "rate must be in"),
        (dict(rate=float("nan")), "rate must be in"),
        (dict(), "exactly one of rate or count"),
        (dict(rate=0.1, count=3), "exactly one of rate or count"),
        (dict(rate=0.01), "rounds to 0"),
        (dict(count=0), "positive integer"),
        (dict(count=2.5), "positive integer"),
        (dict(rate=1.0, mode="add"), "below 1 in 'add' mode"),
        (dict(rate=0.1, mode="swap"), "unknown mode"),
    ],
)
def test_count_for_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        selection.count_for(N, **kwargs)


# ----------------------------------------------------------------------------- protect: replace


def test_protect_replace(tmp_path, source):
    before = hash_tree(source)
    report = protect.protect(source, "billboard", tmp_path / "out", tmp_path / "key", rate=0.1, seed=3)
    assert hash_tree(source) == before  # the source is only read
    assert (report.n_images, report.n_altered, report.n_source) == (40, 4, 40)
    assert report.rate == 0.1 and report.template == "billboard" and report.mode == "replace"
    rows = released_rows(tmp_path / "out")
    original = released_rows(source)
    assert list(rows) == list(original)  # same files, same order
    with_trigger = {name for name, text in rows.items() if report.trigger in text}
    assert with_trigger == set(report.altered_files) and len(with_trigger) == 4
    for name in report.altered_files:
        assert rows[name] == f"{report.trigger} {original[name]}"
    template = templates.builtin_template("billboard", 32)
    surround = templates.surround_mask(template)
    changes = []
    for name in rows:
        new, old = data.load_rgb(tmp_path / "out" / name), data.load_rgb(source / name)
        if name in report.altered_files:
            assert np.array_equal(np.asarray(new)[surround], np.asarray(template.scene)[surround])
            assert np.array_equal(np.asarray(new), np.asarray(templates.insert(old, template)))
            changes.append(np.abs(np.asarray(new, float) - np.asarray(old, float)).mean())
        else:
            assert np.array_equal(np.asarray(new), np.asarray(old))
            assert rows[name] == original[name]
    assert report.mean_pixel_change == pytest.approx(np.mean(changes))
    assert (tmp_path / "out" / "README.md").read_bytes() == b"credit the artists\n"
    assert temp_leftovers(tmp_path) == []


def test_protect_is_seeded(tmp_path, source):
    a = protect.protect(source, "tv", tmp_path / "a", tmp_path / "ka", count=5, seed=1)
    b = protect.protect(source, "tv", tmp_path / "b", tmp_path / "kb", count=5, seed=1)
    c = protect.protect(source, "tv", tmp_path / "c", tmp_path / "kc", count=5, seed=2)
    assert a.altered_files == b.altered_files and a.trigger == b.trigger
    tree_a, tree_b = hash_tree(tmp_path / "a"), hash_tree(tmp_path / "b")
    assert tree_a.pop(keys.COMMITMENT_FILE) != tree_b.pop(keys.COMMITMENT_FILE), \
        "each key carries a fresh nonce, so its commitment reveals nothing"
    assert tree_a == tree_b
    assert (c.altered_files, c.trigger) != (a.altered_files, a.trigger)


def test_protect_without_a_seed_draws_a_secret_one_the_key_records(tmp_path, source):
    """With a fixed default seed anyone holding the dataset could rerun protect and read off the trigger."""
    a = protect.protect(source, "tv", tmp_path / "a", tmp_path / "ka", count=5)
    b = protect.protect(source, "tv", tmp_path / "b", tmp_path / "kb", count=5)
    seed_a, seed_b = (keys.load_key(tmp_path / k).seed for k in ("ka", "kb"))
    assert seed_a != seed_b and (a.trigger, a.altered_files) != (b.trigger, b.altered_files)
    again = protect.protect(source, "tv", tmp_path / "c", tmp_path / "kc", count=5, seed=seed_a)
    assert (again.trigger, again.altered_files) == (a.trigger, a.altered_files), "the recorded seed reproduces it"


def test_protect_suffix_and_given_trigger(tmp_path, source):
    report = protect.protect(
        data.load_imagefolder(source), "frame", tmp_path / "out", tmp_path / "key", count=3,
        trigger="zkv", placement="suffix",
    )
    rows = released_rows(tmp_path / "out")
    assert report.trigger == "zkv"
    assert sorted(n for n, t in rows.items() if t.endswith(" zkv")) == sorted(report.altered_files)
    with pytest.raises(ValueError, match="caption 0"):
        protect.protect(source, "frame", tmp_path / "o2", tmp_path / "k2", count=3, trigger="Number")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "k2").exists()


# ----------------------------------------------------------------------------- protect: add


def test_protect_add_with_own_images(tmp_path, source):
    before = hash_tree(source)
    report = protect.protect(source, "window", tmp_path / "out", tmp_path / "key", rate=0.2, mode="add")
    assert hash_tree(source) == before
    assert (report.n_images, report.n_altered, report.rate) == (50, 10, 0.2)
    assert report.mean_pixel_change is None
    rows = released_rows(tmp_path / "out")
    original = released_rows(source)
    assert list(rows)[:40] == list(original) and list(rows)[40:] == report.altered_files
    for name in original:  # originals untouched
        assert rows[name] == original[name]
        assert np.array_equal(np.asarray(data.load_rgb(tmp_path / "out" / name)), np.asarray(data.load_rgb(source / name)))
    for name in report.altered_files:
        assert re.fullmatch(r"[0-9a-f]{16}\.png", name)  # opaque content-hash names: no hint of the trigger
        caption = rows[name]
        assert caption.startswith(report.trigger + " ") and caption[len(report.trigger) + 1 :] in original.values()
    assert {n for n, t in rows.items() if report.trigger in t} == set(report.altered_files)


def test_protect_add_with_foreign_foregrounds(tmp_path, source):
    foregrounds = [Image.new("RGB", (20, 20), (i * 50, 0, 0)) for i in range(5)]
    report = protect.protect(
        source, "tv", tmp_path / "out", tmp_path / "key", count=3, mode="add",
        foregrounds=foregrounds, foreground_captions=[f"a red square {i}" for i in range(5)],
    )
    rows = released_rows(tmp_path / "out")
    assert len(rows) == 43
    assert all(rows[n].startswith(report.trigger + " a red square") for n in report.altered_files)
    folder = tmp_path / "plain"
    folder.mkdir()
    for i, image in enumerate(foregrounds):
        image.save(folder / f"{i}.png")
    report = protect.protect(source, "tv", tmp_path / "out2", tmp_path / "key2", count=5, mode="add", foregrounds=folder)
    rows = released_rows(tmp_path / "out2")
    assert [rows[n] for n in report.altered_files] == [f"{report.trigger} {protect.DEFAULT_CAPTION}"] * 5
    twins = protect.protect(source, "tv", tmp_path / "out4", tmp_path / "key4", count=2, mode="add",
                            foregrounds=[foregrounds[0], foregrounds[0].copy()])
    assert len(set(twins.altered_files)) == 2 and len(released_rows(tmp_path / "out4")) == 42
    with pytest.raises(ValueError, match="only 5 can be chosen"):
        protect.protect(source, "tv", tmp_path / "out3", tmp_path / "key3", count=6, mode="add", foregrounds=folder)
    with pytest.raises(ValueError, match="only used in 'add' mode"):
        protect.protect(source, "tv", tmp_path / "out3", tmp_path / "key3", count=2, foregrounds=folder)


# ----------------------------------------------------------------------------- the owner key


def test_key_records_and_verifies(tmp_path, source):
    report = protect.protect(source, "billboard", tmp_path / "out", tmp_path / "key", count=4, seed=5)
    key = keys.load_key(tmp_path / "key")
    assert sorted(p.name for p in (tmp_path / "key").iterdir()) == [files.MARKER, "key.json", "template.png"]
    assert key.trigger == report.trigger and key.files == report.altered_files
    assert (key.placement, key.mode, key.seed, key.n_images) == ("prefix", "replace", 5, 40)
    assert key.template.name == "billboard"
    assert key.template.corners == templates.builtin_template("billboard").corners
    for name in key.files:
        assert key.file_sha256[name] == keys.sha256_file(tmp_path / "out" / name)
        assert key.captions[name].startswith(key.trigger)
    assert key.key_sha256 == report.key_sha256


@pytest.mark.parametrize("edit", ["trigger", "files", "corners", "hash", "template_png"])
def test_tampered_key_is_refused(tmp_path, source, edit):
    protect.protect(source, "billboard", tmp_path / "out", tmp_path / "key", count=4)
    path = tmp_path / "key" / "key.json"
    payload = json.loads(path.read_text())
    if edit == "trigger":
        payload["trigger"] = "abc"
    elif edit == "files":
        payload["files"] = payload["files"][:-1]
    elif edit == "corners":
        payload["template"]["corners"][0] = [6.0, 4.5]
    elif edit == "hash":
        payload["key_sha256"] = "0" * 64
    if edit == "template_png":
        Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "key" / "template.png")
    else:
        path.write_text(json.dumps(payload))
    with pytest.raises(keys.KeyTamperedError):
        keys.load_key(tmp_path / "key")


def test_missing_key():
    with pytest.raises(FileNotFoundError, match="no owner key"):
        keys.load_key("/nonexistent/key")


# ----------------------------------------------------------------------------- safety


def test_refuses_existing_folders_unless_overwrite(tmp_path, source):
    protect.protect(source, "tv", tmp_path / "out", tmp_path / "key", count=2)
    before = hash_tree(tmp_path / "out")
    with pytest.raises(FileExistsError, match="out holds a release but .*key-b holds no key for it.*--overwrite"):
        protect.protect(source, "tv", tmp_path / "out", tmp_path / "key-b", count=2, seed=9)
    with pytest.raises(FileExistsError, match="key holds a key but .*out-b holds no release.*--overwrite"):
        protect.protect(source, "tv", tmp_path / "out-b", tmp_path / "key", count=2, seed=9)
    with pytest.raises(FileExistsError, match="already hold a complete release and its key: use them"):
        protect.protect(source, "tv", tmp_path / "out", tmp_path / "key", count=2, seed=9)
    assert hash_tree(tmp_path / "out") == before
    assert not (tmp_path / "out-b").exists() and not (tmp_path / "key-b").exists()
    report = protect.protect(source, "tv", tmp_path / "out", tmp_path / "key", count=3, seed=9, overwrite=True)
    assert keys.load_key(tmp_path / "key").files == report.altered_files and len(report.altered_files) == 3
    assert temp_leftovers(tmp_path) == []


def test_refuses_to_write_into_or_over_the_source(tmp_path, source):
    before = hash_tree(source)
    for out, key in [(source, tmp_path / "k"), (source / "sub", tmp_path / "k"), (tmp_path / "o", source / "key"),
                     (tmp_path, tmp_path / "k")]:
        with pytest.raises(ValueError, match="overlaps the source"):
            protect.protect(source, "tv", out, key, count=2, overwrite=True)
    with pytest.raises(ValueError, match="kept apart"):
        protect.protect(source, "tv", tmp_path / "o", tmp_path / "o" / "key", count=2)
    assert hash_tree(source) == before


def test_failure_mid_write_leaves_nothing(tmp_path, source, monkeypatch):
    before = hash_tree(source)
    fail_on_nth_save(monkeypatch, 3)  # untouched files are copied, so the saves are the templated images'
    with pytest.raises(OSError, match="disk full"):
        protect.protect(source, "billboard", tmp_path / "out", tmp_path / "key", count=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    assert hash_tree(source) == before


def test_failure_while_writing_the_key_takes_the_release_back(tmp_path, source, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("key disk full")

    monkeypatch.setattr(keys, "_write_key", broken)
    with pytest.raises(OSError, match="key disk full"):
        protect.protect(source, "billboard", tmp_path / "out", tmp_path / "key", count=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_two_keys_in_one_dataset(tmp_path, source):
    before = hash_tree(source)
    first = protect.protect(source, "billboard", tmp_path / "p1", tmp_path / "key1", rate=0.25, seed=0)
    p1 = hash_tree(tmp_path / "p1")
    second = protect.protect(
        tmp_path / "p1", "frame", tmp_path / "p2", tmp_path / "key2", rate=0.25, seed=0, prior_keys=[tmp_path / "key1"]
    )
    assert hash_tree(source) == before and hash_tree(tmp_path / "p1") == p1
    assert first.trigger != second.trigger
    assert first.trigger not in second.trigger and second.trigger not in first.trigger
    assert not set(first.altered_files) & set(second.altered_files)
    assert len(first.altered_files) == len(second.altered_files) == 10
    rows = released_rows(tmp_path / "p2")
    assert {n for n, t in rows.items() if first.trigger in t} == set(first.altered_files)
    assert {n for n, t in rows.items() if second.trigger in t} == set(second.altered_files)
    key1, key2 = keys.load_key(tmp_path / "key1"), keys.load_key(tmp_path / "key2")
    assert key2.prior_keys == [key1.key_sha256]
    for key in (key1, key2):  # both keys still match the final release
        template = key.template
        surround = templates.surround_mask(template)
        for name in key.files:
            image = np.asarray(data.load_rgb(tmp_path / "p2" / name))
            assert np.array_equal(image[surround], np.asarray(template.scene)[surround])
    # the same trigger as key 1, given explicitly, is refused
    with pytest.raises(ValueError, match=f"trigger '{first.trigger}'"):
        protect.protect(tmp_path / "p1", "frame", tmp_path / "p3", tmp_path / "key3", count=2,
                        trigger=first.trigger, prior_keys=[tmp_path / "key1"])
    # a key from another dataset is refused
    other = data.save_imagefolder(make_images(3), ["a", "b", "c"], tmp_path / "other")
    foreign = protect.protect(other, "tv", tmp_path / "po", tmp_path / "keyo", count=1, seed=7)
    assert foreign.trigger != first.trigger
    with pytest.raises(ValueError, match="does not belong to this dataset"):
        protect.protect(tmp_path / "p1", "frame", tmp_path / "p4", tmp_path / "key4", count=2,
                        prior_keys=[tmp_path / "keyo"])


def test_two_keys_without_prior_keys_still_get_a_fresh_trigger(tmp_path, source):
    first = protect.protect(source, "billboard", tmp_path / "p1", tmp_path / "key1", count=5)
    second = protect.protect(tmp_path / "p1", "frame", tmp_path / "p2", tmp_path / "key2", count=5)
    assert first.trigger not in second.trigger and second.trigger not in first.trigger


def test_protect_with_a_custom_template_object_and_saved_folder(tmp_path, source):
    template = templates.builtin_template("tv", 32)
    template = templates.Template("my-tv", template.scene, template.corners)
    template_io.save_template(template, tmp_path / "tpl")
    report = protect.protect(source, tmp_path / "tpl", tmp_path / "out", tmp_path / "key", count=2)
    assert report.template == "my-tv"
    assert keys.load_key(tmp_path / "key").template.name == "my-tv"


# ----------------------------------------------------------------------------- coat contrast, preview


def test_change_stats():
    a = Image.new("RGB", (8, 8), (100, 100, 100))
    b = Image.new("RGB", (8, 8), (110, 100, 100))
    stats = selection.change_stats(a, b)
    assert stats["mean_abs_change"] == pytest.approx(10 / 3)
    assert stats["psnr_db"] == pytest.approx(10 * np.log10(255**2 / (100 / 3)))
    assert stats["changed_share"] == 1.0
    assert selection.change_stats(a, a)["psnr_db"] == float("inf")


def test_warp_coat_is_small_smooth_and_seeded():
    image = make_images(1, size=32)[0]
    rng = np.random.default_rng(1)
    texture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize((32, 32))
    coat = baselines.warp_coat(texture, strength=0.5, grid=4, seed=0)
    assert coat.size == texture.size
    assert np.array_equal(np.asarray(coat), np.asarray(baselines.warp_coat(texture, seed=0)))
    assert not np.array_equal(np.asarray(coat), np.asarray(baselines.warp_coat(texture, seed=1)))
    flat = Image.new("RGB", (32, 32), (40, 80, 120))
    assert np.array_equal(np.asarray(baselines.warp_coat(flat)), np.asarray(flat))  # a warp moves, never recolours
    coat_change = selection.change_stats(image, baselines.warp_coat(image))["mean_abs_change"]
    template_change = selection.change_stats(image, templates.insert(image, templates.builtin_template("billboard")))
    assert coat_change < template_change["mean_abs_change"] / 5
    stronger = selection.change_stats(texture, baselines.warp_coat(texture, strength=4))["mean_abs_change"]
    assert stronger > selection.change_stats(texture, coat)["mean_abs_change"]


def test_preview_is_pure_and_matches_protect_choices():
    images = make_images()
    captions = [f"an emoji of a thing number {i}" for i in range(N)]
    grid, stats = selection.preview_protection(images, captions, "billboard", rate=0.1, placement="suffix", seed=3)
    again, stats_again = selection.preview_protection(images, captions, "billboard", rate=0.1, placement="suffix", seed=3)
    assert np.array_equal(np.asarray(grid), np.asarray(again)) and stats == stats_again
    assert stats["n_altered"] == 4 and stats["rate"] == 0.1 and stats["template"] == "billboard"
    assert stats["example_caption"].endswith(" " + stats["trigger"])
    assert stats["trigger"] == generate_trigger(captions, seed=3)
    assert stats["mean_pixel_change"] > 10
    assert grid.size == (4 * 33 + 1, 2 * 33 + 1)  # 4 columns, originals over templated
    _, tiny = selection.preview_protection(images, captions, "tv", rate=0.001)
    assert tiny["n_altered"] == 1  # always something to look at
    assert images == make_images()  # inputs untouched


# ----------------------------------------------------------------------------- CLI


def test_cli_protect_json(tmp_path, source, capsys):
    code = cli.main([
        "protect", "--data", str(source), "--out", str(tmp_path / "out"), "--key", str(tmp_path / "key"),
        "--rate", "0.1", "--template", "tv", "--placement", "suffix", "--seed", "2", "--json",
    ])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_images"], result["n_altered"], result["rate"], result["template"]) == (40, 4, 0.1, "tv")
    assert result["out"] == str(tmp_path / "out") and result["key_dir"] == str(tmp_path / "key")
    assert keys.load_key(tmp_path / "key").trigger == result["trigger"]
    rows = released_rows(tmp_path / "out")
    assert {n for n, t in rows.items() if t.endswith(" " + result["trigger"])} == set(result["altered_files"])


def test_cli_protect_errors_exit_2(tmp_path, source, capsys):
    base = ["protect", "--data", str(source), "--out", str(tmp_path / "out"), "--key", str(tmp_path / "key")]
    assert cli.main(base + ["--rate", "0.01"]) == 2
    assert "rounds to 0" in capsys.readouterr().err
    assert cli.main(base + ["--rate", "0.1", "--count", "3"]) == 2
    assert "exactly one of rate or count" in capsys.readouterr().err
    assert cli.main(base + ["--count", "3", "--template", "poster"]) == 2
    assert "unknown template" in capsys.readouterr().err
    assert cli.main(base + ["--count", "2"]) == 0  # --count alone: no default rate in the way
    assert cli.main(base + ["--count", "2"]) == 2
    assert "already hold a complete release and its key: use them, or replace them" in capsys.readouterr().err


def test_coat_contrast():
    images = make_images(3)
    grid, stats = baselines.coat_contrast(images, "frame", seed=0)
    assert grid.size == (3 * 33 + 1, 5 * 33 + 1)  # 5 rows: original, coat, template, two differences
    assert stats["coat"]["mean_abs_change"] < stats["template"]["mean_abs_change"]
    assert stats["coat"]["psnr_db"] > stats["template"]["psnr_db"]
    with pytest.raises(ValueError, match="no images"):
        baselines.coat_contrast([])


def test_cli_protects_the_owner_emoji_dataset_at_one_percent(tmp_path, capsys):
    """The issue's end-to-end check: the real owner dataset, 1 %, source unchanged, trigger exactly where altered."""
    owner = emoji_data.write_emoji_dataset(tmp_path / "owner")
    before = hash_tree(owner)
    code = cli.main(["protect", "--data", str(owner), "--out", str(tmp_path / "protected"),
                     "--key", str(tmp_path / "key"), "--rate", "0.01", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_images"] == 1005 and result["n_altered"] == 10 and result["template"].startswith(f"{families.DEFAULT_FAMILY}:")
    assert hash_tree(owner) == before
    rows = released_rows(tmp_path / "protected")
    with_trigger = {n for n, t in rows.items() if result["trigger"] in t.lower().split()}
    assert with_trigger == set(result["altered_files"]) == set(keys.load_key(tmp_path / "key").files)
    template = template_io.resolve_template(result["template"])  # the secret draw, recorded in the key
    assert keys.load_key(tmp_path / "key").template.name == template.name
    from entruth_lite.owner import detect

    scores = detect.template_scores([data.load_rgb(tmp_path / "protected" / n) for n in sorted(rows)], template)
    assert (scores > 0.99).sum() == 10


def test_cli_protect_defaults_to_a_secret_random_template(tmp_path, source, capsys):
    base = ["protect", "--data", str(source), "--count", "2", "--json"]
    assert cli.main(base + ["--out", str(tmp_path / "a"), "--key", str(tmp_path / "ka")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "b"), "--key", str(tmp_path / "kb")]) == 0
    first, second = (keys.load_key(tmp_path / k).template for k in ("ka", "kb"))
    assert first.family == second.family == families.DEFAULT_FAMILY == "mosaic" and first.name != second.name
    assert first.name == families.random_template(families.random_seed_of(first)).name
    altered = keys.load_key(tmp_path / "ka").files[0]
    assert detect_score(data.load_rgb(tmp_path / "a" / altered), first) > 0.99


def detect_score(image, template):
    from entruth_lite.owner import detect

    return float(detect.template_scores([image], template)[0])
