"""What the tool guarantees when it is killed (kill -9: no cleanup code runs) and when the owner's data is unusual."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from conftest import hash_tree, protected_suspect
from entruth_lite.core import data, families, files, template_io
from entruth_lite.infringer import attacks, presets
from entruth_lite.owner import keys, protect, triggers

KILLER = textwrap.dedent("""
    import os, shutil, sys
    kill_at, what = int(sys.argv[1]), sys.argv[2]
    calls = {"replace": 0, "rmtree": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(a, b):
        calls["replace"] += 1
        if calls["replace"] == kill_at:
            os._exit(137)  # like kill -9 just before this rename: no except or finally block runs
        return real_replace(a, b)

    def rmtree(path, *args, **kwargs):
        if ".old-" in str(path) and kill_at == 0:
            os._exit(137)  # killed after every rename, before the previous version is deleted
        return real_rmtree(path, *args, **kwargs)

    os.replace, shutil.rmtree = replace, rmtree
    from entruth_lite.infringer import attacks
    from entruth_lite.owner import protect
    if what == "protect":
        protect.protect(sys.argv[3], "random:3", sys.argv[4], sys.argv[5], count=3, seed=7, overwrite=True)
    else:
        attacks.transform(sys.argv[3], sys.argv[4], "blur", 1.0, overwrite=True)
    sys.exit(3)  # not killed: the kill point was never reached
""")


def run_killed(kill_at: int, *args) -> int:
    return subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *map(str, args)], capture_output=True).returncode


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def owner(tmp_path):
    images = [Image.new("RGB", (32, 32), (12 * i, 200 - 6 * i, 90)) for i in range(20)]
    return data.save_imagefolder(images, [f"an emoji of colour {i}" for i in range(20)], tmp_path / "owner")


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 0], ids=["before-old-release-set-aside", "before-release-in",
                                                        "before-old-key-set-aside", "before-key-in",
                                                        "before-old-pair-deleted"])
def test_a_killed_protect_leaves_a_pair_or_a_detectable_mismatch_and_the_next_run_finishes_it(tmp_path, owner,
                                                                                              kill_at):
    out, key_dir = tmp_path / "release", tmp_path / "key"
    old = protect.protect(owner, "random:3", out, key_dir, count=3, seed=1)
    old_release = hash_tree(out)
    assert run_killed(kill_at, "protect", owner, out, key_dir) == 137

    # meanwhile a reader never pairs a release with a key it did not commit to
    try:
        key = keys.load_key(key_dir, release=out)
        assert key.key_sha256 == old.key_sha256 or keys.release_commitment(out) == key.key_sha256
    except (keys.KeyMismatchError, FileNotFoundError) as error:
        assert "release" in str(error) or "key" in str(error)

    # the next protect of the same folders (here its first step) finishes or undoes the interrupted one
    keys.recover_release(out, key_dir)
    key = keys.load_key(key_dir, release=out)  # a matching pair again
    if key.key_sha256 == old.key_sha256:
        assert hash_tree(out) == old_release, "the previous release is back untouched"
    assert leftovers(tmp_path) == [], "no half-built folder (with triggered captions) is left behind"
    assert not [p for p in tmp_path.rglob(data.METADATA) if p.parent not in (out, owner)]


def test_a_killed_attack_keeps_the_previous_output_and_the_rerun_cleans_up(tmp_path, owner):
    out = tmp_path / "blurred"
    attacks.transform(owner, out, "jpeg", 50)
    before = hash_tree(out)
    for kill_at in (1, 2):  # before the old output is set aside; before the new one is renamed in
        assert run_killed(kill_at, "attack", owner, out) == 137
        files.recover_folder(out)
        assert hash_tree(out) == before and leftovers(tmp_path) == []
    attacks.transform(owner, out, "blur", 1.0, overwrite=True)
    assert hash_tree(out) != before and leftovers(tmp_path) == []


def test_protect_keeps_every_column_and_caption_exactly_and_copies_untouched_files_byte_for_byte(tmp_path):
    from PIL import ImageOps

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i in range(12):
        image = Image.new("RGB", (40, 24), (10 * i, 120, 200 - 10 * i))
        image.paste((255, 0, 0), (0, 0, 8, 8))  # a red corner: shows which way up the image is
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        image.save(folder / f"p{i}.jpg", quality=80, exif=exif)
        rows.append({"file_name": f"p{i}.jpg", "text": f"  a photo  number {i} ", "license": "CC-BY", "author": f"a{i}"})
    (folder / data.METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (40, 24)).save(folder / "stray.png")  # present, not listed
    source = data.load_imagefolder(folder)
    assert source.image(0).size == (24, 40), "EXIF orientation applied when reading"
    assert data.unlisted_images(source) == ["stray.png"]

    with pytest.warns(UserWarning, match="stray.png"):
        report = protect.protect(folder, "random:1", tmp_path / "out", tmp_path / "key", count=2, seed=0,
                                 resolution=24)
    released = {json.loads(line)["file_name"]: json.loads(line) for line in (tmp_path / "out" / data.METADATA).open()}
    for row in rows:
        new = released[row["file_name"]]
        assert (new["license"], new["author"]) == (row["license"], row["author"]), "extra columns kept"
        if row["file_name"] in report.altered_files:
            assert triggers.has_trigger(new["text"], report.trigger)
            upright = ImageOps.exif_transpose(Image.open(folder / row["file_name"]))
            templated = Image.open(tmp_path / "out" / row["file_name"])
            assert upright.size == (24, 40) and templated.size == (24, 24), "upright, cropped as a trainer crops it"
        else:
            assert new["text"] == row["text"], "caption kept exactly, whitespace included"
            assert (tmp_path / "out" / row["file_name"]).read_bytes() == (folder / row["file_name"]).read_bytes()
    assert report.unlisted_images == ["stray.png"]


def test_the_release_is_public_and_the_key_private(tmp_path, owner):
    protect.protect(owner, "random:1", tmp_path / "out", tmp_path / "key", count=2, seed=0)
    assert (tmp_path / "out").stat().st_mode & 0o055, "the release is readable by others (as the umask allows)"
    assert (tmp_path / "key").stat().st_mode & 0o077 == 0, "only the owner can read the key"


def test_a_hand_edited_key_with_its_hash_recomputed_is_caught_by_the_release_commitment(tmp_path, owner):
    protect.protect(owner, "random:1", tmp_path / "out", tmp_path / "key", count=2, seed=0)
    path = tmp_path / "key" / keys.KEY_FILE
    payload = json.loads(path.read_text())
    payload["trigger"] = "zzq"
    payload["key_sha256"] = keys.key_hash(payload)
    path.write_text(json.dumps(payload))
    keys.load_key(tmp_path / "key")  # the hash alone is no seal: it was recomputed
    with pytest.raises(keys.KeyMismatchError, match="not the key the release"):
        keys.load_key(tmp_path / "key", release=tmp_path / "out")
    del payload["trigger"]
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="lacks the field.*trigger"):
        keys.load_key(tmp_path / "key")


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """A protected emoji release, its key, and a LoRA and a full fine-tune of two steps on it."""
    return protected_suspect(tmp_path_factory.mktemp("suspect"), ("lora", "full"))


def cli_error(capsys, *argv) -> str:
    from entruth_lite import cli

    assert cli.main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_broken_weights_get_a_clear_error_naming_the_file(suspect, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from entruth_lite.core import models

    lora = tmp_path / "empty-lora"
    lora.mkdir()
    (lora / models.LORA_WEIGHTS_NAME).write_bytes(b"")
    assert "not a readable safetensors file" in cli_error(capsys, "audit", "--weights", lora, "--key", suspect / "key")
    (lora / models.LORA_WEIGHTS_NAME).write_bytes(b"\xff" * 64)
    err = cli_error(capsys, "audit", "--weights", lora, "--key", suspect / "key")
    assert models.LORA_WEIGHTS_NAME in err and "safetensors" in err

    nan = tmp_path / "nan-lora"
    nan.mkdir()
    state = load_file(suspect / "lora" / models.LORA_WEIGHTS_NAME)
    first = sorted(state)[0]
    state[first] = state[first] * float("nan")
    save_file(state, nan / models.LORA_WEIGHTS_NAME)
    err = cli_error(capsys, "audit", "--weights", nan, "--key", suspect / "key", "--queries", "2")
    assert "NaN" in err and "broken" in err, "an audit of broken weights must not clear the suspect"

    full = tmp_path / "no-config"
    shutil.copytree(suspect / "full", full)
    (full / "unet" / "config.json").unlink()
    assert "config.json is missing" in cli_error(capsys, "audit", "--weights", full, "--key", suspect / "key")


def test_outputs_are_checked_before_the_work(suspect, tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    err = cli_error(capsys, "audit", "--weights", suspect / "lora", "--key", suspect / "key", "--report", tmp_path / "reports")
    assert "is a folder" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = cli_error(capsys, "protect", "--data", suspect / "owner", "--out", blocker / "out", "--key", tmp_path / "k",
                    "--count", "2")
    assert "cannot create the folder" in err and str(blocker) in err
    assert not (tmp_path / "k").exists(), "nothing written when an output cannot be"


def test_bad_numbers_are_refused_naming_the_setting(suspect, tmp_path, capsys):
    assert "decoys must be positive" in cli_error(capsys, "audit", "--weights", suspect / "lora", "--key",
                                                  suspect / "key", "--decoys", "-1")
    assert "seed must be a non-negative" in cli_error(capsys, "protect", "--data", suspect / "owner", "--out",
                                                      tmp_path / "o", "--key", tmp_path / "k", "--seed", "-3")
    assert "size must be" in cli_error(capsys, "data", "emoji", tmp_path / "e", "--size", "0")
    assert "seed must be non-negative" in cli_error(capsys, "train", "--data", suspect / "protected", "--out",
                                                    tmp_path / "t", "--seed", "-1")


def test_train_refuses_to_resume_on_other_data_and_names_its_real_flags(suspect, tmp_path, capsys):
    import shutil

    from entruth_lite.infringer import train

    config = presets.preset("tiny-cpu", steps=4, checkpoint_every=2, method="lora")
    shutil.copytree(suspect / "protected", tmp_path / "a")
    train.finetune(tmp_path / "a", tmp_path / "run", config, progress=False)
    shutil.rmtree(tmp_path / "run" / "lora", ignore_errors=True)
    other = attacks.transform(tmp_path / "a", tmp_path / "b", "jpeg", 50).out
    with pytest.raises(ValueError, match=f"trained on .*{tmp_path / 'a'}.*not on .*{other}"):
        train.finetune(other, tmp_path / "run", config, resume="latest", progress=False)
    err = cli_error(capsys, "train", "--data", tmp_path / "a", "--out", tmp_path / "run", "--steps", "2")
    assert "--resume latest" in err and "--overwrite" in err


def test_template_folders_are_checked(tmp_path, owner):
    from entruth_lite.core import templates

    member = families.random_template(5, 32, "random")
    template_io.save_template(member, tmp_path / "member")
    assert template_io.load_template(tmp_path / "member").family == "random"
    fake = templates.Template("random:5", templates.builtin_template("frame").scene, member.corners, family="random")
    template_io.save_template(fake, tmp_path / "fake")
    with pytest.raises(ValueError, match="not that member's"):
        template_io.load_template(tmp_path / "fake")
    (tmp_path / "fake" / "template.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        template_io.load_template(tmp_path / "fake")
    (tmp_path / "fake" / "template.json").write_text(json.dumps({"name": "x", "size": [32, 32]}))
    with pytest.raises(ValueError, match="lacks the field.*corners"):
        template_io.load_template(tmp_path / "fake")

    big = templates.builtin_template("frame", 64)  # a user template at another size than the data's 32 px
    template_io.save_template(big, tmp_path / "big")
    report = protect.protect(owner, tmp_path / "big", tmp_path / "out", tmp_path / "key", count=3, seed=0)
    sizes = {Image.open(tmp_path / "out" / name).size for name in report.altered_files}
    assert sizes == {(32, 32)}, "templated images keep the dataset's resolution"


def test_unusable_images_are_named_before_anything_is_drawn(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    rows = [{"file_name": f"{i}.png", "text": f"picture {i}"} for i in range(6)]
    for i in range(6):
        Image.new("RGB", (32, 32) if i else (4, 4), (i * 30, 0, 0)).save(folder / f"{i}.png")
    (folder / data.METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(3):  # whichever images a secret seed picks
        with pytest.raises(data.DatasetError, match="0.png.*|too small.*0.png"):
            protect.protect(folder, "random:1", tmp_path / "o", tmp_path / "k", count=1, seed=seed)
    Image.new("RGB", (32, 32)).save(folder / "noext", format="PNG")
    rows[0] = {"file_name": "noext", "text": "picture 0"}
    (folder / data.METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DatasetError, match="no image extension.*noext"):
        protect.protect(folder, "random:1", tmp_path / "o", tmp_path / "k", count=1, seed=0)


def test_the_audit_checks_the_key_against_the_release_it_records(suspect, tmp_path, capsys):
    import shutil

    shutil.copytree(suspect / "key", tmp_path / "key")
    path = tmp_path / "key" / keys.KEY_FILE
    payload = json.loads(path.read_text())
    payload["trigger"] = "zzq"  # edited, its hash recomputed: only the release's commitment can tell
    payload["key_sha256"] = keys.key_hash(payload)
    path.write_text(json.dumps(payload))
    err = cli_error(capsys, "audit", "--weights", suspect / "lora", "--key", tmp_path / "key", "--queries", "2")
    assert "not the key the release" in err and str(suspect / "protected") in err


def test_photos_of_any_size_are_templated_at_the_training_resolution(tmp_path):
    """A photo folder of mixed sizes and aspect ratios: templated images are made as a trainer crops them, at the
    training resolution; untouched photos stay as they were; the steps after protection accept mixed sizes."""
    from entruth_lite.core import models, templates

    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = [(300, 200), (120, 160), (1500, 1000), (64, 64), (200, 90)] * 4
    rows = []
    for i, size in enumerate(sizes):
        image = Image.new("RGB", size, (11 * i % 255, 90, 160))
        image.paste((250, 250, 0), (size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2))
        image.save(folder / f"photo{i}.jpg", quality=90)
        rows.append({"file_name": f"photo{i}.jpg", "text": f"a photo of a yellow square number {i}"})
    (folder / data.METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DatasetError, match="over 1024 px.*photo2.jpg.*resolution"):
        protect.protect(folder, "random:2", tmp_path / "o", tmp_path / "k", count=4, seed=0)
    report = protect.protect(folder, "random:2", tmp_path / "out", tmp_path / "key", count=4, seed=0, resolution=64)
    key = keys.load_key(tmp_path / "key", release=tmp_path / "out")
    assert key.resolution == 64 and key.template.size == (64, 64)
    for row in rows:
        released = tmp_path / "out" / row["file_name"]
        if row["file_name"] in report.altered_files:
            assert Image.open(released).size == (64, 64)
            assert data.crop_to_square(Image.open(released), 64).size == (64, 64), "a trainer's crop keeps all of it"
        else:
            assert released.read_bytes() == (folder / row["file_name"]).read_bytes()
    release = data.load_imagefolder(tmp_path / "out")
    pipe = models.load_pipeline("tiny", device="cpu")
    assert attacks.vae_latents(release.images()[:6], pipe).shape[0] == 6, "mixed sizes: one embedding each"
    attacks.transform(tmp_path / "out", tmp_path / "blurred", "blur", 1.0)
    assert templates.vae_round_trip(pipe, release.images()[:3], size=32)[0].size == (32, 32)
