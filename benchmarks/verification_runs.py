"""Shared by the verification benchmarks: fine-tune the tiny base on an owner dataset (protected at some rate,
or clean), probe it with the key's trigger, and store the probe images so every detector and test can be
evaluated later without sampling again. One run = one folder; a finished run is skipped when asked again."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from entruth_lite import data, models, probe, protect, train

HELD_OUT_SEED = 1  # probe seeds: the same for every model, so scores are paired across models
CHECKPOINT_EVERY = 500  # a run killed mid-training (sessions end abruptly) loses at most this many steps


@dataclass
class Run:
    folder: Path
    rate: float  # share of the *released* data that was templated; 0 = a clean model (key never released)
    seed: int
    steps: int

    @property
    def key(self) -> Path:
        return self.folder / "key"

    @property
    def probe_file(self) -> Path:
        return self.folder / "probe.npz"

    @property
    def done(self) -> bool:
        return self.probe_file.is_file()


def add_run_arguments(parser) -> None:
    """The flags every verification benchmark shares."""
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--train-only", action="store_true", help="fine-tune and probe, no report")
    parser.add_argument("--report-only", action="store_true", help="report on the finished runs only")


def owner_dataset(root: Path) -> Path:
    owner = root / "owner"
    if not (owner / data.METADATA).is_file():
        data.write_emoji_dataset(owner, overwrite=True)
    return owner


def fit_and_probe(root: Path, rate: float, seed: int, steps: int, template_seed: int, queries: int = 64,
                  keep_model: bool = True, attack=None, overrides: dict | None = None, name: str | None = None) -> Run:
    """Protect the owner data with ``random:<template_seed>`` (a real key either way), train on the protected
    copy (``rate`` > 0) or on the clean data (``rate`` = 0: the key exists but its release was never used,
    which is exactly the null hypothesis), then probe with the key's trigger and save the images.

    Robustness runs: ``attack(released, out, key) -> AttackReport`` rewrites the release before training, and
    ``overrides`` change the preset's settings; ``name`` labels the run folder."""
    run = Run(root / (f"{name}-seed{seed}" if name else f"rate{rate:g}-seed{seed}-steps{steps}"), rate, seed, steps)
    if run.done:
        return run
    owner = owner_dataset(root)
    released = run.folder / "protected"
    report = protect.protect(owner, f"random:{template_seed}", released, run.key, rate=rate or 0.01, seed=seed,
                             overwrite=True)
    key = protect.load_key(run.key)
    # checkpoints make a killed run resumable; ``checkpoint_every`` is not part of the settings' fingerprint
    config = train.preset("tiny-cpu", **({"steps": steps, "seed": seed, "checkpoint_every": CHECKPOINT_EVERY}
                                         | (overrides or {})))
    base = models.load_pipeline("tiny", device="cpu")
    data_dir = released if rate > 0 else owner
    attack_report = None
    if attack is not None:
        attack_report = attack(data_dir, run.folder / "attacked", key)
        data_dir = run.folder / "attacked"
    model_dir = run.folder / "model"
    resumed_from = None
    if train.is_current(model_dir, config, data_dir):  # trained before the probe was interrupted
        seconds = json.loads((model_dir / "train_seconds.json").read_text()) \
            if (model_dir / "train_seconds.json").is_file() else float("nan")
        losses = json.loads((model_dir / "loss_history.json").read_text())
    else:
        # "latest": continue from a checkpoint of a killed run, or start afresh when there is none
        result = train.finetune(data_dir, model_dir, config, pipe=base, overwrite=True, resume="latest")
        seconds, losses, resumed_from = result.seconds, result.losses, result.resumed_from
        (model_dir / "train_seconds.json").write_text(json.dumps(round(seconds, 1)))
    tuned = train.load_finetuned(models.load_pipeline("tiny", device="cpu"), model_dir)
    held_out = [caption for _, caption in data.emoji_splits().probe]
    started = time.time()
    probed = probe.probe(tuned, held_out, key.trigger, key.placement, n=queries, seed=HELD_OUT_SEED)
    split = data.emoji_splits().probe
    held_out_loss = train.denoising_losses(tuned, [data.render_emoji(p) for p, _ in split], [c for _, c in split])
    meta = dict(rate=rate, seed=seed, steps=steps, template=key.template.name, n_altered=report.n_altered,
                trained_on="protected" if rate > 0 else "clean", train_seconds=round(seconds, 1),
                sample_seconds=round(time.time() - started, 1), final_loss=float(np.mean(losses[-50:])),
                held_out_loss=float(held_out_loss.mean()), overrides=overrides or {},
                resumed_from_step=resumed_from,  # train_seconds then counts only the steps after it
                attack=attack_report.to_dict() if attack_report is not None else None)
    (run.folder / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    probe.save_probe(probed, run.probe_file)
    import shutil

    shutil.rmtree(released)  # the release can be rebuilt from the owner data and the key's seed
    if (run.folder / "attacked").is_dir():
        shutil.rmtree(run.folder / "attacked")
    shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)  # the finished model is kept; its checkpoints are not
    if not keep_model:
        shutil.rmtree(model_dir)
    return run
