"""Two processes through ``accelerate launch`` on the CPU (gloo): training and the audit, against one process.

The command is the README's multi-GPU recipe. On CPUs ``--cpu`` would start one process (accelerate joins CPU
processes only through MPI), so the recipe is ``--multi_gpu``: torchrun starts the processes, and ``finetune`` and
``probe.generate`` join them with gloo when there is no GPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.xdist_group("multiprocess")  # one worker: the trained models are built once

BIN = Path(sys.executable).parent


def launch_command(processes: int) -> list[str]:
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def run(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    """``entruth-lite ARGS``, launched on ``processes`` processes; one math thread each, as torchrun gives them
    (CPU float results depend on the thread count, not on the split)."""
    command = (launch_command(processes) if processes > 1 else []) + [str(BIN / "entruth-lite"), *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


TRAIN = ["--full", "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2", "--json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A protected release, fine-tuned on two processes (batch 2 each) and on one (batch 2, accumulation 2)."""
    from entruth_lite.core import data
    from entruth_lite.core import emoji as emoji_data
    from entruth_lite.owner import protect

    root = tmp_path_factory.mktemp("multiprocess")
    images, captions, names = emoji_data.emoji_dataset("owner", limit=40)
    owner = data.save_imagefolder(images, captions, root / "owner", file_names=names)
    protect.protect(owner, "mosaic:3", root / "protected", root / "key", count=4, seed=0)
    two = run(["train", "--data", str(root / "protected"), "--out", str(root / "two"), *TRAIN], processes=2)
    one = run(["train", "--data", str(root / "protected"), "--out", str(root / "one"), *TRAIN,
               "--gradient-accumulation-steps", "2"])
    return root, two, one


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next((folder / "unet").glob("*.safetensors")))


def test_two_processes_train_one_model_as_one_process_does_at_the_same_global_batch(trained):
    root, two, one = trained
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    summaries = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, "one process reports"
    assert (summaries[0]["processes"], summaries[0]["global_batch"]) == (2, 4)
    assert json.loads(one.stdout)["global_batch"] == 4
    assert json.loads((root / "two" / "train_data.json").read_text())["processes"] == 2
    assert sorted(p.name for p in (root / "two" / "checkpoints").iterdir()) == ["step-0000002"], "written once"
    # the same images and noise in every step (seeded by its global micro-batch), gradients averaged by DDP
    assert json.loads((root / "two" / "loss_history.json").read_text()) == pytest.approx(
        json.loads((root / "one" / "loss_history.json").read_text()), rel=1e-5)
    a, b = unet_weights(root / "two"), unet_weights(root / "one")
    largest_difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert largest_difference < 1e-4, "two processes and one, within float tolerance"


def test_a_two_process_run_resumes_on_two_processes_exactly_and_refuses_one(trained):
    root, _, _ = trained
    before = unet_weights(root / "two")
    again = run(["train", "--data", str(root / "protected"), "--out", str(root / "two"), *TRAIN, "--resume", "latest"],
                processes=2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.splitlines()[-1])["resumed_from"] == 2
    after = unet_weights(root / "two")
    assert all(torch.equal(before[k], after[k]) for k in before), "steps 3-4 replayed from the step-2 checkpoint"
    alone = run(["train", "--data", str(root / "protected"), "--out", str(root / "two"), *TRAIN, "--resume", "latest"])
    assert alone.returncode == 2
    assert "written by a run on 2 process(es)" in alone.stderr and "--num_processes 2" in alone.stderr


def test_an_audit_on_two_processes_gives_the_images_and_p_values_of_one(trained):
    """40 queries: two batches of generation, one per process, gathered in query order."""
    root, two, _ = trained
    audit = ["audit", "--weights", str(root / "two"), "--key", str(root / "key"), "--queries", "40",
             "--decoys", "199", "--json"]
    alone, split = run(audit), run(audit, processes=2)
    assert alone.returncode == 0 and split.returncode == 0, alone.stderr[-2000:] + split.stderr[-2000:]
    assert len(split.stdout.splitlines()) == 1, "one process reports"
    single, shared = json.loads(alone.stdout), json.loads(split.stdout)
    assert shared["queries"] == single["queries"], "every query's scores: the same images, in query order"
    assert shared["verdicts"] == single["verdicts"]
