"""Fine-tuning speed and peak memory of the tiny model (CPU; CUDA too when present).

    python -m benchmarks.train_speed [--steps 30] [--batch-size 32] [--side-by-side 300]

Prints one row per (device, method): steps/s, seconds/step and peak memory (CPU: peak RSS of a fresh process
per configuration; CUDA: torch.cuda.max_memory_allocated), with the settings used. ``--side-by-side N`` also
times the demo's two full fine-tunes of N steps on the CPU, one after the other in one process (all threads)
and side by side in two (``demo.finetune_side_by_side``), wall clock including loading.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from entruth_lite.core import data, emoji, models
from entruth_lite.infringer import presets, train
from entruth_lite.teaching import demo


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(dataset: Path, device: str, config: presets.TrainConfig) -> dict:
    base = models.load_pipeline("tiny", device="cpu")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []

    def on_step(step, loss):
        times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        train.finetune(dataset, Path(out) / "run", config, pipe=base, progress=False, on_step=on_step, device=device)
    per_step = (times[-1] - times[2]) / (len(times) - 3)  # skip warm-up steps
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return dict(device=device, method=config.method, rank=config.lora_rank if config.method == "lora" else "-",
                batch=config.batch_size, precision=config.mixed_precision, steps_per_s=1 / per_step,
                s_per_step=per_step, peak_mb=memory)


def side_by_side(dataset: Path, steps: int, batch_size: int) -> tuple[float, float]:
    """Wall-clock seconds of two full fine-tunes (the demo trains two: protected and clean): one after the other
    in this process, then side by side in two processes."""
    config = presets.preset("tiny-cpu", steps=steps, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        base = models.load_pipeline("tiny", device="cpu")
        for name in "ab":
            train.finetune(dataset, Path(tmp) / name, config, pipe=base, progress=False)
        one_after_the_other = time.perf_counter() - started
        started = time.perf_counter()
        demo.finetune_side_by_side([(dataset, Path(tmp) / "c"), (dataset, Path(tmp) / "d")], config, progress=False)
        return one_after_the_other, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--side-by-side", type=int, default=0, metavar="STEPS",
                        help="also time two full CPU fine-tunes of STEPS steps, sequential vs side by side")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="measure on this device (repeatable; default: cpu, and cuda when present)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        images, captions, names = emoji.emoji_dataset("owner", limit=256)
        dataset = data.save_imagefolder(images, captions, Path(tmp) / "owner", file_names=names)
        rows = []
        devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        for device in devices:
            for method, extra in [("lora", dict(lora_rank=8)), ("lora", dict(lora_rank=32, lora_targets=presets.LORA_UNET_WIDE_TARGETS)), ("full", {})]:
                precision = "fp16" if device == "cuda" and method == "lora" else "no"
                config = presets.TrainConfig(method=method, steps=args.steps, batch_size=args.batch_size,
                                           mixed_precision=precision, **extra)
                with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    rows.append(pool.submit(measure, dataset, device, config).result())  # fresh process: own peak
                r = rows[-1]
                print(f"{r['device']:5s} {r['method']:5s} rank {str(r['rank']):>3s} batch {r['batch']:3d} "
                      f"{r['precision']:4s} {r['steps_per_s']:7.2f} steps/s {r['s_per_step']:7.3f} s/step "
                      f"peak {r['peak_mb']:8.0f} MB", flush=True)
        if args.side_by_side:
            sequential, parallel = side_by_side(dataset, args.side_by_side, args.batch_size)
            print(f"two full fine-tunes of {args.side_by_side} steps, batch {args.batch_size}, on the CPU: one after "
                  f"the other {sequential:.0f} s, side by side {parallel:.0f} s", flush=True)


if __name__ == "__main__":
    main()
