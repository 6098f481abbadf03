"""The infringer's frontier: what a fine-tune gained from the owner's data against the evidence it leaves, along
each run, for the settings infringers actually run.

Every run protects the owner's 1,005 emoji at the collection's key design (``mosaic:<seed>``, 6-letter triggers),
fine-tunes the tiny base in the project's one training loop with one setting below, and keeps snapshots every 10 %
of the run (``train.finetune(snapshots=...)``). At each snapshot it stores the probe (64 trigger and control queries)
and what the model learned (``utility.measure_learned``: loss on the release and on held-out emoji, KID of samples
for the owner's captions), so the table can be re-scored with any later test (``--report-only``). Utility is each
measure's share of the gain the project's full fine-tune (``tiny-cpu``, same rate and seed, end of run) made over the
base model; evidence is the audit's decoy test (projection, 999 decoys) and the share of trigger images over the
owner's 1 % plain-image threshold. Resumable at any point (``python -m benchmarks.frontier``; one process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

from entruth_lite.core import data, emoji, models
from entruth_lite.evaluation import utility
from entruth_lite.infringer import checkpoints, presets, train
from entruth_lite.owner import audit, keys, probe, protect, triggers

from .common import (
    CHECKPOINT_EVERY,
    DECOYS,
    FPR,
    HELD_OUT_SEED,
    base_pipeline,
    cached_scores,
    owner_dataset,
    plain_negatives,
    run_folder,
    write_table,
)

RATES = (0.02, 0.01)
SEEDS = (0, 1, 2)
FAMILY, TRIGGER_LENGTH = "mosaic", 6  # the collection's key design
SNAPSHOTS = 10  # one every 10 % of a run
RELEASE_IMAGES = 256  # release images the release loss is measured on (a fixed subset: the first untemplated ones)
KID_SAMPLES = 64
SAMPLE_STEPS = 25  # DDIM steps of every probe and KID sample, as the audit draws them
REFERENCE = "tiny-cpu"  # the fine-tune whose gain utility is a share of

# name: the settings as their users run them, as overrides of TrainConfig; "epochs" sets the steps from the release
SETTINGS: dict[str, dict] = {
    # diffusers' examples/text_to_image/train_text_to_image_lora.py at its defaults: rank 4, alpha = rank, attention
    # of the UNet only, lr 1e-4 "constant" (its 500 warm-up steps apply only to the other schedules), batch 16,
    # 100 epochs, latents drawn from the VAE's posterior
    "diffusers-lora": dict(method="lora", lora_rank=4, lora_alpha=None, lora_targets=presets.LORA_UNET_TARGETS,
                           train_text_encoder=False, learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500,
                           batch_size=16, sample_latents=True, epochs=100),
    # kohya sd-scripts' common LoRA recipe: rank 32, alpha 16, the UNet's transformer layers and the text encoder,
    # lr 1e-4 (one rate for both: the loop has one), batch 16, 3,000 steps, sampled latents
    "kohya-lora": dict(method="lora", lora_rank=32, lora_alpha=16, lora_targets=presets.LORA_UNET_WIDE_TARGETS,
                       train_text_encoder=True, learning_rate=1e-4, lr_scheduler="constant", batch_size=16,
                       sample_latents=True, steps=3000),
    # SIREN's benchmark LoRA: rank 64 on the UNet's attention, lr 1e-4, 80 epochs
    "siren-lora-r64": dict(method="lora", lora_rank=64, lora_alpha=None, lora_targets=presets.LORA_UNET_TARGETS,
                           train_text_encoder=False, learning_rate=1e-4, lr_scheduler="constant", batch_size=16,
                           sample_latents=True, epochs=80),
    # diffusers' train_text_to_image.py (full UNet) at its defaults: lr 1e-4 "constant", batch 16, 100 epochs,
    # sampled latents
    "diffusers-full": dict(method="full", learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500,
                           batch_size=16, sample_latents=True, epochs=100),
    # the project's presets, for reference
    "tiny-cpu": {},
    "tiny-cpu-lora": dict(presets.PRESETS["tiny-cpu-lora"]),
}


def run_name(setting: str, rate: float) -> str:
    return f"frontier-{setting}-rate{rate:g}"


def config_for(setting: str, n_release: int, seed: int) -> presets.TrainConfig:
    """The setting's TrainConfig for a release of ``n_release`` images (epochs become steps at its batch size)."""
    overrides = dict(SETTINGS[setting])
    epochs = overrides.pop("epochs", None)
    batch = overrides.get("batch_size", presets.PRESETS["tiny-cpu"]["batch_size"])
    if epochs is not None:
        overrides["steps"] = math.ceil(epochs * n_release / batch)
    return presets.preset("tiny-cpu", **overrides | dict(seed=seed, checkpoint_every=CHECKPOINT_EVERY))


def snapshot_steps(steps: int) -> list[int]:
    return sorted({max(1, round(steps * k / SNAPSHOTS)) for k in range(1, SNAPSHOTS + 1)})


def protected_release(root: Path, folder: Path, rate: float, seed: int):
    """The run's release and key, made once (the key's own seed draws the files and the trigger)."""
    released = folder / "protected"
    if not (folder / "key" / keys.KEY_FILE).is_file() or not (released / data.METADATA).is_file():
        owner = owner_dataset(root)
        trigger = triggers.generate_trigger(data.load_imagefolder(owner).captions, length=TRIGGER_LENGTH, seed=seed)
        protect.protect(owner, f"{FAMILY}:{seed}", released, folder / "key", rate=rate, seed=seed, trigger=trigger,
                        overwrite=True)
    return released, keys.load_key(folder / "key", release=released)


def measured_data(released: Path, key):
    """(release subset, held-out emoji) as ``utility.measure_learned`` takes them: the same for every model."""
    release = data.load_imagefolder(released)
    rows = [i for i, name in enumerate(release.file_names) if name not in set(key.files)][:RELEASE_IMAGES]
    held = emoji.emoji_splits().probe
    return (([release.image(i) for i in rows], [release.captions[i] for i in rows]),
            ([emoji.render_emoji(p) for p, _ in held], [c for _, c in held]))


def measure_snapshot(folder: Path, name: str, pipe, key, measured, queries: int) -> None:
    """The probe and the learned measures of one model (a snapshot, or the base), stored once."""
    probe_file, learned_file = folder / "probes" / f"{name}.npz", folder / "learned" / f"{name}.json"
    if not probe_file.is_file():
        held_captions = measured[1][1]
        probe.save_probe(probe.probe_model(pipe, held_captions, key.trigger, key.placement, n=queries,
                                           seed=HELD_OUT_SEED, num_inference_steps=SAMPLE_STEPS, progress=False),
                         probe_file)
    if not learned_file.is_file():
        learned = utility.measure_learned(pipe, measured[0], measured[1], samples=KID_SAMPLES,
                                          num_inference_steps=SAMPLE_STEPS)
        learned_file.parent.mkdir(parents=True, exist_ok=True)
        learned_file.write_text(json.dumps(learned.to_dict()) + "\n")


def fit_run(root: Path, setting: str, rate: float, seed: int, queries: int) -> None:
    folder = run_folder(root, run_name(setting, rate), seed)
    released, key = protected_release(root, folder, rate, seed)
    config = config_for(setting, key.n_images, seed)
    model = folder / "model"
    steps = snapshot_steps(config.steps)
    if not checkpoints.is_current(model, config, released):
        train.finetune(released, model, config, pipe=base_pipeline(), overwrite=True, resume="latest", snapshots=steps)
    measured = measured_data(released, key)
    measure_snapshot(folder, "base", base_pipeline(), key, measured, queries)
    for step in steps:
        pipe = models.load_finetuned(base_pipeline(), train.snapshot_folder(model, step))
        measure_snapshot(folder, f"step-{step:07d}", pipe, key, measured, queries)
    (folder / "done.json").write_text(json.dumps(dict(steps=config.steps, snapshots=steps,
                                                      fingerprint=config.fingerprint())) + "\n")


def evidence(root: Path, folder: Path, name: str) -> dict:
    """The decoy test's p-value and the share of trigger images over the plain-image threshold, of one stored probe."""
    key = keys.load_key(folder / "key")

    def compute():
        return audit.score_probe(probe.load_probe(folder / "probes" / f"{name}.npz"), key.template, ("projection",),
                                 plain_negatives(root, key), decoys=DECOYS, salt=key.key_sha256, progress=False)

    scores = cached_scores(folder / "scores" / f"{name}.npz", compute)
    decoy, binomial = audit.verdicts_from_scores(scores, "projection", ("decoy", "binomial"), fpr=FPR)
    return dict(decoy_p=decoy.p_value, over_threshold=binomial.detections / binomial.n_queries,
                binomial_p=binomial.p_value)


def rows_of(root: Path, setting: str, rate: float, seed: int) -> list[dict]:
    folder = run_folder(root, run_name(setting, rate), seed)
    if not (folder / "done.json").is_file():
        return []
    done = json.loads((folder / "done.json").read_text())
    learned = lambda f, name: utility.Learned(**json.loads((f / "learned" / f"{name}.json").read_text()))
    base = learned(folder, "base")
    reference_folder = run_folder(root, run_name(REFERENCE, rate), seed)
    reference = None
    if (reference_folder / "done.json").is_file():
        last = json.loads((reference_folder / "done.json").read_text())["snapshots"][-1]
        reference = learned(reference_folder, f"step-{last:07d}")
    (folder / "scores").mkdir(exist_ok=True)
    rows = []
    for step in [0] + done["snapshots"]:  # step 0: the base model, where every curve starts
        name = "base" if step == 0 else f"step-{step:07d}"
        model = learned(folder, name)
        shares = utility.utility(base, model, reference) if reference is not None else {}
        rows.append(dict(setting=setting, rate=rate, seed=seed, step=step, progress=step / done["steps"],
                         **model.to_dict(), **{f"{k}_share": v for k, v in shares.items()},
                         **evidence(root, folder, name)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--report-only", action="store_true", help="re-score the stored probes, train nothing")
    args = parser.parse_args(argv)
    root = Path(args.out)
    grid = list(itertools.product(args.settings, args.rates, args.seeds))
    for setting, rate, seed in [] if args.report_only else grid:
        print(f"frontier: {setting} rate {rate:g} seed {seed}", flush=True)
        fit_run(root, setting, rate, seed, args.queries)
    rows = [row for setting, rate, seed in grid for row in rows_of(root, setting, rate, seed)]
    write_table(rows, root / "frontier.csv", dict(rate="g", progress=".1f", decoy_p=".1e", binomial_p=".1e",
                                                   release_loss=".4f", held_out_loss=".4f", kid=".4f"))


if __name__ == "__main__":
    main()
