"""A short CUDA check of the one training code path (run it where a GPU is present; under 5 minutes).

    python -m benchmarks.cuda_check [--steps 50]

Fine-tunes a LoRA on the tiny pipeline with fp16 mixed precision (frozen weights in fp16, LoRA in fp32),
saves it, loads it into a fresh pipeline with diffusers' ``load_lora_weights``, samples, and prints the step
time and peak GPU memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from entruth_lite.core import data, emoji, models
from entruth_lite.infringer import presets, train
from entruth_lite.owner import probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        images, captions, names = emoji.emoji_dataset("owner", limit=256)
        dataset = data.save_imagefolder(images, captions, Path(tmp) / "owner", file_names=names)
        base = models.load_pipeline("tiny", device="cuda", dtype=torch.float16)
        config = presets.TrainConfig(method="lora", lora_rank=8, steps=args.steps, batch_size=args.batch_size,
                                   mixed_precision="fp16", gradient_checkpointing=True, learning_rate=1e-3)
        stamps = []
        torch.cuda.reset_peak_memory_stats()
        result = train.finetune(dataset, Path(tmp) / "lora", config, pipe=base, progress=False,
                                on_step=lambda step, loss: stamps.append(time.perf_counter()))
        per_step = (stamps[-1] - stamps[4]) / (len(stamps) - 5)
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"LoRA r8 fp16 mixed precision, batch {args.batch_size}: {per_step * 1000:.1f} ms/step, "
              f"peak GPU memory {peak:.0f} MB, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
        fresh = models.load_pipeline("tiny", device="cuda", dtype=torch.float16)
        models.load_finetuned(fresh, Path(tmp) / "lora")
        lora_dtypes = {p.dtype for n, p in fresh.unet.named_parameters() if "lora" in n}
        samples = probe.generate(fresh, captions[:8], num_inference_steps=10, progress=False)
        print(f"loaded the LoRA into a fresh fp16 pipeline (LoRA dtypes {lora_dtypes}); sampled "
              f"{len(samples)} images of {samples[0].size}")
        ok = all(torch.isfinite(torch.tensor(list(s.getdata()), dtype=torch.float)).all() for s in samples)
        print("CUDA check", "passed" if ok and result.losses[-1] == result.losses[-1] else "FAILED")


if __name__ == "__main__":
    main()
