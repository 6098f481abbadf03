"""Which fine-tuning settings memorize the template at which alteration rate (tiny model, 2 CPU cores)?

    python -m benchmarks.memorization_sweep --settings full lora-r32-wide-te --rates 0.02 0.01 0.005 \
        [--seeds 0 1 2] [--out runs/bench] [--train-only | --report-only]

Every run is one ``benchmarks.common.fit_and_probe``: protect the owner's emoji with ``random:<seed>`` at the
rate, fine-tune the shipped base with the ``tiny-cpu`` preset plus the setting's overrides, probe 64 held-out
captions with and without the trigger and store the images (``probe.npz``), so the table can be re-scored
whenever the detector changes. The report scores every stored probe with the projection detector and 999
decoys and writes one row per run to ``memorization.csv`` (decoy p, binomial p, share of trigger images over
the 1 % threshold, training seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from entruth_lite.infringer import presets
from entruth_lite.owner import audit, decoys

from .common import (
    FPR,
    LEGACY_FAMILY,
    LEGACY_TRIGGER_LENGTH,
    Run,
    add_run_arguments,
    design_suffix,
    fit_and_probe,
    projection_scores,
    rate_name,
    restored,
    write_table,
)

STEPS = 1500
SETTINGS: dict[str, dict] = {  # name: overrides of the tiny-cpu preset
    "full": {},
    "lora-r32-wide": dict(method="lora", lora_rank=32, lora_targets=presets.LORA_UNET_WIDE_TARGETS),
    "lora-r32-wide-te": dict(method="lora", lora_rank=32, lora_targets=presets.LORA_UNET_WIDE_TARGETS,
                             train_text_encoder=True),
    "lora-r8-wide-te": dict(method="lora", lora_rank=8, lora_targets=presets.LORA_UNET_WIDE_TARGETS,
                            train_text_encoder=True),
    # twice the exposures: does the rate-1 % miss of lora-r32-wide-te come from too few passes?
    "lora-r32-wide-te-3000": dict(method="lora", lora_rank=32, lora_targets=presets.LORA_UNET_WIDE_TARGETS,
                                  train_text_encoder=True, steps=2 * STEPS),
    # the mosaic family (families.FAMILIES): members far apart after the VAE (benchmarks/template_family.py)
    "lora-r32-wide-te-mosaic": dict(method="lora", lora_rank=32, lora_targets=presets.LORA_UNET_WIDE_TARGETS,
                                    train_text_encoder=True, family="mosaic"),
    "full-mosaic": dict(family="mosaic"),
    # trigger design: seed 1 misses in every setting, and its 3-letter trigger is the only one the tokenizer splits
    # into 2 tokens (others: 3); 6 letters give 4-6 tokens. Same released images as full-mosaic at the same seed
    "full-mosaic-trigger6": dict(family="mosaic", trigger_length=6),
    # the full UNet plus a LoRA on the (frozen, random) text encoder, which bound the trigger for the LoRA rows
    "full-mosaic-te": dict(family="mosaic", train_text_encoder=True),
    # an infringer's realistic LoRA: diffusers' train_text_to_image_lora.py defaults (rank 4 on the attention
    # projections, cosine schedule, UNet only) at the preset's learning rate, which trains the tiny model stably
    "lora-diffusers-example-mosaic": dict(method="lora", lora_rank=4, lora_targets=presets.LORA_UNET_TARGETS,
                                          lr_scheduler="cosine", family="mosaic"),
    # the same with 6-letter triggers (full-mosaic-trigger6)
    "lora-r32-wide-te-mosaic-trigger6": dict(method="lora", lora_rank=32, lora_targets=presets.LORA_UNET_WIDE_TARGETS,
                                             train_text_encoder=True, family="mosaic", trigger_length=6),
    "lora-diffusers-example-mosaic-trigger6": dict(method="lora", lora_rank=4, lora_targets=presets.LORA_UNET_TARGETS,
                                                   lr_scheduler="cosine", family="mosaic", trigger_length=6),
    # LoRA's usual practice: a higher learning rate than the full fine-tune's. 3x trained stably, 10x diverged
    # (lora_lr_check.csv); warm-up for the larger first steps
    "lora-r32-wide-te-mosaic-trigger6-lr3x": dict(method="lora", lora_rank=32,
                                                  lora_targets=presets.LORA_UNET_WIDE_TARGETS, train_text_encoder=True,
                                                  learning_rate=3e-3, lr_warmup_steps=100, family="mosaic",
                                                  trigger_length=6),
    # on every linear and convolution of the UNet (what the wide targets leave to the full fine-tune), at the
    # preset's learning rate (3x made the wide LoRA unstable on 2 of 3 seeds) and at 3x
    "lora-r32-all-te-mosaic-trigger6": dict(method="lora", lora_rank=32, lora_targets=presets.LORA_UNET_ALL_TARGETS,
                                            train_text_encoder=True, family="mosaic", trigger_length=6),
    "lora-r32-all-te-mosaic-trigger6-lr3x": dict(method="lora", lora_rank=32, lora_targets=presets.LORA_UNET_ALL_TARGETS,
                                                 train_text_encoder=True, learning_rate=3e-3, lr_warmup_steps=100,
                                                 family="mosaic", trigger_length=6),
    # the same LoRA learning as fast as the full fine-tune without a larger learning rate. With A drawn at 1/rank and
    # alpha = rank, Adam moves each entry of B A by about lr / sqrt(rank) per step, 5.7x slower than the full
    # fine-tune's weights at rank 32; a larger learning rate also moves the small A faster (3x: unstable). rsLoRA's
    # scale alpha / sqrt(rank) (alpha = rank^1.5 = 181 here) moves B A at the full fine-tune's pace
    "lora-r32-all-te-mosaic-trigger6-alpha181": dict(method="lora", lora_rank=32, lora_alpha=181,
                                                     lora_targets=presets.LORA_UNET_ALL_TARGETS, train_text_encoder=True,
                                                     family="mosaic", trigger_length=6),
    # fewer trainable parameters at the same pace (alpha = rank^1.5): the curve of detection against LoRA size
    "lora-r8-all-te-mosaic-trigger6-alpha22.6": dict(method="lora", lora_rank=8, lora_alpha=22.6,
                                                     lora_targets=presets.LORA_UNET_ALL_TARGETS, train_text_encoder=True,
                                                     family="mosaic", trigger_length=6),
    # DoRA learns each adapted weight's norm apart from its direction, closer to a full fine-tune's updates
    "dora-r32-all-te-mosaic-trigger6": dict(method="lora", lora_rank=32, use_dora=True,
                                            lora_targets=presets.LORA_UNET_ALL_TARGETS, train_text_encoder=True,
                                            family="mosaic", trigger_length=6),
    # the demo's length: does half the steps still memorize at 1 %? (make demo's time is mostly training)
    "full-mosaic-trigger6-750": dict(family="mosaic", trigger_length=6, steps=STEPS // 2),
    # the LoRA preset at the demo's length: can notebook 02 fine-tune a LoRA live within the demo's budget?
    "lora-r32-all-te-mosaic-trigger6-alpha181-750": dict(method="lora", lora_rank=32, lora_alpha=181,
                                                         lora_targets=presets.LORA_UNET_ALL_TARGETS,
                                                         train_text_encoder=True, family="mosaic", trigger_length=6,
                                                         steps=STEPS // 2),
    # the demo's cost (750 x 32 images) as 1,500 steps of 16: the same passes, twice the updates
    "lora-r32-all-te-mosaic-trigger6-alpha181-b16": dict(method="lora", lora_rank=32, lora_alpha=181,
                                                         lora_targets=presets.LORA_UNET_ALL_TARGETS,
                                                         train_text_encoder=True, family="mosaic", trigger_length=6,
                                                         batch_size=16),
    # twice rsLoRA's pace (alpha = 2 rank^1.5) for half the steps: the same distance moved in the demo's length?
    "lora-r32-all-te-mosaic-trigger6-alpha362-750": dict(method="lora", lora_rank=32, lora_alpha=362,
                                                         lora_targets=presets.LORA_UNET_ALL_TARGETS,
                                                         train_text_encoder=True, family="mosaic", trigger_length=6,
                                                         steps=STEPS // 2),
}
TINY_LORA_PRESET_SETTING = "lora-r32-all-te-mosaic-trigger6-alpha181"  # presets.PRESETS["tiny-cpu-lora"]
NOT_TRAINING = ("steps", "family", "trigger_length")  # sweep keys that are not training settings


# the tiny-cpu preset at the key design is detection_power's run at the same rate and seed (same release, same
# settings): its rows read those runs instead of training them again
POWER_RUN_SETTING = "full-mosaic-trigger6"


def tag(setting: str, rate: float) -> str:
    """The name of a setting's runs at ``rate`` (``fit_and_probe`` adds ``-seed<seed>``)."""
    if setting == POWER_RUN_SETTING:
        spec = SETTINGS[setting]
        return rate_name(rate, STEPS) + design_suffix(spec["family"], spec["trigger_length"])
    return f"mem-{setting}-rate{rate:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rates", type=float, nargs="+", default=[0.02, 0.01, 0.005])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_run_arguments(parser)
    args = parser.parse_args()
    root = Path(args.out)
    if not args.report_only:
        for setting in args.settings:
            for rate in args.rates:
                for seed in args.seeds:
                    print(f"{setting} rate {rate:g} seed {seed}", flush=True)
                    overrides = {k: v for k, v in SETTINGS[setting].items() if k not in NOT_TRAINING}
                    fit_and_probe(root, rate, seed, SETTINGS[setting].get("steps", STEPS), template_seed=seed,
                                  queries=args.queries, overrides=overrides, name=tag(setting, rate),
                                  family=SETTINGS[setting].get("family", LEGACY_FAMILY),
                                  # settings without a trigger_length ran with protect's 3-letter triggers of the time
                                  trigger_length=SETTINGS[setting].get("trigger_length", LEGACY_TRIGGER_LENGTH),
                                  archive=args.archive)
    if args.train_only:
        return
    rows = []
    for setting in args.settings:
        for rate in args.rates:
            for seed in args.seeds:
                run = restored(Run.named(root, tag(setting, rate), rate, seed, SETTINGS[setting].get("steps", STEPS)),
                               args.archive)
                if not run.done:
                    continue
                meta = json.loads((run.folder / "run.json").read_text())
                scores = projection_scores(root, run)
                decoy, binomial = audit.verdicts_from_scores(scores, "projection", ("decoy", "binomial"), fpr=FPR)
                rows.append(dict(setting=setting, rate=rate, seed=seed, statistic=decoys.stored_statistic(scores),
                                 n_altered=meta["n_altered"],
                                 train_seconds=meta["train_seconds"],
                                 resumed_from_step=meta.get("resumed_from_step") or 0, decoy_p=decoy.p_value,
                                 binomial_p=binomial.p_value, binomial_flagged=binomial.detections))
    write_table(rows, root / "memorization.csv", dict(rate="g", train_seconds=".0f", decoy_p=".1e", binomial_p=".1e"))


if __name__ == "__main__":
    main()
