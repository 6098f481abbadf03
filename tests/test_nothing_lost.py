"""Nothing the user owns is lost and nothing is silently accepted: --overwrite replaces only this tool's outputs, an
interrupted protect is finished by the next run, an unchecked key is said to be unchecked, a finished audit
survives a report that cannot be written, and bad input gets one line naming the bad thing."""

import json
import os
import shutil

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import hash_tree, protected_suspect
from entruth_lite import cli
from entruth_lite.core import data, files, models, template_io
from entruth_lite.owner import keys, protect
from test_reliability import run_killed


@pytest.fixture
def owner(tmp_path):
    images = [Image.new("RGB", (32, 32), (12 * i, 200 - 6 * i, 90)) for i in range(20)]
    return data.save_imagefolder(images, [f"an emoji of colour {i}" for i in range(20)], tmp_path / "owner")


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    return protected_suspect(tmp_path_factory.mktemp("suspect"))


def users_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("four years of work")
    return hash_tree(path)


@pytest.mark.parametrize("which", ["--out", "--key"])
def test_overwrite_refuses_a_folder_this_tool_did_not_write_and_names_what_it_found(tmp_path, owner, capsys, which):
    mine = tmp_path / "mine"
    before = users_folder(mine)
    folders = {"--out": tmp_path / "release", "--key": tmp_path / "key"} | {which: mine}
    args = ["protect", "--data", str(owner), "--count", "2", "--overwrite"]
    assert cli.main(args + [x for flag, path in folders.items() for x in (flag, str(path))]) == 2
    error = capsys.readouterr().err
    assert f"refusing to replace {mine}" in error and "'thesis.tex'" in error
    assert hash_tree(mine) == before and not (tmp_path / "release").exists() and not (tmp_path / "key").exists()


def test_overwrite_replaces_this_tools_own_outputs_and_those_of_earlier_versions(tmp_path, owner):
    out, key_dir = tmp_path / "release", tmp_path / "key"
    protect.protect(owner, "mosaic:1", out, key_dir, count=2, seed=0)
    assert (out / files.MARKER).is_file() and (key_dir / files.MARKER).is_file()
    (out / files.MARKER).unlink()  # a release and key written before the marker existed
    (key_dir / files.MARKER).unlink()
    report = protect.protect(owner, "mosaic:2", out, key_dir, count=3, seed=1, overwrite=True)
    assert keys.load_key(key_dir, release=out).key_sha256 == report.key_sha256
    empty = tmp_path / "empty"
    empty.mkdir()
    protect.protect(owner, "mosaic:2", empty, tmp_path / "key-2", count=2, seed=1, overwrite=True)


def test_a_protect_killed_before_its_key_is_finished_by_the_next_plain_run(tmp_path, owner):
    out, key_dir = tmp_path / "release", tmp_path / "key"
    assert run_killed(2, "protect", owner, out, key_dir) == 137  # 2nd rename: the key's (no earlier pair to set aside)
    assert out.is_dir() and not key_dir.exists(), "a complete release whose key is still in its temporary folder"
    with pytest.warns(UserWarning, match="finished an interrupted protect"):
        with pytest.raises(FileExistsError, match="already hold a complete release and its key .finished an "
                                                  "interrupted protect.*: use them"):
            protect.protect(owner, "random:3", out, key_dir, count=3, seed=7)
    key = keys.load_key(key_dir, release=out)
    assert key.template.name == "random:3" and sorted(os.listdir(tmp_path)) == ["key", "owner", "release"]


def test_a_release_whose_key_is_lost_says_so(tmp_path, owner):
    out, key_dir = tmp_path / "release", tmp_path / "key"
    protect.protect(owner, "mosaic:1", out, key_dir, count=2, seed=0)
    shutil.rmtree(key_dir)
    with pytest.raises(FileExistsError, match="holds a release but .* holds no key for it.*never published.*its key "
                                              "is lost"):
        protect.protect(owner, "mosaic:1", out, key_dir, count=2, seed=0)


def test_temporary_folders_removed_after_a_crash_are_reported(tmp_path, owner):
    out = tmp_path / "data"
    (tmp_path / ".data.tmp-abc").mkdir()
    with pytest.warns(UserWarning, match=r"removed \.data\.tmp-abc, left by an interrupted write"):
        data.save_imagefolder([Image.new("RGB", (16, 16))], ["a caption"], out)


def test_a_key_not_checked_against_a_commitment_is_said_to_be_unchecked(suspect, tmp_path, capsys):
    payload = json.loads((suspect / "key" / "key.json").read_text())
    payload["release"] = ""  # no release to check against, the hash recomputed: a key nothing vouches for
    payload["trigger"] = "zqxjvw"
    payload["key_sha256"] = keys.key_hash(payload)
    edited = tmp_path / "key"
    shutil.copytree(suspect / "key", edited)
    (edited / "key.json").write_text(json.dumps(payload))
    report = tmp_path / "report.html"
    assert cli.main(["audit", "--weights", str(suspect / "full"), "--key", str(edited), "--queries", "2",
                     "--decoys", "99", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "key: not checked: the key was not compared with a release's commitment" in out and "--release" in out
    assert "not checked: the key was not compared" in report.read_text()
    assert cli.main(["audit", "--weights", str(suspect / "full"), "--key", str(edited), "--queries", "2",
                     "--decoys", "99", "--release", str(suspect / "protected")]) == 2
    assert "is not the key the release" in capsys.readouterr().err, "with the release, the edit is caught"


def test_a_finished_audit_survives_a_report_that_cannot_be_written(suspect, tmp_path, capsys, monkeypatch):
    from entruth_lite.owner import report

    def unwritable(result, path):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(report, "write_report", unwritable)
    code = cli.main(["audit", "--weights", str(suspect / "full"), "--key", str(suspect / "key"), "--queries", "2",
                     "--decoys", "99", "--report", str(tmp_path / "report.html")])
    captured = capsys.readouterr()
    assert code == 2 and "decoy (projection)" in captured.out, "the verdict is printed before the report is written"
    kept = captured.err.split("the audit's record is in ", 1)[1].split(":", 1)[0]
    record = json.loads(open(kept).read())
    assert record["verdicts"] and "--replay" in captured.err
    os.remove(kept)


def test_a_malformed_template_description_is_one_line_naming_the_file(tmp_path):
    folder = template_io.save_template(template_io.resolve_template("tv"), tmp_path / "t")
    meta = json.loads((folder / "template.json").read_text())
    (folder / "template.json").write_text(json.dumps(meta | {"corners": [1, 2, 3, 4]}))
    with pytest.raises(ValueError, match=r"template\.json: not a valid template description"):
        template_io.load_template(folder)
    (folder / "template.json").write_text(json.dumps(meta | {"size": 32}))
    with pytest.raises(ValueError, match="says size 32"):
        template_io.load_template(folder)


def test_a_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is over twice the limit: PIL refuses to decode it
    with pytest.raises(data.DatasetError, match=r"bomb\.png: it is over PIL's limit of 100 pixels"):
        data.load_rgb(tmp_path / "bomb.png")
    with pytest.raises(data.DatasetError, match="bomb.png"):
        data.image_size(tmp_path / "bomb.png")


def test_a_pipeline_folder_of_pickles_is_refused_as_such(tmp_path, capsys):
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(models.TINY_MODEL_DIR, pipe_dir)
    for weights in pipe_dir.rglob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    assert cli.main(["audit", "--model", str(pipe_dir), "--key", "nowhere", "--queries", "2"]) == 2
    with pytest.raises(ValueError, match="pickle"):
        models.load_pipeline(pipe_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match=f"no model at {tmp_path / 'missing'}"):
        models.load_pipeline(tmp_path / "missing", device="cpu")


def test_bad_input_gets_one_line_naming_the_bad_thing(tmp_path, owner, capsys):
    with pytest.raises(ValueError, match="needs a non-negative integer seed"):
        template_io.resolve_template("mosaic:\u0663")  # an Arabic-Indic digit three
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    (tmp_path / "bad" / data.METADATA).write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", '
                                                 b'"text": "caf\xe9"}\n')
    with pytest.raises(data.DatasetError, match=r"metadata\.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        data.read_metadata(tmp_path / "bad")
    args = ["protect", "--data", str(owner), "--out", str(tmp_path / "r"), "--key", str(tmp_path / "k"), "--count",
            "2", "--template", "random"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1, "one line"


def test_a_lora_of_the_wrong_shape_is_one_line(suspect, tmp_path, capsys):
    train_dir = tmp_path / "lora"
    from entruth_lite.infringer import presets, train

    train.finetune(suspect / "protected", train_dir, presets.TrainConfig(method="lora", lora_rank=4, steps=1,
                                                                         batch_size=4), progress=False)
    state = load_file(train_dir / models.LORA_WEIGHTS_NAME)
    save_file({k: (v.repeat(1, 2) if "lora.down" in k else v).contiguous() for k, v in state.items()},  # other widths
              train_dir / models.LORA_WEIGHTS_NAME)
    assert cli.main(["audit", "--weights", str(train_dir), "--key", str(suspect / "key"), "--queries", "2"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "mismatch" in line or "error" in line]
    assert len(lines) == 1 and lines[0].startswith("entruth-lite: error: ") and "56 tensor(s) have another shape" in lines[0]


def test_warnings_print_as_one_line_and_the_decoy_warning_once(suspect, capsys):
    assert cli.main(["audit", "--weights", str(suspect / "full"), "--key", str(suspect / "key"), "--queries", "2",
                     "--decoys", "50"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "cannot reject" in line]
    assert len(warnings) == 1 and warnings[0].startswith("entruth-lite: warning: the decoy test cannot reject")
    assert "UserWarning" not in err and ".py:" not in err


def test_a_link_out_of_the_dataset_is_followed_and_said_and_an_animated_image_is_templated_as_its_first_frame(
        tmp_path, owner):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (32, 32)).save(outside)
    linked = tmp_path / "linked"
    shutil.copytree(owner, linked)
    os.remove(linked / data.read_metadata(owner)[0].file_name)
    os.symlink(outside, linked / data.read_metadata(owner)[0].file_name)
    with pytest.warns(UserWarning, match=f"1 file.s. of {linked} are links to files outside it .e.g. .* -> {outside}"):
        report = protect.protect(linked, "mosaic:0", tmp_path / "linked-out", tmp_path / "linked-key", count=2, seed=0)
    first = data.read_metadata(owner)[0].file_name
    assert not (tmp_path / "linked-out" / first).is_symlink(), "the release holds the file's bytes, not the link"
    assert first in report.altered_files or (tmp_path / "linked-out" / first).read_bytes() == outside.read_bytes()
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = tmp_path / "gif"
    gif.mkdir()
    frames[0].save(gif / "a.gif", save_all=True, append_images=frames[1:])
    for i in range(9):
        Image.new("RGB", (32, 32), (20 * i, 90, 90)).save(gif / f"{i}.png")
    (gif / data.METADATA).write_text("".join(json.dumps({"file_name": n, "text": f"image {n}"}) + "\n"
                                             for n in ["a.gif"] + [f"{i}.png" for i in range(9)]))
    with pytest.warns(UserWarning, match="1 animated image.*'a.gif'.*templated as its first frame"):
        protect.protect(gif, "mosaic:0", tmp_path / "gif-out", tmp_path / "gif-key", count=2, seed=0)


def test_photos_that_are_not_square_need_the_training_resolution(tmp_path):
    folder = data.save_imagefolder([Image.new("RGB", (96, 64)), Image.new("RGB", (64, 64))], ["a wide photo", "a photo"],
                                   tmp_path / "photos", file_names=["wide.png", "square.png"])
    with pytest.raises(data.DatasetError, match=r"not square \(e.g. wide.png \(96x64\)\).*--resolution"):
        protect.protect(folder, "mosaic:0", tmp_path / "r", tmp_path / "k", count=1, seed=0)
    report = protect.protect(folder, "mosaic:0", tmp_path / "r", tmp_path / "k", count=1, seed=0, resolution=32)
    assert {Image.open(tmp_path / "r" / name).size for name in report.altered_files} == {(32, 32)}


def test_the_crash_benchmark_kills_protect_from_outside_and_every_next_run_ends_well(tmp_path):
    """A few trials of ``benchmarks.crash_protect`` (its full run, 60 kills, is in benchmarks/results)."""
    from benchmarks import crash_protect

    results = crash_protect.trials(tmp_path, random_kills=1, seed=0, points=[("new", 2), ("over", 4)])
    assert len(results) == 3 and all(r["ok"] for r in results), results
    assert {r["kind"] for r in results} == {"random", "between renames"}
    assert any(r["outcome"] == "finished" for r in results)
