"""``aimv2-probe``: the command line of the attentive probe (:mod:`aimv2.probe`, the library).

``aimv2-probe --checkpoint runs/demo --vs-random`` probes the frozen trunk of a training run next to a randomly
initialised one of the same shape; ``--pretrained FOLDER`` probes released weights, ``--random PRESET`` a random
trunk. ``--protocol features`` (the default) trains one probe on cached features; ``--protocol paper`` is the
AIMv2 paper's recipe (augmented images every epoch, a sweep of probes; :func:`aimv2.probe.run_paper_probes`).
See :func:`build_parser` for the flags and :mod:`aimv2.cli` for the exit statuses.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

from .cli import (
    OperationalError,
    Parser,
    check_backend,
    check_output_file,
    one_line,
    resolve_device,
    run_main,
    write_json,
)
from .data import NORMALIZATIONS
from .probe import (
    FolderImages,
    PaperProbeSettings,
    ProbeDataError,
    ProbeSettings,
    ProbeUsageError,
    heldout_shapes,
    random_encoder,
    run_paper_probes,
    run_probes,
)

PROG = "aimv2-probe"


def load_trunk(args: argparse.Namespace) -> tuple[nn.Module, str, object, str]:
    """The trunk the flags name: ``(encoder, description, config, normalize)``: config is an ``AIMv2Config``
    (checkpoint, random) or an ``EncoderConfig`` (pretrained); normalize the trunk's own pixel statistics (a
    checkpoint's training ``--normalize``, ``"clip"`` for released weights, ``"imagenet"`` for a random
    trunk). Raises ProbeUsageError (exit 2) or OperationalError (exit 1) naming the flag."""
    from .config import PRESETS

    if args.preset is not None and args.preset not in PRESETS:
        raise ProbeUsageError(f"--preset: unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    if args.checkpoint is not None:
        return _checkpoint_trunk(args.checkpoint, args.preset, args.backend)
    if args.pretrained is not None:
        return _pretrained_trunk(args.pretrained, args.preset, args.backend)
    if args.random not in PRESETS:
        raise ProbeUsageError(f"--random: unknown preset {args.random!r}; choose one of: {', '.join(sorted(PRESETS))}")
    if args.preset is not None and args.preset != args.random:
        raise ProbeUsageError(f"--random {args.random} and --preset {args.preset} name different presets")
    from .config import AIMv2Config

    enc = random_encoder(args.random, seed=args.seed, backend=args.backend)
    return enc, f"random {args.random} (seed {args.seed})", AIMv2Config.from_name(args.random), "imagenet"


def _checkpoint_trunk(path: str, preset: str | None, backend: str):
    from .checkpoint import CheckpointError, find_checkpoint, load_trained_encoder, read_state

    if not Path(path).exists():
        raise ProbeUsageError(f"--checkpoint {path}: no such file or directory")
    try:
        ckpt = find_checkpoint(Path(path))
        state = read_state(ckpt)
        saved = state.get("model_config") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise OperationalError(f"--checkpoint {path}: {ckpt} has no model config in its state.pt")
        if preset is not None and saved.get("name") != preset:  # the flags disagree: a usage error
            raise ProbeUsageError(f"--checkpoint {path}: checkpoint {ckpt} is from preset {saved.get('name')!r}, "
                                  f"not {preset!r}")
        enc, cfg = load_trained_encoder(ckpt, backend=backend, preset=preset)
    except CheckpointError as exc:  # missing, incomplete, corrupt or not fitting: an operational error
        raise OperationalError(f"--checkpoint {path}: {one_line(exc)}") from None
    train_config = state.get("train_config")
    normalize = train_config.get("normalize") if isinstance(train_config, dict) else None
    normalize = normalize if normalize in NORMALIZATIONS else "imagenet"
    return enc, f"checkpoint {path} ({cfg.name}, {ckpt.name})", cfg, normalize


def _pretrained_trunk(path: str, preset: str | None, backend: str):
    from .hub import HubNotFoundError, is_hub_id
    from .pretrained import ConfigMismatchError, WeightsError, is_training_run, load_pretrained_encoder

    if not Path(path).exists() and not is_hub_id(path):  # a hub id (owner/name[@rev]) resolves in the loader
        raise ProbeUsageError(f"--pretrained {path}: no such file or directory")
    if is_training_run(path):
        raise ProbeUsageError(f"--pretrained {path}: a training run (aimv2-train's checkpoints), not released "
                              f"weights; use --checkpoint {path}")
    try:  # config: weights of another shape than --preset are refused, every differing field named
        enc = load_pretrained_encoder(path, backend=backend, config=preset)
    except (ConfigMismatchError, HubNotFoundError) as exc:  # not of --preset's shape; no such hub repo/revision
        raise ProbeUsageError(f"--pretrained {path}: {one_line(exc)}") from None
    except (WeightsError, OSError, ImportError) as exc:  # unreadable or unfitting files, a hub repo not in the
        # cache offline (HubCacheMissError), a hub id without huggingface_hub (ImportError): exit status 1
        raise OperationalError(f"--pretrained {path}: {one_line(exc)}") from None
    return enc.eval(), f"pretrained {path}", enc.cfg, "clip"


def build_parser() -> argparse.ArgumentParser:
    d = ProbeSettings()
    p = Parser(prog=PROG,
                description="Frozen-trunk attentive probe (AIMv2's evaluation protocol): top-1 of the trunk's "
                            "last-layer features on labelled images.")
    trunk = p.add_mutually_exclusive_group(required=True)
    trunk.add_argument("--checkpoint", metavar="PATH", help="a training run folder or checkpoint (aimv2-train)")
    trunk.add_argument("--pretrained", metavar="PATH", help="released weights (folder with config.json + "
                                                            "model.safetensors)")
    trunk.add_argument("--random", metavar="PRESET", help="a randomly initialised trunk of PRESET (seeded by --seed)")
    p.add_argument("--preset", default=None, help="refuse a trunk of any other preset")
    p.add_argument("--vs-random", action="store_true",
                   help="also probe a randomly initialised trunk of the same shape (same data, settings and "
                        "seed) and print both")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="heldout",
                   help="'heldout' (default: the bundled ShapesDataset heldout split, label = kind of the first "
                        "shape) or a folder of class subfolders")
    g.add_argument("--test-data", metavar="FOLDER", default=None,
                   help="with a --data folder: a folder of class subfolders to report top-1 on (default: a "
                        "seeded stratified split of --data)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="test share of a --data folder (default 0.2)")
    g.add_argument("--train-size", type=int, default=2000,
                   help="heldout images to train the probe on (default %(default)s)")
    g.add_argument("--test-size", type=int, default=1000,
                   help="heldout images to report top-1 on (default %(default)s)")
    g.add_argument("--image-size", type=int, default=None, help="default: the trunk's")
    g.add_argument("--crop-pct", type=float, default=1.0, help="center-crop share of a folder image (default 1.0)")
    g.add_argument("--normalize", choices=tuple(NORMALIZATIONS), default=None,
                   help="pixel statistics (default: the trunk's own: a checkpoint's training --normalize, "
                        "imagenet by default; clip for --pretrained; imagenet for --random)")
    o = p.add_argument_group("probe training")
    o.add_argument("--protocol", choices=("features", "paper"), default="features",
                   help="features (default): the trunk's features are computed once and cached, no augmentation, "
                        "one probe (--lr, --wd): fast. paper: the AIMv2 paper's recipe (Table A2): the training "
                        "images are augmented anew every epoch (RandomResizedCrop 0.08-1 bicubic, flip, RandAugment "
                        "rand-m9-mstd0.5-inc1, ColorJitter 0.3), so the frozen trunk runs on every training image "
                        "every epoch (100 epochs cost about 100 feature extractions: expensive, a GPU job), and a "
                        "sweep of one probe per --lrs x --wds pair is trained, all fed by one trunk forward per "
                        "batch; prints every sweep point and the best by test top-1, which is how the paper "
                        "reports it and is optimistic (the test split picks the hyper-parameters)")
    pd = PaperProbeSettings()
    o.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs} (features) / {pd.epochs} (paper)")
    o.add_argument("--batch-size", type=int, default=None,
                   help=f"default {d.batch_size} (features) / {pd.batch_size} (paper, its ImageNet value; it uses "
                        f"512 for other datasets)")
    o.add_argument("--lr", type=float, default=None, help=f"peak learning rate (AdamW, betas 0.9/0.999; "
                                                          f"default {d.lr}; features only)")
    o.add_argument("--weight-decay", "--wd", type=float, default=None, help=f"default {d.weight_decay}; "
                                                                             f"features only")
    o.add_argument("--lrs", metavar="LR,LR,...", default=None,
                   help=f"paper: the peak learning rates of the sweep (default "
                        f"{','.join(f'{v:g}' for v in pd.lrs)})")
    o.add_argument("--wds", metavar="WD,WD,...", default=None,
                   help=f"paper: the weight decays of the sweep (default "
                        f"{','.join(f'{v:g}' for v in pd.weight_decays)})")
    o.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warm-up (default {d.warmup_epochs:g} (features) / {pd.warmup_epochs:g} (paper, of "
                        f"{pd.epochs} epochs; with another --epochs the same share of it)")
    o.add_argument("--min-lr", type=float, default=d.min_lr, help="end of the cosine (default %(default)s)")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="default %(default)s")
    o.add_argument("--seed", type=int, default=0,
                   help="probe init, batch order, folder split, random trunk (default %(default)s)")
    r = p.add_argument_group("running")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    r.add_argument("--backend", default="auto", help="op backend of the trunk")
    r.add_argument("--extract-batch-size", type=int, default=64,
                   help="images per trunk forward (default %(default)s; with --protocol paper also the chunks a "
                        "training batch goes through the trunk in)")
    r.add_argument("--workers", type=int, default=None,
                   help="paper: processes augmenting the training images (default 0: in the main process; the "
                        "augmentation takes a few ms per image on one core, so give several on a GPU machine; "
                        "results do not depend on it)")
    r.add_argument("--feature-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the cached features")
    r.add_argument("--out", metavar="FILE", default=None, help="write the results as JSON")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from aimv2_kernels import BACKENDS

    _resolve_protocol(p, args)
    for name in ("train_size", "test_size", "epochs", "batch_size", "extract_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "grad_clip"):
        if getattr(args, name) is not None and not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("weight_decay", "warmup_epochs", "min_lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.protocol == "paper":
        if args.min_lr > min(args.lrs):
            p.error(f"--min-lr {args.min_lr} exceeds the smallest of --lrs ({min(args.lrs):g})")
    elif args.min_lr > args.lr:
        p.error(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if not 0 < args.test_fraction < 1:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if not 0 < args.crop_pct <= 1:
        p.error(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.image_size is not None and args.image_size < 1:
        p.error(f"--image-size must be positive, got {args.image_size}")
    if args.backend not in BACKENDS:
        p.error(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.vs_random and args.random is not None:
        p.error("--vs-random: the trunk is already random (--random)")
    if args.test_data is not None and args.data == "heldout":
        p.error("--test-data needs --data FOLDER (the heldout data has its own test part: --test-size)")


def _parse_values(p: argparse.ArgumentParser, flag: str, text: str, positive: bool) -> tuple[float, ...]:
    """``--lrs`` / ``--wds``: comma-separated finite numbers, positive (or >= 0), no repeats; else a usage error."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        p.error(f"{flag}: expected comma-separated numbers, got {text!r}")
    if any(not math.isfinite(v) or v < 0 or (positive and v == 0) for v in values):
        p.error(f"{flag}: every value must be {'positive' if positive else '>= 0'}, got {text!r}")
    if len(set(values)) != len(values):
        p.error(f"{flag}: a value is repeated in {text!r}")
    return values


def _resolve_protocol(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags whose defaults depend on ``--protocol``, filled in; a flag of the other protocol is a usage
    error (``--lr``/``--wd`` with paper, which sweeps; ``--lrs``/``--wds``/``--workers`` with features)."""
    paper = args.protocol == "paper"
    if paper:
        for flag, name, instead in (("--lr", "lr", "--lrs"), ("--weight-decay", "weight_decay", "--wds")):
            if getattr(args, name) is not None:
                p.error(f"{flag}: --protocol paper sweeps it; give {instead} (comma-separated)")
        d = PaperProbeSettings()
        args.lrs = d.lrs if args.lrs is None else _parse_values(p, "--lrs", args.lrs, positive=True)
        args.wds = d.weight_decays if args.wds is None else _parse_values(p, "--wds", args.wds, positive=False)
        args.workers = 0 if args.workers is None else args.workers
        if args.workers < 0:
            p.error(f"--workers must be >= 0, got {args.workers}")
    else:
        for flag, name in (("--lrs", "lrs"), ("--wds", "wds"), ("--workers", "workers")):
            if getattr(args, name) is not None:
                p.error(f"{flag} needs --protocol paper")
        d = ProbeSettings()
        args.lr = d.lr if args.lr is None else args.lr
        args.weight_decay = d.weight_decay if args.weight_decay is None else args.weight_decay
    for name in ("epochs", "batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(d, name))
    if args.warmup_epochs is None:  # paper: 5 of 100 epochs, the same share of a shorter --epochs
        args.warmup_epochs = d.warmup_epochs * (args.epochs / d.epochs if paper else 1)


def _open_folder(path: str, flag: str):
    from .data import ClassFolder

    if not Path(path).exists():
        raise ProbeUsageError(f"{flag} {path}: no such file or directory")
    if not Path(path).is_dir():
        raise ProbeUsageError(f"{flag} {path}: not a folder (give 'heldout' or a folder of class subfolders)")
    try:
        folder = ClassFolder(path)
    except ValueError as exc:  # documented: no class subfolders, or no images in them
        raise ProbeUsageError(f"{flag} {path}: {one_line(exc)}") from None
    except OSError as exc:  # the folder exists but cannot be listed
        raise OperationalError(f"{flag} {path}: {one_line(exc)}") from None
    if len(folder) == 0:
        raise ProbeUsageError(f"{flag} {path}: no images found in class subfolders")
    return folder


def _build_data(args: argparse.Namespace, image_size: int):
    """``(train, test, num_classes, description)`` for the flags; test None means a split of train."""
    if args.data == "heldout":
        train, test = heldout_shapes(image_size, args.train_size, args.test_size)
        from .data import ShapesDataset
        return train, test, ShapesDataset.num_classes, f"heldout shapes {args.train_size}/{args.test_size}"
    folder = _open_folder(args.data, "--data")
    classes = list(folder.classes)
    if len(classes) < 2:
        raise ProbeUsageError(f"--data {args.data}: the probe needs at least 2 class subfolders, found {classes}")
    train = FolderImages(folder, image_size, crop_pct=args.crop_pct)
    if args.test_data is None:
        return train, None, len(classes), f"folder {args.data} ({len(classes)} classes, {args.test_fraction:g} test)"
    test_folder = _open_folder(args.test_data, "--test-data")
    try:
        test = FolderImages(test_folder, image_size, classes=classes, crop_pct=args.crop_pct)
    except ProbeUsageError as exc:
        raise ProbeUsageError(f"--test-data {args.test_data}: {exc}") from None
    return train, test, len(classes), f"folders {args.data} / {args.test_data} ({len(classes)} classes)"


def _summary(desc: str, r: dict) -> str:
    skipped = f", {r['skipped']} unreadable skipped" if r["skipped"] else ""
    return (f"{desc}: top-1 {100 * r['top1']:.1f}% on {r['num_test']} test images (probe trained on "
            f"{r['num_train']}, train top-1 {100 * r['train_top1']:.1f}%, majority class "
            f"{100 * r['majority_top1']:.1f}%; {r['num_classes']} classes, features {r['tokens']}x{r['dim']}; "
            f"extract {r['extract_s']:.1f} s, probe {r['train_s']:.1f} s{skipped})")


def main(argv: list[str] | None = None) -> int:
    """``aimv2-probe``: exit status 0; 2 after a usage error, 1 after an operational error (see aimv2.cli)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return run_main(PROG, _run, args)


def _run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_backend(args.backend, device, ("prefix_attention",))  # the trunk's only aimv2_kernels op
    if args.out:
        check_output_file(args.out)
    enc, desc, cfg, own_normalize = load_trunk(args)
    normalize = args.normalize or own_normalize
    enc_cfg = enc.cfg
    image_size = args.image_size or enc_cfg.image_size
    if image_size % enc_cfg.patch_size:
        raise ProbeUsageError(f"--image-size {image_size} is not a multiple of the patch size {enc_cfg.patch_size}")
    encoders = {"trunk": enc.to(device)}
    descs = {"trunk": desc}
    if args.vs_random:
        encoders["random"] = random_encoder(cfg, seed=args.seed, backend=args.backend).to(device)
        descs["random"] = f"random {getattr(cfg, 'name', 'trunk')} (seed {args.seed})"
    train, test, num_classes, data_desc = _build_data(args, image_size)
    if args.protocol == "paper":
        return _run_paper(args, encoders, descs, train, test, num_classes,
                          {"data": data_desc, "image_size": image_size, "normalize": normalize})
    settings = ProbeSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                             min_lr=args.min_lr, grad_clip=args.grad_clip)
    try:
        results = run_probes(encoders, train, test, num_classes=num_classes, test_fraction=args.test_fraction,
                             normalize=normalize, settings=settings, seed=args.seed,
                             extract_batch_size=args.extract_batch_size,
                             feature_dtype=getattr(torch, args.feature_dtype),
                             progress=None if args.progress else False)
    except ProbeDataError as exc:  # e.g. a folder whose images are all unreadable
        raise OperationalError(one_line(exc)) from None
    for name, r in results.items():
        print(_summary(descs[name], r))
    if args.vs_random:
        gap = 100 * (results["trunk"]["top1"] - results["random"]["top1"])
        print(f"trained - random: {gap:+.1f} points of top-1")
    if args.out:
        def clean(name: str) -> dict:
            r = {k: v for k, v in results[name].items() if k != "probe"}
            return {"trunk": descs[name], **r}
        report = {**clean("trunk"), "data": data_desc, "image_size": image_size, "normalize": normalize}
        if args.vs_random:
            report["baseline"] = clean("random")
        print(f"results: {write_json(args.out, report)}")
    return 0


def _paper_summary(desc: str, r: dict) -> list[str]:
    """The lines ``--protocol paper`` prints for one trunk: the best sweep point, then every point."""
    s, best = r["settings"], r["best"]
    skipped = f", {r['skipped']} unreadable skipped" if r["skipped"] else ""
    lines = [f"{desc}: best top-1 {100 * best['top1']:.1f}% (lr {best['lr']:g}, wd {best['weight_decay']:g}; the "
             f"best of {len(r['sweep'])} sweep points on the test split, as the paper reports: optimistic) on "
             f"{r['num_test']} test images (probes trained on {r['num_train']} augmented images, {s['epochs']} "
             f"epochs, {r['steps']} steps, {r['trunk_forwards']} trunk forwards shared by the sweep; majority "
             f"class {100 * r['majority_top1']:.1f}%; {r['num_classes']} classes, features {r['tokens']}x{r['dim']}; "
             f"test features {r['extract_s']:.1f} s, training {r['train_s']:.1f} s{skipped})"]
    for k, pt in enumerate(r["sweep"]):
        mark = " <- best" if k == best["index"] else ""
        loss = "n/a" if pt["final_loss"] is None else f"{pt['final_loss']:.3f}"
        lines.append(f"  lr {pt['lr']:<8g} wd {pt['weight_decay']:<5g} top-1 {100 * pt['top1']:5.1f}%  (last epoch: "
                     f"augmented train top-1 {100 * pt['train_top1_augmented']:.1f}%, loss {loss}){mark}")
    return lines


def _run_paper(args: argparse.Namespace, encoders: dict, descs: dict, train, test, num_classes: int,
               info: dict) -> int:
    """``--protocol paper``: the sweep on augmented images (:func:`aimv2.probe.run_paper_probes`), printed and
    written as JSON (every sweep point, the best)."""
    settings = PaperProbeSettings(epochs=args.epochs, batch_size=args.batch_size, lrs=tuple(args.lrs),
                                  weight_decays=tuple(args.wds), warmup_epochs=args.warmup_epochs,
                                  min_lr=args.min_lr, grad_clip=args.grad_clip)
    try:
        results = run_paper_probes(encoders, train, test, num_classes=num_classes,
                                   test_fraction=args.test_fraction, normalize=info["normalize"],
                                   settings=settings, seed=args.seed, image_size=info["image_size"],
                                   extract_batch_size=args.extract_batch_size,
                                   feature_dtype=getattr(torch, args.feature_dtype), workers=args.workers,
                                   progress=None if args.progress else False)
    except ProbeDataError as exc:
        raise OperationalError(one_line(exc)) from None
    for name, r in results.items():
        print("\n".join(_paper_summary(descs[name], r)))
    if args.vs_random:
        gap = 100 * (results["trunk"]["top1"] - results["random"]["top1"])
        print(f"trained - random (best of each sweep): {gap:+.1f} points of top-1")
    if args.out:
        def clean(name: str) -> dict:
            return {"trunk": descs[name], **{k: v for k, v in results[name].items() if k != "probes"}}
        report = {**clean("trunk"), **info}
        if args.vs_random:
            report["baseline"] = clean("random")
        print(f"results: {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
