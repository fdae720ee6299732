"""``aimv2-zeroshot``: zero-shot classification of a folder of images with an AIMv2 LiT checkpoint (:mod:`aimv2.lit`).

``aimv2-zeroshot --model FOLDER --data FOLDER`` reads the model (transformers' ``Aimv2Model`` layout or Apple's)
and its CLIP tokenizer files (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``) from ``--model``, builds one
text embedding per class with CLIP's protocol (each template filled with the class name, encoded, L2-normalised,
averaged over the templates, normalised again) and reports the top-1 (and top-5, with at least 5 classes)
accuracy of ``argmax(image . class)`` over the images of ``--data`` (``root/<class>/**/<image>``, the classes
being the sorted subfolder names; see :class:`aimv2.data.ClassFolder`).

Images are preprocessed as the released checkpoints are (:class:`aimv2.processor.AIMv2ImageProcessor`: the
model folder's ``preprocessor_config.json`` when there is one, else the ``"released"`` preset at the model's
image size: shorter side to the size, bicubic, centre crop, OpenAI CLIP mean / std). Images that cannot be
decoded are skipped and counted. Exit statuses follow :mod:`aimv2.cli`: 2 for a usage error, 1 for an
operational one (unreadable weights or tokenizer files, every image unreadable, an unwritable ``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from .cli import (
    OperationalError,
    Parser,
    UsageError,
    check_backend,
    check_output_file,
    one_line,
    resolve_device,
    run_main,
    write_json,
)
from .data.loader import list_batches

PROG = "aimv2-zeroshot"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_LIST_FILE_BYTES = 16 << 20


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``aimv2-zeroshot`` (errors are one line, exit status 2)."""
    p = Parser(prog=PROG, description="Zero-shot classification with an AIMv2 LiT checkpoint (CLIP's protocol: "
                                      "class embeddings averaged over prompt templates).")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="LiT checkpoint folder (config.json + model.safetensors, transformers' Aimv2Model or "
                        "Apple's layout) with its tokenizer files, or a hub id (apple/aimv2-large-patch14-224-lit)")
    p.add_argument("--data", required=True, metavar="FOLDER", help="a folder of class subfolders of images")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", metavar="A,B,C", default=None,
                       help="comma-separated class names for the prompts, one per subfolder in sorted order "
                            "(default: the subfolder names, underscores as spaces)")
    names.add_argument("--classes-file", metavar="FILE", default=None, help="class names, one per line")
    temps = p.add_mutually_exclusive_group()
    temps.add_argument("--templates", nargs="+", metavar="TEMPLATE", default=None,
                       help="prompt templates with {} for the class name (default: 'a photo of a {}.')")
    temps.add_argument("--templates-file", metavar="FILE", default=None, help="templates, one per line")
    p.add_argument("--tokenizer", metavar="FOLDER", default=None,
                   help="folder of the tokenizer files (default: --model, or the folder of a --model file)")
    p.add_argument("--cleaning", choices=("clip", "transformers"), default="clip",
                   help="text cleaning: OpenAI CLIP's (ftfy when installed, HTML unescaping; default) or "
                        "transformers' CLIPTokenizer's (NFC only)")
    p.add_argument("--batch-size", type=int, default=32, help="images (and prompts) per forward (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default: min(8, CPUs) on CUDA, 0 on the CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute dtype (autocast; weights stay fp32; default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--backend", default="auto", help="op backend of the towers (default auto)")
    p.add_argument("--out", metavar="FILE", default=None, help="write the results as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _read_lines(path: str, flag: str) -> list[str]:
    """Non-empty stripped lines of a small UTF-8 text file; a missing file is a usage error."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        if file.stat().st_size > MAX_LIST_FILE_BYTES:
            raise UsageError(f"{flag} {path}: larger than {MAX_LIST_FILE_BYTES >> 20} MiB")
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OperationalError(f"{flag} {path}: cannot be read: {one_line(exc)}") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line]


def _check_templates(templates: list[str], flag: str) -> list[str]:
    if not templates:
        raise UsageError(f"{flag}: no templates given")
    for t in templates:
        if "{}" not in t:
            raise UsageError(f"{flag}: template {t!r} has no {{}} for the class name")
    return templates


def fill_template(template: str, name: str) -> str:
    """``template`` with every ``{}`` replaced by ``name`` (a plain replacement: other braces stay as they are)."""
    return template.replace("{}", name)


def class_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenize: Callable[[list[str]], torch.Tensor],
                     names: Sequence[str], templates: Sequence[str], *, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """CLIP's zero-shot classifier: ``(C, P)`` unit rows, row ``c`` the normalised mean over ``templates`` of the
    normalised text embeddings of ``fill_template(t, names[c])``.

    ``encode_text(ids) -> (B, P)`` (e.g. ``AIMv2LiT.encode_text``), ``tokenize(texts) -> ids (B, L)``."""
    texts = [fill_template(t, n) for n in names for t in templates]
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids = tokenize(texts[start: start + batch_size]).to(device)
            emb = encode_text(ids).float()
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        per_prompt = torch.cat(out).view(len(names), len(templates), -1)
        mean = per_prompt.mean(dim=1)
        return mean / mean.norm(dim=-1, keepdim=True)


def main(argv: list[str] | None = None) -> int:
    """``aimv2-zeroshot``: exit status 0; 2 after a usage error, 1 after an operational error (see aimv2.cli)."""
    parser = build_parser()
    try:  # argparse's errors (and --help) exit through SystemExit: returned as the status here
        args = parser.parse_args(argv)
        if args.batch_size < 1:
            parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.workers is not None and args.workers < 0:
            parser.error(f"--workers must be >= 0, got {args.workers}")
        from aimv2_kernels import BACKENDS
        if args.backend not in BACKENDS:
            parser.error(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return run_main(PROG, _run, args)


class _Images(torch.utils.data.Dataset):
    """``(label, pixels (1, 3, H, W) or None, key)`` of each image of a ClassFolder; None for an unreadable one
    (``aimv2.data.BadSample``). Picklable, for DataLoader workers."""

    def __init__(self, folder: object, processor: object):
        self.folder, self.processor = folder, processor

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        from .data import BadSample

        try:
            return self.folder.label_of(index), self.processor(self.folder.raw(index).image), self.folder.key(index)
        except BadSample:
            return -1, None, self.folder.key(index)



def _open_folder(path: str):  # -> ClassFolder
    from .data import ClassFolder

    if not Path(path).exists():
        raise UsageError(f"--data {path}: no such file or directory")
    if not Path(path).is_dir():
        raise UsageError(f"--data {path}: not a folder of class subfolders")
    try:
        return ClassFolder(path)
    except ValueError as exc:  # documented: no class subfolders, or no images in them
        raise UsageError(f"--data {path}: {one_line(exc)}") from None
    except OSError as exc:
        raise OperationalError(f"--data {path}: {one_line(exc)}") from None


def _class_names(args: argparse.Namespace, folder_classes: list[str]) -> list[str]:
    if args.classes is not None:
        names = [n.strip() for n in args.classes.split(",")]
        flag = "--classes"
    elif args.classes_file is not None:
        names = _read_lines(args.classes_file, "--classes-file")
        flag = "--classes-file"
    else:
        return [c.replace("_", " ") for c in folder_classes]
    if any(not n for n in names):
        raise UsageError(f"{flag}: empty class name in {names}")
    if len(names) != len(folder_classes):
        raise UsageError(f"{flag}: {len(names)} names for the {len(folder_classes)} class subfolders of --data "
                         f"({', '.join(folder_classes[:6])}{', ...' if len(folder_classes) > 6 else ''}); give "
                         f"one name per subfolder, in sorted subfolder order")
    return names


def _resolve_model(path: str) -> str:
    """``--model``: a local path as it is, a hub id (``owner/name[@revision]``) as its snapshot folder in
    huggingface_hub's cache (fetched when needed and allowed: weights, config, preprocessor and tokenizer files)."""
    if Path(path).exists():
        return path
    from .hub import HubError, HubNotFoundError, is_hub_id, resolve

    if not is_hub_id(path):
        raise UsageError(f"--model {path}: no such file or directory")
    try:
        return str(resolve(path))
    except HubNotFoundError as exc:  # no such repo or revision: the flag names nothing
        raise UsageError(f"--model {path}: {one_line(exc)}") from None
    except (HubError, OSError, ImportError) as exc:  # offline and not cached, gated, huggingface_hub missing
        raise OperationalError(f"--model {path}: {one_line(exc)}") from None


def _load_model(path: str, backend: str):  # -> AIMv2LiT
    from .layouts import WeightsError
    from .lit import AIMv2LiT

    try:
        return AIMv2LiT.from_pretrained(path, backend=backend)
    except (WeightsError, OSError) as exc:  # unreadable, incomplete or not-fitting files
        raise OperationalError(f"--model {path}: {one_line(exc)}") from None


def _load_tokenizer(args: argparse.Namespace, model_path: str, context_length: int,
                    vocab_size: int):  # -> CLIPTokenizer
    from .clip_tokenizer import CLIPTokenizer, TokenizerFilesError

    folder = args.tokenizer
    if folder is None:
        folder = model_path if Path(model_path).is_dir() else str(Path(model_path).parent)
    elif not Path(folder).is_dir():
        raise UsageError(f"--tokenizer {folder}: not a folder")
    try:
        tok = CLIPTokenizer.from_pretrained(folder, context_length=context_length, cleaning=args.cleaning)
    except FileNotFoundError as exc:
        raise OperationalError(f"tokenizer: {one_line(exc)} (give its folder with --tokenizer)") from None
    except (TokenizerFilesError, OSError) as exc:
        raise OperationalError(f"tokenizer in {folder}: {one_line(exc)}") from None
    if tok.vocab_size > vocab_size:
        raise OperationalError(f"tokenizer in {folder} has ids up to {tok.vocab_size - 1}, but the model's text "
                               f"vocabulary has {vocab_size}: they do not belong together")
    return tok


def _load_processor(model_path: str, image_size: int, patch_size: int):  # -> AIMv2ImageProcessor
    from .processor import AIMv2ImageProcessor

    folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    if (folder / "preprocessor_config.json").is_file():
        try:
            return AIMv2ImageProcessor.from_pretrained(folder)
        except (ValueError, TypeError, OSError) as exc:
            raise OperationalError(f"--model {model_path}: preprocessor_config.json: {one_line(exc)}") from None
    return AIMv2ImageProcessor.from_preset("released", image_size, patch_size=patch_size)


def _run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_backend(args.backend, device, ("prefix_attention",))
    if args.out:
        check_output_file(args.out)
    templates = (_check_templates(_read_lines(args.templates_file, "--templates-file"), "--templates-file")
                 if args.templates_file is not None else
                 _check_templates(list(args.templates or DEFAULT_TEMPLATES), "--templates"))
    folder = _open_folder(args.data)
    names = _class_names(args, list(folder.classes))
    model_path = _resolve_model(args.model)
    model = _load_model(model_path, args.backend)
    cfg = model.cfg
    tok = _load_tokenizer(args, model_path, cfg.text.context_length, cfg.text.vocab_size)
    processor = _load_processor(model_path, cfg.vision.image_size, cfg.vision.patch_size)
    model = model.to(device).eval()

    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1)
                                                             if device.type == "cuda" else 0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    t0 = time.perf_counter()
    with autocast:
        weights = class_embeddings(model.encode_text, lambda texts: tok(texts, pad_to="longest"), names, templates,
                                   batch_size=args.batch_size, device=device)
    text_s = time.perf_counter() - t0
    num_classes = len(names)
    k5 = min(5, num_classes)
    correct1 = correct5 = seen = skipped = 0
    per_class = torch.zeros(num_classes, 2, dtype=torch.int64)  # (correct top-1, images)
    skipped_keys: list[str] = []

    from ._extras import require
    tqdm = require("tqdm.auto", "aimv2-zeroshot's progress bar").tqdm

    t0 = time.perf_counter()
    n = len(folder)
    bar = tqdm(total=n, desc="images", unit=" img", disable=None if args.progress else True, file=sys.stderr)
    scale = float(model.logit_scale.detach())
    try:
        for batch in list_batches(_Images(folder, processor), args.batch_size, workers):
            bar.update(len(batch))
            for _, px, key in batch:
                if px is None:
                    skipped += 1
                    if len(skipped_keys) < 20:
                        skipped_keys.append(key)
            good = [(label, px) for label, px, _ in batch if px is not None]
            if not good:
                continue
            with torch.inference_mode(), autocast:
                img = model.encode_image(torch.cat([px for _, px in good]).to(device)).float()
            img = img / img.norm(dim=-1, keepdim=True)
            logits = scale * img @ weights.t()
            target = torch.tensor([label for label, _ in good], device=logits.device)
            top = logits.topk(k5, dim=1).indices
            hit1 = top[:, 0] == target
            correct1 += int(hit1.sum())
            correct5 += int((top == target[:, None]).any(dim=1).sum())
            seen += len(good)
            hits = hit1.cpu().long()
            per_class.index_add_(0, target.cpu(), torch.stack([hits, torch.ones_like(hits)], dim=1))
    finally:
        bar.close()
    image_s = time.perf_counter() - t0
    if seen == 0:
        raise OperationalError(f"--data {args.data}: none of its {n} images could be read ({skipped} unreadable)")

    top1 = correct1 / seen
    top5 = correct5 / seen if num_classes >= 5 else None
    line = f"zero-shot top-1 {100 * top1:.2f}% ({correct1}/{seen})"
    if top5 is not None:
        line += f", top-5 {100 * top5:.2f}% ({correct5}/{seen})"
    line += f" on {seen} images, {num_classes} classes, {len(templates)} template{'s' * (len(templates) != 1)}"
    if skipped:
        line += f"; {skipped} unreadable image{'s' * (skipped != 1)} skipped"
    print(line)
    if args.out:
        report = {
            "model": str(args.model), "data": str(args.data), "num_images": seen, "skipped": skipped,
            "skipped_examples": skipped_keys, "num_classes": num_classes, "top1": top1, "top5": top5,
            "correct_top1": correct1, "correct_top5": correct5 if top5 is not None else None,
            "classes": list(folder.classes), "class_names": names, "templates": templates,
            "per_class_top1": {c: (int(a) / int(m) if int(m) else None) for c, (a, m) in
                               zip(folder.classes, per_class.tolist())},
            "logit_scale": scale, "image_size": cfg.vision.image_size, "cleaning": args.cleaning,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "workers": workers,
            "text_seconds": round(text_s, 3), "image_seconds": round(image_s, 3),
        }
        print(f"results: {write_json(args.out, report, allow_nan=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
