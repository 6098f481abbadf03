"""Replayable evidence (issue #19): an audit's JSON record (or the HTML report that embeds it) holds everything a
third party needs to rerun it on another machine, and the rerun gives the same p-values on the CPU."""

import json
import shutil

import pytest

from conftest import protected_suspect
from entruth_lite import cli
from entruth_lite.owner import record, replay, report

ARGS = ["--queries", "4", "--decoys", "199", "--alpha", "0.05"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A suspect, and its audit's JSON record and HTML report, made with the CLI."""
    root = protected_suspect(tmp_path_factory.mktemp("replay"))
    args = ["audit", "--weights", str(root / "full"), "--key", str(root / "key"), *ARGS,
            "--report", str(root / "report.html"), "--json"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(args) == 0
    (root / "record.json").write_text(out.getvalue())
    return root, json.loads(out.getvalue())


def test_the_record_says_what_a_replay_needs(recorded):
    _, record = recorded
    env = record["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "torch.float32" and env["resolution"] == 32
    assert env["libraries"]["torch"] and env["libraries"]["diffusers"] and env["python"]
    assert record["key"]["template"].startswith("random:") and record["key"]["template_size"] == [32, 32]
    assert record["model"]["weight_files"] and record["model"]["base_files"]
    assert {"num_inference_steps", "guidance_scale", "probe_seed"} <= set(record["config"])
    assert len(record["queries"]) == 4 and all({"trigger_prompt", "seed"} <= set(q) for q in record["queries"])


@pytest.mark.parametrize("source", ["record.json", "report.html"])
def test_replay_from_the_record_alone_gives_the_same_p_values(recorded, source, capsys):
    root, record = recorded
    assert cli.main(["audit", "--replay", str(root / source), "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    mine = {v["test"]: v["p_value"] for v in replayed["verdicts"]}
    assert set(mine) == {"decoy", "paired"} and mine == {t: replayed["recorded_p_values"][t] for t in mine}
    assert [q["trigger_score"] for q in replayed["queries"]] == [q["trigger_score"] for q in record["queries"]]
    assert report.read_record(root / "report.html") == record


def test_replay_refuses_other_weights_and_follows_moved_ones(recorded, tmp_path):
    root, record = recorded
    moved = tmp_path / "moved"
    shutil.copytree(root / "full", moved)
    result = replay.replay(record, weights=moved, progress=False)  # same files elsewhere: fine
    assert result.headline.p_value == record["p_value"]
    config = moved / "train_config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(ValueError, match="suspect weights .* not the audited ones.*train_config.json"):
        replay.replay(record, weights=moved, progress=False)
    edited = json.loads(json.dumps(record))
    edited["queries"][0]["seed"] += 1
    with pytest.raises(ValueError, match="edited"):
        replay.replay(edited, progress=False)
    with pytest.raises(ValueError, match="carries no audit record"):
        (tmp_path / "plain.html").write_text("<html></html>")
        report.read_record(tmp_path / "plain.html")


def test_a_hub_models_record_names_its_revision_and_files(tmp_path, monkeypatch):
    """A base model given as a hub id is recorded by the commit of its cached snapshot and its files' hashes."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--someone--sd-finetune" / "snapshots" / commit
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = record.model_info("someone/sd-finetune", None)
    assert info["revision"] == commit and set(info["base_files"]) == {"model_index.json", "unet/config.json"}
    assert record.model_info("someone/not-cached", None)["revision"] is None


def test_a_black_box_record_is_not_replayed_as_a_model(recorded):
    _, record = recorded
    black_box = json.loads(json.dumps(record))
    black_box["model"] = {"images": "answers/", "image_files": {"trigger-000.png": "ab" * 32}}
    with pytest.raises(ValueError, match="saved images"):
        replay.replay(black_box, progress=False)
