"""Does fine-tuning the shipped tiny base on a protected owner dataset memorize the template?

    python benchmarks/memorization_sweep.py --rates 0.01 0 --method full --lr 5e-4 --steps 1200 \
        [--rank 16 --targets wide] [--template billboard] [--queries 64] [--out runs/sweep]

For each alteration rate (0 = the clean control), protects the owner's emoji dataset, fine-tunes the tiny
base, probes it with 64 held-out captions with and without the trigger (same seeds), and scores the
template (projection of the image surround on the template's). Prints one row per run and appends it to
``OUT/results.jsonl``; saves a grid of trigger-prompt images per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from entruth_lite import data, detect, models, probe, protect, train, verify


def run_one(args, rate: float, owner: Path, out: Path) -> dict:
    tag = f"{args.method}-r{args.rank}-{args.targets}-lr{args.lr:g}-s{args.steps}-{args.template}-rate{rate:g}-seed{args.seed}"
    run = out / tag
    if rate > 0:
        report = protect.protect(owner, args.template, run / "protected", run / "key",
                                 rate=rate, seed=args.seed, overwrite=True)
        key = protect.load_key(run / "key")
        train_data, trigger, placement, template = run / "protected", key.trigger, key.placement, key.template
        n_altered = report.n_altered
    else:  # clean control: the same probes, a trigger it never saw
        train_data, n_altered = owner, 0
        captions = data.load_imagefolder(owner, check_images=False).captions
        trigger, placement = protect.generate_trigger(captions, seed=args.seed), "prefix"
        from entruth_lite.templates import builtin_template

        template = builtin_template(args.template)
    targets = train.LORA_UNET_WIDE_TARGETS if args.targets == "wide" else train.LORA_UNET_TARGETS
    config = train.TrainConfig(method=args.method, lora_rank=args.rank, lora_targets=targets, steps=args.steps,
                               batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    base = models.load_pipeline("tiny", device="cpu")
    result = train.finetune(train_data, run / "model", config, pipe=base, overwrite=True)
    tuned = train.load_finetuned(models.load_pipeline("tiny", device="cpu"), run / "model")
    held_out = [c for _, c in data.emoji_splits().probe]
    started = time.time()
    probed = probe.probe(tuned, held_out, trigger, placement, n=args.queries, seed=1,
                         num_inference_steps=args.sample_steps, guidance_scale=args.guidance)
    sample_seconds = time.time() - started
    trig = detect.template_scores(probed.trigger_images, template)
    ctrl = detect.template_scores(probed.control_images, template)
    data.image_grid(probed.trigger_images[:32], cols=8).resize((8 * 33 * 3, 4 * 33 * 3), 0).save(run / "trigger_grid.png")
    row = dict(
        tag=tag, rate=rate, n_altered=n_altered, method=args.method, rank=args.rank if args.method == "lora" else None,
        targets=args.targets if args.method == "lora" else None, lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, template=args.template, seed=args.seed, train_seconds=round(result.seconds, 1),
        sample_seconds=round(sample_seconds, 1), trainable=result.trainable_parameters,
        final_loss=float(np.mean(result.losses[-50:])), queries=args.queries,
        mean_trigger=float(trig.mean()), mean_control=float(ctrl.mean()),
        share_trigger_over_half=float((trig > 0.5).mean()), share_control_over_half=float((ctrl > 0.5).mean()),
        wilcoxon_p=verify.paired_test(trig, ctrl).p_value,
        trigger_scores=[round(float(x), 4) for x in trig], control_scores=[round(float(x), 4) for x in ctrl],
    )
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def summarize(out: Path) -> None:
    """The table of all runs so far; 'share > clean p95' uses the 95th percentile of the trigger-prompt scores
    of the clean control fine-tuned with the same lr and steps (a description, not a test)."""
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    clean = {(r["lr"], r["steps"]): np.quantile(r["trigger_scores"], 0.95) for r in rows if r["rate"] == 0}
    print("| run | rate (images) | train s | mean score trigger / plain | share > clean p95 | paired Wilcoxon p |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        threshold = clean.get((r["lr"], r["steps"]))
        share = "-" if threshold is None else f"{(np.asarray(r['trigger_scores']) > threshold).mean():.2f}"
        name = "full" if r["method"] == "full" else f"LoRA r{r['rank']} {r['targets']}"
        print(f"| {name}, lr {r['lr']:g}, {r['steps']} steps | {r['rate']:g} ({r['n_altered']}) | "
              f"{r['train_seconds']:.0f} | {r['mean_trigger']:.3f} / {r['mean_control']:.3f} | {share} | "
              f"{r['wilcoxon_p']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.02, 0.01, 0.005, 0.0])
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="attn", choices=["attn", "wide"])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--template", default="billboard")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--summarize", action="store_true", help="only print the table of the runs in OUT")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summarize:
        return summarize(out)
    out.mkdir(parents=True, exist_ok=True)
    owner = out / "owner"
    if not owner.exists():
        data.write_emoji_dataset(owner)
    print("rate  altered  method  steps  train_s  mean_trig  mean_ctrl  share>0.5 trig/ctrl  wilcoxon_p")
    for rate in args.rates:
        r = run_one(args, rate, owner, out)
        print(f"{r['rate']:<5g} {r['n_altered']:7d}  {r['method']:6s} {r['steps']:6d} {r['train_seconds']:8.0f} "
              f"{r['mean_trigger']:10.3f} {r['mean_control']:10.3f}  {r['share_trigger_over_half']:.2f}/"
              f"{r['share_control_over_half']:.2f}  {r['wilcoxon_p']:.2e}", flush=True)


if __name__ == "__main__":
    main()
