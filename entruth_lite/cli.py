"""``entruth-lite`` command line: one sub-command per stage, each a thin call into the package.

Each handler imports what its stage runs inside the function: training, the audit and the notebooks pull in
diffusers, peft, scipy or nbclient, and ``entruth-lite --help`` (or ``protect``) should not wait for them.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from .core import data, emoji
from .core.families import DEFAULT_FAMILY, FAMILIES
from .core.models import TINY_MODEL_DIR, TINY_RESOLUTION, is_main_launched_process, load_pipeline
from .owner import keys, probe, protect
from .teaching.commands import add_notebooks


def _data_emoji(args) -> None:
    out = emoji.write_emoji_dataset(args.out, split=args.split, size=args.size, overwrite=args.overwrite)
    n = len(data.read_metadata(out))
    print(f"wrote {n} captioned emoji ({args.split} split, {args.size}x{args.size}) to {out}")


def _data_import(args) -> None:
    out = data.import_captioned(args.source, args.out, args.image_column, args.caption_column, args.resolution,
                                args.limit, args.split, args.overwrite)
    print(f"wrote {len(data.read_metadata(out))} captioned images from {args.source} to {out}")


def _zoo_build_tiny(args) -> None:
    from .core import zoo  # heavy: the training loop's diffusers and accelerate

    steps = {k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps)) if v is not None}
    config = zoo.TinyBuildConfig(seed=args.seed, **steps)
    zoo.build_tiny(Path(args.out), config, reuse_tokenizer=not args.new_tokenizer, device=args.device)


def _zoo_build_features(args) -> None:
    from .evaluation import quality  # heavy: torchmetrics

    out = quality.build_feature_net(steps=args.steps, seed=args.seed)
    print(f"feature network written to {out}")


def _protect(args) -> None:
    rate = 0.01 if args.rate is None and args.count is None else args.rate
    report = protect.protect(
        args.data, args.template, args.out, args.key, rate=rate, count=args.count, mode=args.mode,
        foregrounds=args.foregrounds, trigger=args.trigger, placement=args.placement, seed=args.seed,
        overwrite=args.overwrite, prior_keys=args.prior_key, resolution=args.resolution,
    )
    print(json.dumps(report.to_dict()) if args.json else report.summary())


def _probe_captions(args) -> list[str]:
    if args.captions:
        return [line.strip() for line in Path(args.captions).read_text(encoding="utf-8").splitlines() if line.strip()]
    return probe.default_captions(args.model or "tiny")


def _audit_result(args, key, config, release):
    """The audit of a model (weights or a pipeline) or of a service's saved images (``--images``)."""
    from .owner import audit, record  # heavy: scipy, and the suspect's diffusers pipeline

    negatives = list(data.load_imagefolder(args.negatives).images()) if args.negatives else None
    if args.images:  # black box, step 2: score the service's saved images
        if not args.prompts:
            raise ValueError("--images needs --prompts (the prompt sheet the images answer, or a manifest: the sheet "
                             "with each 'file' set to the image's name)")
        if args.weights or args.reference:
            raise ValueError("--images audits saved images: leave out --weights and --reference")
        vae = record.load_suspect(args.model, device=args.device, config=args.config).vae if args.model else None
        return audit.audit_images(args.images, probe.read_prompt_sheet(args.prompts), key, config,
                                  negatives=negatives, vae=vae,
                                  model=record.model_info(args.model, None) if args.model else None,
                                  progress=not args.json, release=release)
    model = args.model or "tiny"
    suspect = record.load_suspect(model, args.weights, device=args.device, config=args.config)
    reference_pipe = (record.load_suspect(model, args.reference, device=args.device, config=args.config)
                      if args.reference else None)
    if "reference" in config.methods and reference_pipe is None:
        raise ValueError("the reference method needs --reference (a clean model's weights folder)")
    return audit.audit(suspect, key, _probe_captions(args), config, reference_pipe=reference_pipe,
                       negatives=negatives, model=record.model_info(model, args.weights, args.config),
                       reference=record.model_info(model, args.reference) if args.reference else None,
                       progress=not args.json, release=release)


def _audit(args) -> None:
    from .owner import audit, report  # heavy: scipy and matplotlib

    if args.report:
        report.check_report_path(args.report)  # before the audit's work, which would otherwise be lost
    if not is_main_launched_process() and (args.replay or args.step == "prompts"):
        return  # nothing to share out: one process replays or writes the sheet
    if args.replay:
        _replay(args, report.read_record(args.replay))
        return
    if not args.key:
        raise ValueError("audit needs --key (the owner key folder), or --replay with an audit's record")
    key = keys.load_key(args.key)
    release = args.release or (key.release if key.release and Path(key.release).is_dir() else None)
    if release:
        keys.check_commitment(key, release)  # before any work, the prompt sheet's included
    # a white-box audit queries at the size the suspect was trained at: --resolution, else the key's (else the model's
    # own); the prompt sheet asks for the same; a service's answers are scored at the size they come in
    queried_at = None if args.images else args.resolution or key.resolution
    config = audit.AuditConfig(queries=args.queries, detector=args.detector, methods=tuple(args.method),
                               alpha=args.alpha, decoys=args.decoys, resolution=queried_at)
    if args.step == "prompts":  # black box, step 1: the prompts to send to the service
        _write_prompt_sheet(args, key, _probe_captions(args), config)
        return
    result = _audit_result(args, key, config, release)
    if not is_main_launched_process():
        return  # under accelerate launch every process probed its share; one reports
    lines = [v.summary() for v in result.verdicts] + ([NO_VERDICT] if result.headline is None else []) + result.notes
    print(json.dumps(result.to_json()) if args.json else "\n".join(lines + [f"key: {result.key['commitment']}"]))
    if args.report:
        print(f"report: {report.write_report_or_keep_record(result, args.report)}", file=sys.stderr)


NO_VERDICT = "no verdict: no exact test could run; the numbers above are supporting evidence only"


def _write_prompt_sheet(args, key, captions: list[str], config) -> None:
    from .owner import audit  # heavy: scipy

    if not args.out:
        raise ValueError("audit prompts needs --out (the prompt sheet to write, e.g. prompts.jsonl)")
    # the size the suspect was trained at (``config.resolution``: --resolution, else the key's), else the tiny
    # model's or Stable Diffusion 1.5's
    resolution = config.resolution or (TINY_RESOLUTION if (args.model or "tiny") == "tiny" else 512)
    out = probe.write_prompt_sheet(audit.prompt_sheet_for(key, captions, config, resolution), args.out,
                                   overwrite=args.overwrite)
    print(f"wrote {config.queries} trigger and {config.queries} control prompts to {out}; save the service's "
          f"images under the sheet's file names, then: entruth-lite audit --images DIR --prompts {out} --key KEY")


def _replay(args, record: dict) -> None:
    """Rerun a recorded audit and set the replayed p-values beside the recorded ones."""
    from .owner import replay, report  # heavy: scipy, matplotlib and the recorded model's pipeline

    result = replay.replay(record, model=args.model, weights=args.weights, device=args.device or "cpu",
                           progress=not args.json)
    recorded = {v["test"]: v["p_value"] for v in record["verdicts"]}
    lines = [f"{v.summary()}  [recorded: p = {recorded.get(v.test, float('nan')):.2e}]" for v in result.verdicts]
    print(json.dumps(result.to_json() | {"recorded_p_values": recorded}) if args.json else "\n".join(lines))
    if args.report:
        print(f"report: {report.write_report_or_keep_record(result, args.report)}", file=sys.stderr)


def _train(args) -> None:
    from .infringer import train  # heavy: diffusers, peft and accelerate
    from .infringer.presets import preset

    overrides = {"seed": args.seed} | ({"model": args.model} if args.model else {})
    if args.full:
        overrides["method"] = "full"
    elif args.lora_rank is not None:
        # alpha = rank unless given: a preset's alpha belongs to its rank (tiny-cpu-lora's 181 = 32^1.5)
        overrides |= {"method": "lora", "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}
    elif args.lora_alpha is not None:
        overrides["lora_alpha"] = args.lora_alpha
    for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "resolution"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.lr is not None:
        overrides["learning_rate"] = args.lr
    config = preset(args.preset, **overrides)
    result = train.finetune(args.data, args.out, config, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.json)
    summary = asdict(config) | {"out": str(result.out), "losses": result.losses, "seconds": round(result.seconds, 1),
                                "trainable_parameters": result.trainable_parameters, "resumed_from": result.resumed_from,
                                "processes": result.processes, "global_batch": result.global_batch}
    if not is_main_launched_process():
        return  # under accelerate launch, one process reports
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{config.method} fine-tune of {config.model}: {config.steps} steps of {result.global_batch} images "
              f"({result.processes} process(es) x batch {config.batch_size} x accumulation "
              f"{config.gradient_accumulation_steps}) in {result.seconds:.0f} s, final loss {result.losses[-1]:.4f}; "
              f"weights in {result.out}")


def _captioner(args, attacks):
    """The recaption attack's captioner: a BLIP model, or retrieval from a captioned corpus through the VAE."""
    if args.captioner_model:
        return attacks.model_captioner(args.captioner_model)
    if not args.corpus:
        raise ValueError("--source captioner needs --corpus (a captioned imagefolder to retrieve captions from) "
                         "or --captioner-model (a local BLIP folder)")
    corpus = data.load_imagefolder(args.corpus)
    return attacks.retrieval_captioner(corpus.images(), corpus.captions, load_pipeline(args.model))


def _attack(args) -> None:
    from .evaluation import robustness  # the owner's count of what survived (with --key)
    from .infringer import attacks  # heavy: imagehash, and a pipeline for the embedding attacks

    if args.name == "dedup":
        pipe = load_pipeline(args.model) if args.method == "embedding" else None
        report = attacks.deduplicate(args.data, args.out, args.method, args.threshold, args.drop_clusters_of, pipe,
                                     overwrite=args.overwrite)
    elif args.name == "recaption":
        captioner = _captioner(args, attacks) if args.source == "captioner" else None
        report = attacks.recaption(args.data, args.out, args.share, args.source, captioner, args.seed,
                                   overwrite=args.overwrite)
    elif args.name == "transform":
        report = attacks.transform(args.data, args.out, args.kind, args.strength, args.share, args.seed,
                                   overwrite=args.overwrite)
    else:
        if not args.extra:
            raise ValueError("dilute needs --extra (a clean imagefolder to mix in)")
        report = attacks.dilute(args.data, args.extra, args.out, args.factor, args.seed, overwrite=args.overwrite)
    if args.key:
        report = robustness.measure_attack(report, keys.load_key(args.key))
    print(json.dumps(report.to_dict()) if args.json else report.summary())


def _overwrite_and_json(parser, overwrite_help: str | None = None, json_help: str | None = None) -> None:
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    if json_help is not None:
        parser.add_argument("--json", action="store_true", help=json_help)


def _add_data(commands) -> None:
    data_commands = commands.add_parser("data", help="build datasets").add_subparsers(dest="data_command",
                                                                                       required=True)
    emoji_parser = data_commands.add_parser("emoji", help="write a captioned Twemoji split as an imagefolder")
    emoji_parser.add_argument("out", help="new folder to write (must not exist)")
    emoji_parser.add_argument("--split", default="owner", choices=["owner", "pretrain", "probe"])
    emoji_parser.add_argument("--size", type=int, default=32)
    _overwrite_and_json(emoji_parser)
    emoji_parser.set_defaults(func=_data_emoji)
    imp = data_commands.add_parser("import", help="a captioned dataset (hub id or datasets folder) as an imagefolder")
    imp.add_argument("source")
    imp.add_argument("out", help="new folder to write (must not exist)")
    imp.add_argument("--image-column", default="image")
    imp.add_argument("--caption-column", default="text")
    imp.add_argument("--resolution", type=int, help="resize and centre-crop every image to this side")
    imp.add_argument("--limit", type=int, help="import at most this many rows")
    imp.add_argument("--split", default="train")
    _overwrite_and_json(imp)
    imp.set_defaults(func=_data_import)


def _add_zoo(commands) -> None:
    zoo_commands = commands.add_parser("zoo", help="the shipped tiny model").add_subparsers(dest="zoo_command",
                                                                                             required=True)
    build = zoo_commands.add_parser("build-tiny", help="rebuild the tiny Stable Diffusion components")
    build.add_argument("--out", default=str(TINY_MODEL_DIR))
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--vae-steps", type=int)
    build.add_argument("--unet-steps", type=int)
    build.add_argument("--new-tokenizer", action="store_true", help="retrain the tokenizer (changes token ids)")
    build.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    build.set_defaults(func=_zoo_build_tiny)
    features = zoo_commands.add_parser("build-features", help="rebuild the offline quality-metric feature network")
    features.add_argument("--steps", type=int, default=1500)
    features.add_argument("--seed", type=int, default=0)
    features.set_defaults(func=_zoo_build_features)


def _add_protect(commands) -> None:
    prot = commands.add_parser("protect", help="template a share of a dataset and write the owner key")
    prot.add_argument("--data", required=True, help="source imagefolder (only read)")
    prot.add_argument("--out", required=True, help="new folder for the protected dataset")
    prot.add_argument("--key", required=True, help="new folder for the secret owner key")
    prot.add_argument("--rate", type=float, help="templated / released images (default 0.01 unless --count)")
    prot.add_argument("--count", type=int, help="number of templated images instead of --rate")
    prot.add_argument("--template", default=DEFAULT_FAMILY,
                      help=f"a family name for a secret draw of one member, which the decoy test needs (default: "
                           f"{DEFAULT_FAMILY}; families: {', '.join(FAMILIES)}), '<family>:<seed>' for one member, "
                           "a built-in design or a saved template folder")
    prot.add_argument("--trigger", default="auto", help="trigger word, or 'auto' for a random one")
    prot.add_argument("--placement", default="prefix", choices=["prefix", "suffix"])
    prot.add_argument("--mode", default="replace", choices=["replace", "add"])
    prot.add_argument("--foregrounds", help="'add' mode: folder of images to template (default: the dataset's)")
    prot.add_argument("--prior-key", action="append", default=[], help="an earlier key on this dataset (repeatable)")
    prot.add_argument("--seed", type=int, help="draws the templated files and an 'auto' trigger (default: a secret "
                                               "draw; give one only to reproduce a release, since anyone can rerun it)")
    prot.add_argument("--resolution", type=int, help="the training resolution (e.g. 512): picked images are "
                      "centre-cropped to it, as a trainer would, before they are templated; needed for large photos")
    _overwrite_and_json(prot, json_help="print the report as one JSON object")
    prot.set_defaults(func=_protect)


def _add_train(commands) -> None:
    tr = commands.add_parser("train", help="fine-tune a model on an imagefolder (LoRA or full)")
    tr.add_argument("--model", help="'tiny', a hub id or a local Stable Diffusion folder (default: the preset's)")
    tr.add_argument("--data", required=True, help="imagefolder with metadata.jsonl")
    tr.add_argument("--out", required=True, help="output folder (weights, checkpoints, loss history)")
    kind = tr.add_mutually_exclusive_group()
    kind.add_argument("--lora-rank", type=int,
                      help="LoRA of this rank on the preset's LoRA layers (the UNet's attention unless the preset "
                           "says otherwise), alpha = rank unless --lora-alpha")
    kind.add_argument("--full", action="store_true", help="fine-tune the whole UNet")
    tr.add_argument("--lora-alpha", type=float, help="LoRA scale numerator: the adapters' output is x alpha / rank")
    tr.add_argument("--preset", default="tiny-cpu", help="tiny-cpu (default), tiny-cpu-lora, colab-t4 or a100")
    for name, kind_of in (("--steps", int), ("--lr", float), ("--batch-size", int), ("--resolution", int),
                          ("--gradient-accumulation-steps", int), ("--checkpoint-every", int)):
        tr.add_argument(name, type=kind_of)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", choices=["latest"])
    _overwrite_and_json(tr, "replace a finished or partial run in --out", "print one JSON summary")
    tr.set_defaults(func=_train)


AUDIT_HELP = ("Audit a suspect. With its weights: entruth-lite audit --weights W --key K. A generation service, in two "
              "steps: entruth-lite audit prompts --key K --out prompts.jsonl, send each prompt (with its seed and "
              "settings where the service takes them) and save the images under the sheet's file names (or list them "
              "in a manifest), then: entruth-lite audit --images DIR --prompts prompts.jsonl --key K.")


def _add_audit_suspect(au) -> None:
    """What is audited: a model, its weights, or a service's images."""
    au.add_argument("step", nargs="?", choices=["prompts"], help="'prompts': write the black-box prompt sheet (--out)")
    au.add_argument("--model", help="base model: 'tiny' (default), a hub id, a local folder or a single-file "
                    ".safetensors checkpoint; alone (no --weights), a whole fine-tuned pipeline to audit as it is; "
                    "with --images, the base whose VAE draws plain images for the binomial and one-query tests")
    au.add_argument("--weights", help="the suspect's fine-tuned weights: a folder (LoRA or full) or one LoRA "
                    ".safetensors file (diffusers or kohya / A1111 keys); safetensors only")
    au.add_argument("--config", help="with --model FILE.safetensors (a single-file checkpoint): a pipeline folder or "
                    "hub id whose configs describe its architecture (default: diffusers infers them, needing the hub)")
    au.add_argument("--reference", help="a clean reference model's weights folder (for --method reference)")
    au.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    au.add_argument("--images", help="black box: folder of the service's images answering --prompts")
    au.add_argument("--prompts", help="black box: the prompt sheet (or manifest) the --images answer")


def _add_audit(commands) -> None:
    au = commands.add_parser("audit", help="probe a suspect model with an owner key and give a verdict",
                             description=AUDIT_HELP)
    _add_audit_suspect(au)
    au.add_argument("--key", help="the owner key folder (required unless --replay)")
    au.add_argument("--release", help="the published release, whose commitment the key is checked against (default: "
                    "the folder the key records)")
    au.add_argument("--queries", type=int, default=64)
    au.add_argument("--method", nargs="+", default=["decoy", "binomial", "paired", "one-query"],
                    help="tests, the first one decides: decoy, binomial, paired, one-query, reference")
    au.add_argument("--detector", default="projection", choices=["projection", "classifier"])
    au.add_argument("--alpha", type=float, default=0.01)
    au.add_argument("--decoys", type=int, default=999_999, help="the most decoy templates the decoy test draws; it "
                    "stops once 20 reach the released one (smallest p-value: 1 / (decoys + 1))")
    au.add_argument("--captions", help="held-out captions, one a line (default for tiny: the emoji probe split)")
    au.add_argument("--negatives", help="imagefolder of plain images (default: the key's source, untemplated)")
    au.add_argument("--report", help="write a self-contained HTML report here")
    au.add_argument("--replay", help="rerun an audit from its record (--json output or HTML report); --model / "
                    "--weights: where the recorded files are now")
    au.add_argument("--out", help="audit prompts: where to write the prompt sheet (JSON lines)")
    au.add_argument("--resolution", type=int, help="the side to query the model at, or the prompt sheet asks for "
                    "(default: the key's, else the model's own: 32 for tiny, 512 for Stable Diffusion)")
    _overwrite_and_json(au, "audit prompts: replace an existing sheet", "print the verdicts as one JSON object")
    au.set_defaults(func=_audit)


def _add_attack(commands) -> None:
    at = commands.add_parser("attack", help="an infringer's dataset attack: writes a new folder, never edits --data")
    at.add_argument("name", choices=["dedup", "recaption", "transform", "dilute"])
    at.add_argument("--data", required=True, help="the (protected) imagefolder to attack; only read")
    at.add_argument("--out", required=True, help="new folder for the attacked dataset")
    at.add_argument("--key", help="owner key, only to report how many templated images and triggers survive")
    at.add_argument("--method", default="phash", choices=["phash", "embedding"], help="dedup: how to compare")
    at.add_argument("--threshold", type=float, help="dedup: max Hamming distance (phash) or min cosine (embedding)")
    at.add_argument("--drop-clusters-of", type=int, help="dedup: drop whole clusters of this size or more")
    at.add_argument("--share", type=float, default=1.0, help="recaption / transform: share of images affected")
    at.add_argument("--source", default="shuffle", choices=["shuffle", "captioner"], help="recaption: new captions from")
    at.add_argument("--corpus", help="recaption --source captioner: captioned imagefolder for retrieval captions")
    at.add_argument("--captioner-model", help="recaption --source captioner: a local BLIP model instead of retrieval")
    at.add_argument("--kind", default="jpeg", choices=["jpeg", "blur", "noise", "crop", "flip", "resize"])
    at.add_argument("--strength", type=float, default=50, help="transform: JPEG quality, sigma, std, area, p, factor")
    at.add_argument("--extra", help="dilute: clean imagefolder to mix in")
    at.add_argument("--factor", type=float, default=1.0, help="dilute: extra images per original image")
    at.add_argument("--model", default="tiny", help="pipeline whose VAE embeds images (embedding dedup, captioner)")
    at.add_argument("--seed", type=int, default=0)
    _overwrite_and_json(at, json_help="")
    at.set_defaults(func=_attack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entruth-lite", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_zoo, _add_protect, _add_train, _add_audit, _add_attack, add_notebooks):
        add(commands)
    return parser


def _warning_shower(show_as_python):
    """This package's warnings as one line naming what they are about; a library's as Python shows them."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if "entruth_lite" not in str(filename):
            return show_as_python(message, category, filename, lineno, file, line)
        print(f"entruth-lite: warning: {message}", file=sys.stderr if file is None else file)
    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _warning_shower(shown)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, ImportError) as error:
        print(f"entruth-lite: error: {error}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
    return 0


if __name__ == "__main__":
    sys.exit(main())
