"""Data-loading throughput per worker: decoded, augmented images per second on one CPU core, and how many DataLoader
workers one H200 needs to train AIMv2-L.

Usage::

    python bench/loader_throughput.py [--n 200] [--data DIR] [--repeats 5] [--batch-size 32]
        [--preset aimv2-large-patch14-224] [--peak-tflops 989] [--mfu 0.4] [--out DIR] [--quick] [--note TEXT]

The images. Without ``--data``, ``--n`` JPEGs (quality ``--quality``, 90; Pillow's default 4:2:0 chroma
subsampling) are generated into a temporary folder (removed at the end), each with a ``.txt`` caption, and read
through ``aimv2.data.open_source`` (an ``ImageFolderCaptions``), as ``aimv2-train --data DIR`` would. Their sizes
follow an approximation of ImageNet-1k's train set (:func:`image_sizes`; most images there are 500 px on the
long side, about 400x350 on average, a few are larger), drawn with ``--seed``:

- 70%: the long side is 500 and the short side 375 (4:3, 55% of these), 333 (3:2, 25%), 281 (16:9, 7%),
  400 (5:4, 8%) or 500 (square, 5%);
- 15%: smaller, the long side uniform in 300-499, aspect 4:3 or 3:2;
- 15%: larger, the long side log-uniform in 640-2560 (about half of them over 1000 px), aspect 4:3 or 3:2;

each landscape with probability 0.75, else portrait. The content is photograph-like (:func:`synthetic_photo`):
a smooth low-frequency colour field, 5-14 overlapping flat shapes (sharp edges), slightly blurred, a multi-scale
luminance texture whose strength varies across the image (busy and quiet regions) and sensor-like noise, so that
the JPEG entropy is realistic and not that of flat colour: about 3.5 bits per pixel at quality 90 for the
500 px images (ImageNet's JPEGs average about 4.5) and less for the large ones (their detail is drawn at a
coarser scale, as a camera's is). The bits per pixel of each size class are recorded. ``--data DIR``: the
first ``--n`` images (sorted paths, any format Pillow reads) under DIR, through a CSV source instead.

What is timed (all in one process with one torch thread, as a DataLoader worker runs: one process = one core;
rates are images per CPU-second of that process, ``time.process_time``, so that other jobs on a shared machine
slow the wall clock but not the count; the wall-clock rates are recorded too). Each sample draws its
randomness as the loader does, ``numpy.random.default_rng([seed, epoch, index])``, the prefix draw first.

- ``decode``: the encoded bytes (in memory) to a decoded RGB image. Before: ``decode_image(data, min_side)``
  with the loader's ``min_side`` for its ``TrainTransform`` (``aimv2.data.loader._train_min_side``: 410 px at
  224, so only a JPEG with a shorter side of 820+ px was decoded at reduced size), then the crop box drawn.
  After: ``open_image`` (the header), the crop box drawn from the full size, and ``LazyImage.decode`` at
  ``draft_reduction(crop, 224)``.
- ``full``: the per-sample path as a worker runs it, from the encoded bytes to a normalized image in the batch
  tensor: decode, ``TrainTransform`` (RandomResizedCrop scale (0.4, 1), bicubic, flip; 224), ``to_tensor``,
  collation and ``Normalize`` (ImageNet). Before: decode as above, the transform's output stacked into the batch
  (``torch.stack``), the batch normalized in place. After: ``open_image``, the transform on the ``LazyImage``
  writing into its row of the batch tensor (``out=``), normalized right there. ``copies only``: the before
  decode (``min_side``) and transform, written into the batch tensor and normalized there (the copy changes
  alone, bit-identical to before).
- ``worker``: a real ``torch.utils.data.DataLoader`` with one worker process building whole batches of
  ``--batch-size`` from the loader's plans, exactly as ``TrainLoader`` runs it (file reads, captions, the
  tokenizer, the batch sent to the main process through shared memory), over about two epochs of the images.
  After: ``aimv2.data.loader._BatchBuilder``. Before: :class:`LegacyBuilder`, the builder as it was before the
  reduced-size decode and the in-place batch (its batches are checked to equal the current builder's with the
  draft off, bit for bit). The rate is the worker process's CPU time between its first and last batch (the
  pickling of a batch, which copied it into shared memory before, included).

Each is a median over ``--repeats`` passes over all the images (before and after interleaved in each round).

The ``draft`` section compares the reduced-size decode with the full decode on the same images and the same
random draws: the crop boxes and the generator's state after the transform must be identical (checked), the
outputs differ by the DCT-domain downscale: mean absolute difference (``[0, 1]`` pixel units, before
normalization) over all samples and over the drafted ones, its 99th percentile and maximum, and how many
samples decoded at each reduction; the same for ``EvalTransform``.

The H200 estimate (an estimate: there is no GPU here) is images/s = ``--peak-tflops`` (989, H200 dense bf16) x
``--mfu`` (assumed, 0.40) / model FLOPs per image, with ``train_throughput.model_flops_per_step(cfg, batch) /
batch`` for ``--preset`` (forward + backward matmuls, expected prefix), and workers = ceil(that / the per-worker
rate), assuming a host core as fast as this machine's. ``--out DIR`` writes
``loader_throughput-cpu-<date>.{json,md}``; ``--quick`` (a smoke test: 8 small images, one repeat) takes a few
seconds.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import harness
from PIL import Image, ImageDraw, ImageFilter, features

from aimv2.config import PRESETS, AIMv2Config
from aimv2.data import (
    BadSample,
    CSVSource,
    EvalTransform,
    LoaderBatch,
    Normalize,
    TrainLoader,
    TrainTransform,
    decode_image,
    draft_reduction,
    open_image,
    open_source,
)
from aimv2.data import loader as loader_mod
from aimv2.tokenizer import build_tokenizer

QUICK = {"n": 8, "repeats": 1, "batch_size": 4, "max_side": 1100}
STAGES = ("decode", "full", "worker")


# -- the images -----------------------------------------------------------------------------------------------

def image_sizes(n: int, rng: np.random.Generator, max_side: int | None = None) -> list[tuple[int, int]]:
    """``n`` ``(width, height)`` pairs drawn like ImageNet-1k's train images (see the module docstring);
    ``max_side`` caps the long side (``--quick``)."""
    sizes = []
    for _ in range(n):
        u = rng.random()
        if u < 0.70:
            long, short = 500, int(rng.choice([375, 333, 281, 400, 500], p=[0.55, 0.25, 0.07, 0.08, 0.05]))
        else:
            if u < 0.85:
                long = int(rng.integers(300, 500))
            else:
                long = int(round(math.exp(rng.uniform(math.log(640), math.log(2560)))))
            short = int(round(long * (3 / 4 if rng.random() < 0.5 else 2 / 3)))
        if max_side is not None and long > max_side:
            long, short = max_side, int(round(short * max_side / long))
        sizes.append((long, short) if rng.random() < 0.75 else (short, long))
    return sizes


def _field(rng: np.random.Generator, w: int, h: int, cell: int, channels: int = 1) -> np.ndarray:
    """Smooth random noise ``(h, w, channels)``, unit scale: a grid of normals every ``cell`` px, bicubic."""
    grid = rng.normal(0, 1, (h // cell + 3, w // cell + 3, channels)).astype(np.float32)
    size = (grid.shape[1] * cell, grid.shape[0] * cell)
    return np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(size, Image.Resampling.BICUBIC))
                     [cell:cell + h, cell:cell + w] for c in range(channels)], -1)


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photograph-like RGB image (see the module docstring): colour field, shapes, blur, texture, noise. The
    scene is drawn at a long side of at most ~700 px and upscaled, then the sensor noise is added at full size."""
    k = max(1.0, math.sqrt(max(width, height) / 700))  # large images: detail at a coarser scale
    w, h = max(8, int(width / k)), max(8, int(height / k))
    arr = 128 + 60 * _field(rng, w, h, max(8, min(w, h) // 3), 3)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 15))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(min(w, h) // 20 + 1, min(w, h) // 3 + 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif kind == 1:
            draw.rectangle([x - r, y - r // 2, x + r, y + r], fill=colour)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r // 2)], fill=colour)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    busy = np.clip(1 + _field(rng, w, h, max(8, min(w, h) // 4)), 0.1, 3)  # busy and quiet regions
    arr += busy * 24 * (0.5 * _field(rng, w, h, 8) + 0.7 * _field(rng, w, h, 3) + 0.7 * rng.normal(0, 1, (h, w, 1)))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if (w, h) != (width, height):
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_dataset(folder: Path, n: int, seed: int, quality: int = 90, max_side: int | None = None,
                  progress: bool = True) -> list[Path]:
    """Generate ``n`` JPEGs ``folder/{i:05d}.jpg`` (sizes from :func:`image_sizes`, content from
    :func:`synthetic_photo`) with ``.txt`` captions; returns the image paths."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    sizes = image_sizes(n, np.random.default_rng([seed, 0]), max_side)
    paths = []
    for i, (w, h) in enumerate(tqdm(sizes, desc="generating JPEGs", disable=None if progress else True,
                                    file=sys.stderr)):
        path = folder / f"{i:05d}.jpg"
        synthetic_photo(w, h, np.random.default_rng([seed, 1, i])).save(path, "JPEG", quality=quality)
        (folder / f"{i:05d}.txt").write_text(f"a synthetic photograph, number {i}, {w} by {h} pixels\n")
        paths.append(path)
    return paths


def user_images(folder: Path, n: int) -> list[Path]:
    """The first ``n`` image files (sorted paths, extensions Pillow reads) under ``folder``, recursively."""
    exts = {e.lower() for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not found:
        raise ValueError(f"--data {folder}: no image files found")
    return found[:n]


SIZE_CLASSES = ("< 500", "500", "501-1000", "> 1000")


def _size_class(w: int, h: int) -> str:
    long = max(w, h)
    return "< 500" if long < 500 else "500" if long == 500 else "501-1000" if long <= 1000 else "> 1000"


def describe_images(datas: Sequence[bytes]) -> dict:
    """Count, size classes (long side), bits per pixel per class, mean size, formats."""
    classes: dict[str, list[float]] = {}
    sizes, formats = [], Counter()
    for data in datas:
        lazy = open_image(data)
        w, h = lazy.size
        sizes.append((w, h))
        formats[lazy.format] += 1
        classes.setdefault(_size_class(w, h), []).append(8 * len(data) / (w * h))
    return {"count": len(datas), "mean_size": [round(float(np.mean([s[0] for s in sizes]))),
                                               round(float(np.mean([s[1] for s in sizes])))],
            "mean_kb": round(sum(map(len, datas)) / len(datas) / 1e3, 1), "formats": dict(formats),
            "by_long_side": {c: {"count": len(classes[c]), "bits_per_pixel": round(float(np.mean(classes[c])), 2)}
                             for c in SIZE_CLASSES if c in classes}}


# -- the per-sample paths (in process) ------------------------------------------------------------------------

def _rng(seed: int, index: int) -> np.random.Generator:
    """The loader's generator of sample ``index`` in epoch 0, after its prefix draw."""
    rng = np.random.default_rng([seed, 0, index])
    rng.random()
    return rng


def make_paths(image_size: int, seed: int) -> dict[str, Callable[[Sequence[bytes], Sequence[int]], object]]:
    """``{"stage/path": fn(datas, indices)}``: each processes ``datas`` (one batch of encoded images, of sample
    indices ``indices``) as that stage of the before / after loader does; see the module docstring."""
    t_old = TrainTransform(image_size, draft=False)  # what the loader built before: no draft
    t_new = TrainTransform(image_size, draft=True)
    min_side = loader_mod._train_min_side(t_old)
    norm = Normalize()

    def decode_before(datas, indices):
        for data, i in zip(datas, indices):
            img = decode_image(data, min_side=min_side)
            t_old.crop_box(*img.size, _rng(seed, i))  # the same draws as the after path makes before decoding

    def decode_after(datas, indices):
        for data, i in zip(datas, indices):
            lazy = open_image(data)
            _, _, ch, cw = t_new.crop_box(*lazy.size, _rng(seed, i))
            lazy.decode(draft_reduction(cw, ch, image_size, image_size))

    def full_before(datas, indices):
        images = [t_old(decode_image(data, min_side=min_side), _rng(seed, i)) for data, i in zip(datas, indices)]
        return norm(torch.stack(images), inplace=True)

    def full_copies(datas, indices):
        batch = torch.empty(len(datas), 3, image_size, image_size)
        for row, (data, i) in enumerate(zip(datas, indices)):
            norm(t_old(decode_image(data, min_side=min_side), _rng(seed, i), out=batch[row]), inplace=True)
        return batch

    def full_after(datas, indices):
        batch = torch.empty(len(datas), 3, image_size, image_size)
        for row, (data, i) in enumerate(zip(datas, indices)):
            norm(t_new(open_image(data), _rng(seed, i), out=batch[row]), inplace=True)
        return batch

    return {"decode/before": decode_before, "decode/after": decode_after, "full/before": full_before,
            "full/copies only": full_copies, "full/after": full_after}


def time_paths(paths: dict[str, Callable], datas: Sequence[bytes], indices: Sequence[int], batch_size: int,
               repeats: int, progress: bool = True, desc: str = "per-sample passes") -> dict[str, dict]:
    """Per path: images per CPU-second and per wall-second of each pass over ``datas`` (samples ``indices``, in
    batches of ``batch_size``), passes interleaved across paths; medians over ``repeats``."""
    from tqdm.auto import tqdm

    cpu: dict[str, list[float]] = {k: [] for k in paths}
    wall: dict[str, list[float]] = {k: [] for k in paths}
    chunks = [(datas[i:i + batch_size], indices[i:i + batch_size]) for i in range(0, len(datas), batch_size)]
    for fn in paths.values():  # warm-up: imports, allocator, caches
        fn(*chunks[0])
    for _ in tqdm(range(repeats), desc=desc, disable=None if progress else True, file=sys.stderr):
        for name, fn in paths.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for chunk, idx in chunks:
                fn(chunk, idx)
            cpu[name].append(len(datas) / (time.process_time() - c0))
            wall[name].append(len(datas) / (time.perf_counter() - w0))
    return {k: _summary(cpu[k], wall[k]) for k in paths}


def _summary(cpu: list[float], wall: list[float]) -> dict:
    return {"images_per_cpu_s": statistics.median(cpu), "images_per_wall_s": statistics.median(wall),
            "cpu_runs": [round(x, 1) for x in cpu], "wall_runs": [round(x, 1) for x in wall]}


# -- the worker (a real DataLoader process) -------------------------------------------------------------------

class LegacyBuilder(torch.utils.data.Dataset):
    """The worker's per-batch path before the reduced-size decode and the in-place batch (the "before"
    baseline): each image decoded with ``min_side`` (``_train_min_side``), transformed by a ``TrainTransform``
    without draft into a new tensor, the images stacked, the batch normalized in place; the batch is then copied
    into shared memory when the worker pickles it. Same ``_Plan`` in, same ``LoaderBatch`` out."""

    def __init__(self, loader: TrainLoader):
        self.source, self.tokenizer, self.normalize = loader.source, loader.tokenizer, loader.normalize
        self.seed, self.patch_size, self.image_size = loader.seed, loader.patch_size, loader.image_size
        self.transform = TrainTransform(loader.image_size, loader.transform.scale, loader.transform.ratio,
                                        loader.transform.flip, draft=False)
        self.min_side = loader_mod._train_min_side(self.transform)

    def __getitem__(self, plan) -> LoaderBatch:
        n, num_patches = len(self.source), (self.image_size // self.patch_size) ** 2
        images, captions, labels, prefix, skipped = [], [], [], [], []
        for index in plan.indices:
            for attempt in range(loader_mod.MAX_REPLACEMENTS + 1):
                rng = np.random.default_rng([self.seed, plan.epoch, index] + ([attempt] if attempt else []))
                u = rng.random()
                try:
                    sample = self.source.raw(index, min_side=self.min_side)
                    image = self.transform(sample.image, rng)
                    break
                except BadSample as exc:
                    skipped.append((str(index), exc.reason))
                    index = int(np.random.default_rng([self.seed, plan.epoch, index, 1_000_003 + attempt])
                                .integers(n))
            else:
                raise RuntimeError("too many unreadable samples")
            images.append(image)
            captions.append(sample.caption)
            labels.append(sample.label)
            prefix.append(1 + int(u * (num_patches - 1)))
        batch = self.normalize(torch.stack(images), inplace=True)
        return LoaderBatch(images=batch, tokens=self.tokenizer(captions), labels=torch.tensor(labels),
                           prefix_lens=torch.tensor(prefix), skipped=skipped, state=plan.state,
                           global_size=plan.global_size)


class _Timed(torch.utils.data.Dataset):
    """``inner[plan]`` with the worker process's CPU time and wall time after building it."""

    def __init__(self, inner: torch.utils.data.Dataset):
        self.inner = inner

    def __getitem__(self, plan):
        batch = self.inner[plan]
        return batch, time.process_time(), time.perf_counter()


def _plans(loader: TrainLoader, count: int) -> list:
    state, plans = loader.state_dict(), []
    for _ in range(count):
        plans.append(loader._plan(state))
        state = plans[-1].state
    return plans


def time_workers(builders: dict[str, torch.utils.data.Dataset], plans: list, repeats: int,
                 progress: bool = True) -> dict[str, dict]:
    """Per builder: images per CPU-second of one DataLoader worker process (its CPU time from its first batch to
    its last) and per wall-second (arrival of the batches in this process); medians over ``repeats``."""
    from tqdm.auto import tqdm

    cpu: dict[str, list[float]] = {k: [] for k in builders}
    wall: dict[str, list[float]] = {k: [] for k in builders}
    images = sum(len(p.indices) for p in plans[1:])
    for _ in tqdm(range(repeats), desc="worker passes", disable=None if progress else True, file=sys.stderr):
        for name, builder in builders.items():
            dl = torch.utils.data.DataLoader(_Timed(builder), batch_size=None, sampler=plans, num_workers=1,
                                             collate_fn=loader_mod._identity_collate, prefetch_factor=2)
            stamps = [(c, time.perf_counter()) for _, c, _ in dl]
            cpu[name].append(images / (stamps[-1][0] - stamps[0][0]))
            wall[name].append(images / (stamps[-1][1] - stamps[0][1]))
    return {k: _summary(cpu[k], wall[k]) for k in builders}


# -- the draft's pixels ---------------------------------------------------------------------------------------

def draft_difference(datas: Sequence[bytes], image_size: int, seed: int) -> dict:
    """The reduced-size decode against the full decode, same images, same draws (see the module docstring)."""
    on, off = TrainTransform(image_size, draft=True), TrainTransform(image_size, draft=False)
    diffs, drafted, reductions, same = [], [], Counter(), True
    for i, data in enumerate(datas):
        a_rng, b_rng = _rng(seed, i), _rng(seed, i)
        lazy = open_image(data)
        _, _, ch, cw = on.crop_box(*lazy.size, _rng(seed, i))  # the box both transforms draw first
        r = draft_reduction(cw, ch, image_size, image_size) if lazy.reducible else 1
        a, b = on(lazy, a_rng), off(decode_image(data), b_rng)
        same &= bool(a_rng.random() == b_rng.random())  # the same draws were made: the streams agree after
        d = (a - b).abs().flatten()
        diffs.append(d)
        reductions[r] += 1
        if r > 1:
            drafted.append(d)
    evals = [(EvalTransform(image_size, draft=True)(open_image(data)) -
              EvalTransform(image_size, draft=False)(open_image(data))).abs().flatten() for data in datas]
    return {"train": _diff_stats(diffs, drafted), "eval": _diff_stats(evals, [e for e in evals if e.max() > 0]),
            "reductions": {str(k): v for k, v in sorted(reductions.items())}, "same_random_stream": bool(same)}


def _diff_stats(all_diffs: list[torch.Tensor], drafted: list[torch.Tensor]) -> dict:
    out = {"samples": len(all_diffs), "drafted_samples": len(drafted)}
    for name, group in (("all", all_diffs), ("drafted", drafted)):
        if group:
            d = torch.cat(group)
            q = torch.quantile(d[torch.randperm(d.numel(), generator=torch.Generator().manual_seed(0))[:1 << 24]],
                               0.99)
            out[name] = {"mean_abs": float(d.mean()), "p99_abs": float(q), "max_abs": float(d.max()),
                         "worst_sample_mean_abs": max(float(x.mean()) for x in group)}
    return out


# -- the H200 estimate ----------------------------------------------------------------------------------------

def h200_estimate(preset: str, batch: int, peak_tflops: float, mfu: float, rates: dict[str, float]) -> dict:
    """Images/s of one H200 training ``preset`` at ``mfu`` of ``peak_tflops`` and the DataLoader workers that
    feed it at each per-worker rate in ``rates`` (an estimate; see the module docstring)."""
    import train_throughput

    cfg = AIMv2Config.from_name(preset)
    flops = train_throughput.model_flops_per_step(cfg, batch) / batch
    images_per_s = peak_tflops * 1e12 * mfu / flops
    return {"preset": preset, "peak_tflops": peak_tflops, "mfu": mfu, "flops_per_image": flops,
            "gpu_images_per_s": images_per_s,
            "workers": {k: math.ceil(images_per_s / v) for k, v in rates.items() if v}}


# -- the report -----------------------------------------------------------------------------------------------

def _rows(results: dict) -> list[tuple[str, str, dict]]:
    rows = []
    for stage in STAGES:
        for name, r in results.get(stage, {}).items():
            rows.append((stage, name, r))
    return rows


def markdown(info: dict) -> str:
    env, imgs, d = info["environment"], info["images"], info["draft"]
    est = info.get("h200")
    lines = [f"# Data-loading throughput per worker: {info['image_size']} px, {imgs['count']} images", "",
             f"{env.get('device_name')} · {env.get('cpus')} CPUs · torch {env.get('torch')} · Pillow "
             f"{env.get('pillow')} (libjpeg-turbo {env.get('libjpeg_turbo')}) · {env.get('date')}", "",
             f"Images: {info['data']}; mean {imgs['mean_size'][0]}x{imgs['mean_size'][1]}, {imgs['mean_kb']} KB; "
             "by long side: " + ", ".join(f"{c} px: {v['count']} ({v['bits_per_pixel']} bpp)"
                                          for c, v in imgs["by_long_side"].items()) + ".", "",
             "One process, one torch thread (a DataLoader worker: one core). Images per CPU-second of that process "
             f"(median of {info['repeats']} passes; wall-clock rate beside it). decode: bytes to RGB; full: "
             "decode + RandomResizedCrop/flip + to_tensor + collate + normalize; worker: a real DataLoader worker "
             f"building batches of {info['batch_size']} (file reads, captions, tokenizer, shared memory).", "",
             "| stage | path | images/s per core (CPU time) | images/s (wall) | vs before |",
             "|---|---|---|---|---|"]
    for stage, name, r in _rows(info["results"]):
        base = info["results"][stage].get("before")
        ratio = r["images_per_cpu_s"] / base["images_per_cpu_s"] if base else None
        lines.append(f"| {stage} | {name} | {r['images_per_cpu_s']:.0f} | {r['images_per_wall_s']:.0f} | "
                     + (f"{ratio:.2f}x" if ratio else "") + " |")
    if info.get("by_long_side"):
        lines += ["", "By the long side of the image (images/s per core, CPU time):", "",
                  "| long side px | images | bpp | decode before | decode after | x | full before | full after | x |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for cls, r in info["by_long_side"].items():
            db, da = r["decode/before"]["images_per_cpu_s"], r["decode/after"]["images_per_cpu_s"]
            fb, fa = r["full/before"]["images_per_cpu_s"], r["full/after"]["images_per_cpu_s"]
            bpp = imgs["by_long_side"][cls]["bits_per_pixel"]
            lines.append(f"| {cls} | {r['count']} | {bpp} | {db:.0f} | {da:.0f} | {da / db:.2f} | {fb:.0f} | "
                         f"{fa:.0f} | {fa / fb:.2f} |")
    t = d["train"]
    lines += ["", "Reduced-size JPEG decode against the full decode (same images, same draws; [0, 1] pixel units): "
              f"TrainTransform: {t['drafted_samples']} of {t['samples']} samples drafted "
              f"(reductions {d['reductions']}), "
              f"same random stream and crops: {d['same_random_stream']}; "
              + (f"mean |diff| {t['all']['mean_abs']:.5f} over all samples, {t['drafted']['mean_abs']:.5f} over the "
                 f"drafted ones (p99 {t['drafted']['p99_abs']:.4f}, max {t['drafted']['max_abs']:.4f}, worst "
                 f"sample mean {t['drafted']['worst_sample_mean_abs']:.5f})" if t.get("drafted") else "none drafted")
              + ". EvalTransform: " + (f"{d['eval']['drafted_samples']} samples drafted, mean |diff| over them "
                                       f"{d['eval']['drafted']['mean_abs']:.5f}" if d["eval"].get("drafted")
                                       else "none drafted") + "."]
    if est:
        stage = "worker" if "worker after" in est["workers"] else "full"
        after, before = est["workers"].get(f"{stage} after"), est["workers"].get(f"{stage} before")
        lines += ["", f"**Estimate** (no GPU here): one H200 training {est['preset']} at an assumed "
                  f"{100 * est['mfu']:.0f}% MFU of {est['peak_tflops']:.0f} TFLOP/s (dense bf16), "
                  f"{est['flops_per_image'] / 1e9:.0f} GFLOP per image (forward + backward model FLOPs), takes "
                  f"{est['gpu_images_per_s']:.0f} images/s: **{after} DataLoader worker(s)** at the measured "
                  f"{stage} rate per core after ({before} before), if a host core is as fast as this one "
                  "(the main process's pinning and host-to-device copies not counted)."]
    notes = [*info.get("notes", []), f"Load average (1, 5, 15 min) at start {info.get('load_average_start')}, "
             f"at end {info.get('load_average_end')}."]
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _environment() -> dict:
    env = harness.environment(torch.device("cpu"))
    env.update(cpus=os.cpu_count(), pillow=Image.__version__, libjpeg_turbo=features.version("libjpeg_turbo"),
               threads=torch.get_num_threads())
    return env


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- command line ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = _Parser(prog="loader_throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="images to generate (or to take from --data); default 200")
    p.add_argument("--data", default=None, help="a folder of your own images instead of generated ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images and of the draws")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated images (default 90)")
    p.add_argument("--repeats", type=int, default=5, help="passes per path; the median is reported (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--preset", default="aimv2-large-patch14-224", help="model preset of the H200 estimate")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (default 989, H200)")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOP utilisation (default 0.40)")
    p.add_argument("--no-worker", action="store_true", help="skip the DataLoader worker stage")
    p.add_argument("--out", default=None, help="folder for loader_throughput-cpu-<date>.{json,md}")
    p.add_argument("--quick", action="store_true", help="a smoke test: 8 small images, one repeat (a few seconds)")
    p.add_argument("--note", action="append", default=[], help="a line recorded in the outputs (repeatable)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments (``--quick`` applies its sizes unless given explicitly)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    args.max_side = None
    if args.quick:
        for name, value in QUICK.items():
            if f"--{name.replace('_', '-')}" not in explicit:
                setattr(args, name, value)
    for name, low in (("n", 1), ("repeats", 1), ("batch_size", 1), ("quality", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.quality > 100:
        parser.error(f"--quality must be at most 100, got {args.quality}")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    if not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    if args.data is not None and not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: not a directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON and markdown with ``--out``."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory(prefix="aimv2-loader-bench-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> int:
    progress = not args.quick
    info: dict = {"environment": _environment(), "load_average_start": _load_average(), "notes": list(args.note)}
    cfg = AIMv2Config.from_name(args.preset)
    image_size = cfg.encoder.image_size
    if args.data is None:
        paths = write_dataset(tmp / "images", args.n, args.seed, args.quality, args.max_side, progress)
        source = open_source(str(tmp / "images"))
        info["data"] = (f"{args.n} generated JPEGs (quality {args.quality}, seed {args.seed}"
                        + (f", long side capped at {args.max_side}" if args.max_side else "") + ")")
    else:
        paths = user_images(Path(args.data), args.n)
        listing = tmp / "images.csv"
        with open(listing, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows([str(path.resolve()), f"image {i}"] for i, path in enumerate(paths))
        source = CSVSource(str(listing))
        info["data"] = f"{len(paths)} images from {args.data}"
    datas = [p.read_bytes() for p in paths]
    info.update(images=describe_images(datas), image_size=image_size, batch_size=args.batch_size,
                repeats=args.repeats, seed=args.seed, quick=args.quick)

    results: dict[str, dict] = {}
    paths_fns = make_paths(image_size, args.seed)
    timed = time_paths(paths_fns, datas, list(range(len(datas))), args.batch_size, args.repeats, progress)
    for key, value in timed.items():
        stage, name = key.split("/")
        results.setdefault(stage, {})[name] = value
    classes: dict[str, list[int]] = {}
    for i, data in enumerate(datas):
        classes.setdefault(_size_class(*open_image(data).size), []).append(i)
    by_class = {}
    for cls in SIZE_CLASSES:
        if cls in classes:
            idx = classes[cls]
            by_class[cls] = {"count": len(idx), **time_paths(
                {k: v for k, v in paths_fns.items() if k.endswith(("/before", "/after"))}, [datas[i] for i in idx],
                idx, args.batch_size, args.repeats, progress, f"long side {cls} px")}
    info["by_long_side"] = by_class

    if not args.no_worker:
        batch = min(args.batch_size, len(source))
        tokenizer = build_tokenizer("bytes", context_length=cfg.decoder.context_length)
        loader = TrainLoader(source, tokenizer, batch, image_size=image_size, patch_size=cfg.encoder.patch_size,
                             seed=args.seed)
        off = TrainLoader(source, tokenizer, batch, image_size=image_size, patch_size=cfg.encoder.patch_size,
                          seed=args.seed, transform=TrainTransform(image_size, draft=False))
        legacy, after, copies = LegacyBuilder(loader), loader_mod._BatchBuilder(loader), loader_mod._BatchBuilder(off)
        plans = _plans(loader, max(3, math.ceil(2 * len(source) / batch)))
        check = plans[: 2]
        info["legacy_matches_draft_off"] = all(torch.equal(legacy[p].images, copies[p].images) for p in check)
        results["worker"] = time_workers({"before": legacy, "copies only": copies, "after": after}, plans,
                                         args.repeats, progress)

    info["results"] = results
    info["draft"] = draft_difference(datas, image_size, args.seed)
    rates = {f"{stage} {name}": r["images_per_cpu_s"] for stage in ("worker", "full")
             for name, r in results.get(stage, {}).items() if name in ("before", "after")}
    info["h200"] = h200_estimate(args.preset, args.batch_size, args.peak_tflops, args.mfu, rates)
    info["load_average_end"] = _load_average()
    text = markdown(info)
    print(text)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"loader_throughput-cpu-{info['environment']['date']}"
        (out / f"{stem}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (out / f"{stem}.md").write_text(text)
        print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
