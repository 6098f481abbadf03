"""One prepared GPU check of the Stable Diffusion 1.5 path (issue #17): run it once where a GPU is lent.

    python -m benchmarks.gpu_check [--steps 30] [--device cuda] [--width full] [--resolution PX]

What it checks, on SD 1.5's architecture with random weights (``sd_architecture.build_sd15``; nothing downloads,
so it runs on a machine without hub access):

1. the model builds, saves and loads with ``models.load_pipeline`` on the device (fp16 on CUDA);
2. a small dataset of drawn, captioned images at the largest preset's resolution is protected (``protect``,
   template ``random:1``);
3. every GPU preset (``presets.gpu_presets``: those of Stable Diffusion) fine-tunes for ``--steps`` steps at its own
   resolution (``colab-t4``: 256 px; ``--resolution`` sets one for all): seconds per step after the first steps'
   warm-up, peak GPU memory, and whether a loss is NaN/inf or all losses are equal;
4. each LoRA loads into a fresh pipeline (``models.load_finetuned``), which samples as float (``output_type="np"``:
   uint8 would show a NaN as black) to check for NaN/inf or constant images, then probes and audits
   (``audit.audit``, 99 decoys, alpha 0.05) at that resolution and prints the p-value.

It ends with one markdown table and exits non-zero when anything was NaN/inf/constant or a stage failed.

How long: a few minutes on one large GPU such as an H200 (an estimate until a run prints its own total), and
under 8 at the defaults; much of it is building and saving the 4.3 GB fp32 model and loading it once per preset.
The weights are random, so the images and p-values mean nothing beyond being finite; the step times and memory are
SD 1.5's (the base pipeline stays on the GPU during training, as in notebook 02, and counts in the peak).

Its figures go into the README only when measured this way on a GPU; until then the README's GPU figures are
estimates.

The same code path runs on the CPU as a smoke test (``tests/test_gpu_check.py``):

    python -m benchmarks.gpu_check --device cpu --width narrow --resolution 64 --steps 2

On the CPU ``finetune`` refuses mixed precision, so the presets run there with ``mixed_precision="no"`` (the
output says so); nothing else about them changes.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no hub access: fail fast, never wait on one
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from PIL import Image, ImageDraw

from entruth_lite.core import data, models, sd_architecture
from entruth_lite.infringer import presets, train
from entruth_lite.owner import audit, keys, protect, triggers

TEMPLATE = "random:1"  # a member of the random family, so the audit's decoy test runs
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "cyan": (40, 200, 210), "pink": (230, 120, 180)}
SHAPES = ("square", "circle", "bar", "triangle")
HELD_OUT = ["a photo of a purple circle", "a photo of an orange square", "a photo of a white bar",
            "a photo of a black triangle"]  # colours the dataset never shows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of the same path)")
    parser.add_argument("--width", default="full", choices=sd_architecture.WIDTHS, help="SD 1.5 itself, or narrow")
    parser.add_argument("--resolution", type=int, help="one side in px for every preset (default: each its own)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per preset")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the step time")
    parser.add_argument("--images", type=int, default=24, help="images in the drawn dataset")
    parser.add_argument("--templated", type=int, default=4, help="of them, templated by protect")
    parser.add_argument("--queries", type=int, default=4, help="audit queries (trigger + control images each)")
    parser.add_argument("--inference-steps", type=int, default=10, help="sampling steps of probes and checks")
    parser.add_argument("--preset", action="append", choices=presets.gpu_presets(), help="check only this preset (repeatable)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: a step time needs one step after the first")
    return args


# ----------------------------------------------------------------------------- the dataset


def drawn_image(colour: tuple[int, int, int], shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A flat shape at a random place on a random grey: content for the template to frame, drawn, not downloaded."""
    image = Image.new("RGB", (size, size), (int(rng.integers(90, 170)),) * 3)
    draw = ImageDraw.Draw(image)
    side = int(size * rng.uniform(0.35, 0.6))
    x, y = (int(v) for v in rng.integers(0, size - side, 2))
    box = (x, y, x + side, y + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "bar":
        draw.rectangle((x, y + side // 3, x + side, y + 2 * side // 3), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y + side), (x + side // 2, y), (x + side, y + side)], fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def drawn_dataset(out: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` captioned images (every colour x shape, then again at new places) written as an imagefolder."""
    rng = np.random.default_rng(seed)
    pairs = [(name, rgb, shape) for shape in SHAPES for name, rgb in COLOURS.items()]
    rows = [pairs[i % len(pairs)] for i in range(n)]
    images = [drawn_image(rgb, shape, size, rng) for _, rgb, shape in rows]
    return data.save_imagefolder(images, [f"a photo of a {name} {shape}" for name, _, shape in rows], out)


# ----------------------------------------------------------------------------- measurements


@dataclass
class Row:
    """One line of the summary table; ``failures`` empty means the stage passed."""

    name: str
    px: int | None = None
    precision: str = "-"
    batch: str = "-"
    s_per_step: float = math.nan
    peak_gb: float = math.nan
    loss: str = "-"
    images: str = "-"
    p_value: float = math.nan
    seconds: float = math.nan
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def on_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def resolution_of(name: str, args) -> int:
    """The side a preset trains, samples and is audited at: ``--resolution``, else the preset's own."""
    return args.resolution or presets.PRESETS[name].get("resolution") or 512


def data_resolution(args) -> int:
    """The drawn data's side: the largest any checked preset trains at (the trainer resizes it for the others)."""
    return max(resolution_of(name, args) for name in args.preset or presets.gpu_presets())


def reset_peak(device: str) -> None:
    if on_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float:
    """Peak GPU memory since the last reset; NaN on the CPU (this check measures GPU memory only)."""
    return torch.cuda.max_memory_allocated() / 2**30 if on_cuda(device) else math.nan


def warmup_steps(warmup: int, steps: int) -> int:
    """Steps left out of the step time (allocator and kernel warm-up): at least the first, whose start has no
    timestamp, and at most all but the last."""
    return max(1, min(warmup, steps - 1))


def seconds_per_step(stamps: list[float], skip: int) -> float:
    """Mean time between ``on_step`` calls after the first ``skip`` steps. Each call follows ``loss.item()``,
    which waits for the GPU, so the intervals are the GPU's time too."""
    return (stamps[-1] - stamps[skip - 1]) / (len(stamps) - skip)


def loss_problems(losses: list[float]) -> list[str]:
    values = np.asarray(losses, dtype=np.float64)
    if not np.isfinite(values).all():
        return [f"{int((~np.isfinite(values)).sum())} of {len(values)} losses NaN/inf"]
    if len(values) > 1 and np.ptp(values) == 0:
        return ["losses constant"]
    return []


@torch.no_grad()
def float_images(pipe, prompts: list[str], resolution: int, steps: int) -> tuple[np.ndarray, bool]:
    """(the pipeline's float images, whether every step's latents were finite): uint8 would show a NaN as black,
    and the pipeline clamps images to [0, 1], which turns an inf into a plain 0 or 1, so the latents are watched
    too."""
    finite = []

    def watch(pipe, step, timestep, tensors):
        finite.append(bool(torch.isfinite(tensors["latents"]).all()))
        return tensors

    generator = torch.Generator(pipe.device).manual_seed(0)
    images = pipe(prompts, num_inference_steps=steps, height=resolution, width=resolution, generator=generator,
                  output_type="np", callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["latents"]).images
    return images, all(finite)


def image_problems(images: np.ndarray, latents_finite: bool = True) -> list[str]:
    problems = [] if latents_finite else ["latents NaN/inf"]
    if not np.isfinite(images).all():
        return problems + [f"{int((~np.isfinite(images)).sum())} image values NaN/inf"]
    constant = [i for i, image in enumerate(images) if np.ptp(image) == 0]
    return problems + ([f"{len(constant)} of {len(images)} images constant"] if constant else [])


def check_images(pipe, prompts: list[str], resolution: int, args) -> tuple[str, list[str]]:
    """(a short description, problems) of the float images ``pipe`` draws for ``prompts`` at ``resolution`` px."""
    images, latents_finite = float_images(pipe, prompts, resolution, args.inference_steps)
    problems = image_problems(images, latents_finite)
    verdict = "ok" if not problems else "BAD"
    return f"{verdict}: {len(images)} float, range {np.nanmin(images):.2f}..{np.nanmax(images):.2f}", problems


# ----------------------------------------------------------------------------- the stages


def preset_config(name: str, model: Path, args) -> presets.TrainConfig:
    """The preset as it is, on the built model, size and step count; on the CPU without mixed precision, which
    ``finetune`` refuses there."""
    overrides = dict(model=str(model), steps=args.steps, resolution=resolution_of(name, args))
    precision = presets.PRESETS[name].get("mixed_precision", "no")
    if not on_cuda(args.device) and precision != "no":
        print(f"  {name}: on the CPU, mixed_precision {precision!r} -> 'no' (finetune refuses it there)")
        overrides["mixed_precision"] = "no"
    return presets.preset(name, **overrides)


def run_finetune(name: str, model: Path, release: Path, out: Path, base, args, row: Row) -> None:
    config = preset_config(name, model, args)
    row.precision, row.px = config.mixed_precision, config.resolution
    row.batch = f"{config.batch_size} x {config.gradient_accumulation_steps}"
    stamps: list[float] = []
    free_memory()
    reset_peak(args.device)
    result = train.finetune(release, out, config, pipe=base, progress=False, device=args.device,
                            on_step=lambda step, loss: stamps.append(time.perf_counter()))
    row.peak_gb = peak_gb(args.device)
    row.s_per_step = seconds_per_step(stamps, warmup_steps(args.warmup, len(stamps)))
    row.loss = f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
    row.failures += loss_problems(result.losses)
    print(f"  {name}: {row.s_per_step:.3f} s/step, peak GPU memory {number(row.peak_gb, '.2f')} GiB, loss {row.loss}, "
          f"{result.trainable_parameters:,} trainable parameters", flush=True)


def run_audit(model: Path, lora: Path, key, args, row: Row) -> None:
    """Load the LoRA into a fresh pipeline, check its float images, then probe and audit it at the size it
    trained at."""
    pipe = models.load_finetuned(models.load_pipeline(model, device=args.device), lora)
    prompts = [triggers.apply_trigger(HELD_OUT[0], key.trigger, key.placement), HELD_OUT[0]]
    row.images, problems = check_images(pipe, prompts, row.px, args)
    row.failures += problems
    config = audit.AuditConfig(queries=args.queries, decoys=99, alpha=0.05, num_inference_steps=args.inference_steps,
                               resolution=row.px)
    head = audit.audit(pipe, key, HELD_OUT, config, progress=False).headline  # the decoy test: random template
    row.p_value = head.p_value if head is not None else math.nan
    if not 0 < row.p_value <= 1:
        row.failures.append(f"p-value {row.p_value}")
    print(f"  images: {row.images}; audit p-value {row.p_value:.3g} ({args.queries} queries)", flush=True)


def check_preset(name: str, model: Path, release: Path, key, work: Path, base, args) -> Row:
    """Fine-tune, reload, sample and audit one preset; an exception fails its row, not the whole check."""
    row, started = Row(name), time.perf_counter()
    print(f"\n== {name}", flush=True)
    try:
        run_finetune(name, model, release, work / name, base, args, row)
        run_audit(model, work / name, key, args, row)
    except Exception as error:  # noqa: BLE001  report every preset, then fail the run
        row.failures.append(failure(error))
    row.seconds = time.perf_counter() - started
    return row


def check_base(base, args) -> Row:
    """The random base model's float images: a NaN here is the weights' or fp16's, not a fine-tune's."""
    row, started = Row("base (no fine-tune)", px=data_resolution(args)), time.perf_counter()
    try:
        row.images, problems = check_images(base, HELD_OUT[:2], row.px, args)
        row.failures += problems
    except Exception as error:  # noqa: BLE001
        row.failures.append(failure(error))
    row.seconds = time.perf_counter() - started
    print(f"base model images: {row.images}", flush=True)
    return row


def failure(error: Exception) -> str:
    """Print the traceback (to fix it from one run's log) and return one line for the table."""
    traceback.print_exc()
    return f"{type(error).__name__}: {error}".splitlines()[0][:120]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the report


def number(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def summary_table(rows: list[Row]) -> str:
    header = ["preset", "px", "precision", "batch x accum", "s/step", "peak GPU GiB", "loss first -> last", "images",
              "p-value", "seconds", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.name, "-" if r.px is None else str(r.px), r.precision, r.batch, number(r.s_per_step, ".3f"),
                 number(r.peak_gb, ".2f"), r.loss,
                 r.images, number(r.p_value, ".3g"), number(r.seconds, ".0f"),
                 "ok" if r.ok else "FAILED: " + "; ".join(r.failures)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def describe(args) -> str:
    where = torch.cuda.get_device_name(torch.device(args.device)) if on_cuda(args.device) else \
        f"CPU ({torch.get_num_threads()} threads)"
    return (f"torch {torch.__version__} on {where}; SD 1.5 architecture ({args.width}, random weights) at "
            f"{f'{args.resolution} px' if args.resolution else 'each preset at its own size'}, {args.steps} steps per "
            f"preset, step time after the first "
            f"{warmup_steps(args.warmup, args.steps)} steps")


# ----------------------------------------------------------------------------- main


def prepare(work: Path, args):
    """(model folder, base pipeline on the device, owner key): the model built and loaded, the drawn data
    protected; the release is ``work / "protected"``."""
    started = time.perf_counter()
    model = sd_architecture.build_sd15(work / "sd15", args.width, seed=0)
    base = models.load_pipeline(model, device=args.device)
    print(f"built and loaded the model in {time.perf_counter() - started:.0f} s ({base.unet.dtype} on {base.device})")
    owner = drawn_dataset(work / "owner", args.images, data_resolution(args))
    report = protect.protect(owner, TEMPLATE, work / "protected", work / "key", count=args.templated, seed=0,
                             tokenizer=base.tokenizer)
    print(f"protected {report.n_altered} of {report.n_images} drawn images with {report.template!r}, trigger "
          f"{report.trigger!r}", flush=True)
    return model, base, keys.load_key(work / "key", release=work / "protected")


def main(argv: list[str] | None = None) -> int:
    """Run every check and print the table; 0 when everything passed, 1 otherwise."""
    args = parse_args(argv)
    if on_cuda(args.device) and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --device cpu for a smoke test of the same path")
    from entruth_lite.teaching.notebooks import quiet_libraries

    quiet_libraries()
    print(describe(args), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        model, base, key = prepare(work, args)
        rows = [check_base(base, args)]
        for name in dict.fromkeys(args.preset or presets.gpu_presets()):  # once each, even if named twice
            rows.append(check_preset(name, model, work / "protected", key, work, base, args))
            free_memory()
    print(f"\n{describe(args)}; {time.perf_counter() - started:.0f} s in all\n")
    print(summary_table(rows))
    failed = [r.name for r in rows if not r.ok]
    print("\nGPU check " + (f"FAILED: {', '.join(failed)}" if failed else "passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
