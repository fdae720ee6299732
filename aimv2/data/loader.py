"""The training loader: a world-size-invariant global sample order, split per rank, built in DataLoader workers.

Why this shape:
- **The global batch is defined before the ranks are.** Epoch ``e`` visits the source in the order
  ``torch.randperm(len(source))`` seeded with ``(seed, e)``; global batch ``g`` is the next ``global_batch``
  samples of that order, and rank ``r`` of ``W`` takes the ``r``-th contiguous slice of it. So 2 ranks see
  exactly the samples 1 rank sees at the same global batch, and a run can resume on another world size.
- **Everything random about a sample is a function of ``(seed, epoch, index)``**: its augmentation and its
  prefix length come from ``numpy.random.default_rng([seed, epoch, index])``. No global RNG is involved, so
  neither the world size, nor the number of workers, nor a restart changes what a sample looks like.
- **The state is the position of the last batch handed out** (``{"epoch", "batch", "position"}``), carried
  by every batch. Workers prefetch ahead, but a checkpoint records what the trainer consumed, and a loader
  restored from it yields the batches the uninterrupted one would have.
- **A sample is read by exactly one worker**: DataLoader workers each build whole local batches (batch ``k``
  by worker ``k mod num_workers``), open their own file handles, and never read another batch's samples.
- **A bad sample never stops the run**: a corrupt or unreadable image, or an empty caption (``BadSample``),
  is skipped and replaced by another sample drawn from ``(seed, epoch, index, attempt)``, so batches keep
  their size; each batch lists what it skipped and the trainer reports the total at the end.
- **Decoding follows the crop, and nothing is copied twice**: with our sources and a ``TrainTransform`` or
  ``EvalTransform`` whose ``draft`` is on (the default; ``AIMV2_JPEG_DRAFT=0`` turns it off), a sample is read
  header first (``raw(i, lazy=True)``) and the transform decodes a JPEG at the largest 1/2, 1/4 or 1/8 scale its
  crop allows (see ``transforms``); with it off, as for other transforms, a JPEG with a shorter side of over
  twice what the smallest crop needs is decoded at reduced size before the transform. The images are written
  into one batch tensor (in shared memory in a worker, so sending it does not copy it) and normalized there.

Native resolution (``native_budgets=(lo, hi)``, the paper's §2.4): every global batch draws a patch budget
``A = 2**n``, ``n = lo + round((hi - lo) * (t + 1) / 2)`` with ``t ~ TruncNormal(0, 1)`` on ``[-1, 1]``; each
image is resized to fit a ``native_grid(A)`` canvas keeping its aspect ratio and zero-padded, and the global
batch holds ``global_batch * N / A`` images (rounded down to a multiple of the world size), so the patches
per batch stay constant. ``N`` is the patch count at ``image_size``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .decode import BadSample
from .sources import _Source
from .transforms import EvalTransform, Normalize, TrainTransform, fit_and_pad, native_grid

__all__ = ["Batch", "LoaderBatch", "TrainLoader", "sample_budget_exponent", "list_batches"]

MAX_REPLACEMENTS = 32  # draws before a source with almost nothing readable is declared broken


@dataclasses.dataclass
class Batch:
    """A collated batch without prefix lengths (the model then draws them): ``images`` float32
    ``(B, 3, H, W)`` normalized, ``tokens`` int64 ``(B, context_length)`` right-padded, ``labels`` int64
    ``(B,)`` (-1 when unknown). The trainer takes it as it takes a ``LoaderBatch`` (bench/train_throughput.py
    feeds it a fixed synthetic one)."""

    images: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit torch seed mixed from ``(seed, epoch)``."""
    lo, hi = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(hi) & 0x7FFFFFFF) << 32 | int(lo)


@dataclasses.dataclass
class LoaderBatch:
    """One rank's share of a global batch.

    ``images`` float32 ``(B, 3, H, W)`` normalized; ``tokens`` int64 ``(B, context_length)``; ``labels`` int64
    ``(B,)`` (-1 when unknown); ``prefix_lens`` int64 ``(B,)`` in ``[1, N-1]`` for ``N = (H/p)(W/p)``;
    ``skipped``: ``[(key, reason)]`` of the samples replaced in this batch; ``state``: the loader state after
    this batch (what a checkpoint taken now must record); ``global_size``: images in the whole global batch.
    """

    images: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    prefix_lens: torch.Tensor
    skipped: list[tuple[str, str]]
    state: dict
    global_size: int


def sample_budget_exponent(rng: np.random.Generator, lo: int, hi: int) -> int:
    """``n`` in ``[lo, hi]``: a standard normal truncated to ``[-1, 1]`` (by rejection), mapped linearly."""
    while True:
        t = rng.standard_normal()
        if -1.0 <= t <= 1.0:
            return lo + int(round((hi - lo) * (t + 1.0) / 2.0))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which samples make one rank's batch: ``order[start:stop]`` of ``epoch``, at ``grid`` patches."""

    epoch: int
    indices: tuple[int, ...]
    grid: tuple[int, int] | None  # None: the fixed image_size
    global_size: int
    state: dict  # the loader state after this batch


def _train_min_side(transform: object) -> int | None:
    """The shorter image side below which ``transform`` (a ``TrainTransform``) would have to enlarge its
    smallest possible crop: decoding a JPEG down to it loses nothing the output keeps. None for any other
    transform (nothing is known of what it needs)."""
    if not isinstance(transform, TrainTransform):
        return None
    lo, hi = transform.ratio
    m = min(lo, 1.0 / lo, hi, 1.0 / hi, 1.0)  # the narrowest aspect of a crop, the fallback center crop too
    f = min(math.sqrt(transform.scale[0] * m), m)  # smallest crop side / image's shorter side
    return math.ceil(transform.image_size / f) + 1


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor of ``shape``; in a DataLoader worker it lives in shared memory, as
    torch's ``default_collate`` allocates its batches there, so that sending it to the main process does not
    copy it (a tensor in private memory is copied into shared memory when it is pickled)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class _BatchBuilder(torch.utils.data.Dataset):
    """Turns a ``_Plan`` into a ``LoaderBatch``; runs in the DataLoader workers (or in-process).

    The images of a batch are written straight into one (shared-memory, in a worker) batch tensor by our
    transforms and ``fit_and_pad`` (``out=``), each normalized in place by a ``Normalize`` as soon as it is
    written (while it is in cache: the same values as normalizing the whole batch after); other transforms'
    outputs are stacked into it and the batch normalized at the end."""

    def __init__(self, loader: "TrainLoader"):
        self.source, self.tokenizer, self.normalize = loader.source, loader.tokenizer, loader.normalize
        self.seed, self.transform, self.patch_size = loader.seed, loader.transform, loader.patch_size
        self.image_size = loader.image_size
        # our sources decode a big JPEG at reduced size when the output needs far fewer pixels: read lazily
        # (header only) when the transform picks the reduction from its crop, else with a min_side
        self.drafts = isinstance(loader.source, _Source)
        ours = isinstance(loader.transform, (TrainTransform, EvalTransform))
        self.lazy = self.drafts and ours and loader.transform.draft
        self.train_min_side = _train_min_side(loader.transform) if self.drafts else None
        # transforms known to write (3, image_size, image_size) into out=
        self.writes_out = ours and loader.transform.image_size == loader.image_size and hasattr(loader.source, "raw")

    def _image(self, index: int, rng: np.random.Generator, grid, out: torch.Tensor | None
               ) -> tuple[torch.Tensor, str, int]:
        """(float32 (3, H, W) in [0, 1], caption, label) of sample ``index``, the image written into ``out``
        when given (then the returned image is ``out``); raises BadSample."""
        raw = getattr(self.source, "raw", None)
        # a tensor source (the bundled shapes) is already at image_size and is not augmented
        if raw is None:
            sample = self.source[index]
        elif self.lazy and grid is None:
            sample = raw(index, lazy=True)
        elif self.drafts:
            side = self.train_min_side if grid is None else max(grid) * self.patch_size
            sample = raw(index, min_side=side)
        else:
            sample = raw(index)
        if grid is not None:
            image = fit_and_pad(sample.image, grid, self.patch_size, out=out)
        elif raw is None:
            image = sample.image
        elif out is not None:
            image = self.transform(sample.image, rng, out=out)
        else:
            image = self.transform(sample.image, rng)
        return image, sample.caption, sample.label

    def __getitem__(self, plan: _Plan) -> LoaderBatch:
        unreadable = BadSample if hasattr(self.source, "raw") else ()  # a tensor source: catch nothing
        n = len(self.source)
        images, captions, labels, prefix, skipped = [], [], [], [], []
        if plan.grid is None:
            num_patches = (self.image_size // self.patch_size) ** 2
            side = (self.image_size, self.image_size)
        else:
            num_patches = plan.grid[0] * plan.grid[1]
            side = (plan.grid[0] * self.patch_size, plan.grid[1] * self.patch_size)
        # written in place (our transforms, fit_and_pad) or stacked at the end (anything else)
        batch = _batch_buffer((len(plan.indices), 3, *side)) if plan.grid is not None or self.writes_out else None
        each = batch is not None and isinstance(self.normalize, Normalize)  # normalize each image once written
        for row, index in enumerate(plan.indices):
            for attempt in range(MAX_REPLACEMENTS + 1):
                rng = np.random.default_rng([self.seed, plan.epoch, index] + ([attempt] if attempt else []))
                u = rng.random()  # the prefix draw comes first, so it does not depend on the augmentation
                try:
                    image, caption, label = self._image(index, rng, plan.grid, None if batch is None else batch[row])
                    break
                except unreadable as exc:
                    skipped.append((_key(self.source, index), exc.reason))
                    index = int(np.random.default_rng([self.seed, plan.epoch, index, 1_000_003 + attempt])
                                .integers(n))
            else:
                raise RuntimeError(f"{MAX_REPLACEMENTS} samples in a row could not be read; last: {skipped[-1]}")
            if each:
                self.normalize(image, inplace=True)
            images.append(image)
            captions.append(caption)
            labels.append(label)
            prefix.append(1 + int(u * (num_patches - 1)))
        if batch is None:
            batch = torch.stack(images, out=_batch_buffer((len(images), *images[0].shape), images[0].dtype))
        if isinstance(self.normalize, Normalize):
            if not each:
                self.normalize(batch, inplace=True)
        else:
            batch = self.normalize(batch)
        return LoaderBatch(images=batch, tokens=self.tokenizer(captions),
                           labels=torch.tensor(labels, dtype=torch.long),
                           prefix_lens=torch.tensor(prefix, dtype=torch.long), skipped=skipped,
                           state=plan.state, global_size=plan.global_size)


def _key(source, index: int) -> str:
    describe = getattr(source, "key", None)
    try:
        return str(describe(index)) if callable(describe) else f"#{index}"
    except Exception:  # a key is for the report only
        return f"#{index}"


def _identity_collate(batch):
    return batch


class _PlanSampler(torch.utils.data.Sampler):
    """An endless stream of ``_Plan`` from a starting state (iterated in the main process)."""

    def __init__(self, loader: "TrainLoader", state: dict):
        self.loader, self.state = loader, dict(state)

    def __iter__(self) -> Iterator[_Plan]:
        state = dict(self.state)
        while True:
            plan = self.loader._plan(state)
            state = plan.state
            yield plan


class TrainLoader:
    """Endless, resumable batches of one rank's share of each global batch (see the module docstring).

    Args:
        source: a map-style source: ``len(source)`` and either ``source.raw(i) -> RawSample`` (real data,
            decoded and augmented here) or ``source[i] -> Sample`` with a float image (the bundled shapes).
        tokenizer: ``tokenizer(list[str]) -> int64 (B, context_length)``.
        global_batch: images per global batch (over all ranks); a multiple of ``world_size``.
        image_size, patch_size: the fixed training resolution and the model's patch size.
        seed: non-negative int; fixes the order, the augmentation and the prefix lengths.
        rank, world_size: this process's share.
        num_workers: DataLoader worker processes (0: build batches in this process).
        normalize: a ``Normalize`` (default ImageNet statistics) or a callable on ``(B, 3, H, W)``.
        transform: ``transform(pil_image, rng) -> float32 (3, image_size, image_size)`` for sources with
            ``raw``; default ``TrainTransform(image_size)`` (RandomResizedCrop 0.4-1 bicubic + flip).
        native_budgets: ``(lo, hi)`` exponents for native-resolution batches, or None for fixed resolution.
    """

    def __init__(self, source, tokenizer, global_batch: int, *, image_size: int, patch_size: int = 14,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 normalize: Any = None, transform: Any = None, native_budgets: tuple[int, int] | None = None,
                 prefetch_factor: int = 2):
        for name, value, low in (("global_batch", global_batch, 1), ("image_size", image_size, 1),
                                 ("patch_size", patch_size, 1), ("seed", seed, 0), ("rank", rank, 0),
                                 ("world_size", world_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} is not a multiple of world_size {world_size}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        n = len(source)
        if n < global_batch:
            raise ValueError(f"the data has {n} samples, fewer than one global batch of {global_batch}")
        if native_budgets is not None:
            lo, hi = native_budgets
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 14):
                raise ValueError(f"native_budgets must be two ints 1 <= lo <= hi <= 14, got {native_budgets!r}")
        self.source, self.tokenizer = source, tokenizer
        self.global_batch, self.image_size, self.patch_size = global_batch, image_size, patch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.normalize = Normalize() if normalize is None else normalize
        if transform is None and hasattr(source, "raw") and native_budgets is None:
            transform = TrainTransform(image_size)
        self.transform, self.native_budgets = transform, native_budgets
        self._state = {"epoch": 0, "batch": 0, "position": 0}
        self._iter = None
        self._order_epoch, self._order = -1, None
        self.skipped: list[tuple[str, str]] = []  # every (key, reason) this loader's batches reported

    # -- the plan (main process) -------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._order, self._order_epoch = torch.randperm(len(self.source), generator=gen), epoch
        return self._order

    def _global_size_and_grid(self, epoch: int, batch: int) -> tuple[int, tuple[int, int] | None]:
        if self.native_budgets is None:
            return self.global_batch, None
        rng = np.random.default_rng([self.seed, 2, epoch, batch])
        budget = 2 ** sample_budget_exponent(rng, *self.native_budgets)
        patches = self.global_batch * (self.image_size // self.patch_size) ** 2
        size = max(self.world_size, patches // budget // self.world_size * self.world_size)
        return min(size, len(self.source) // self.world_size * self.world_size), native_grid(budget)

    def _plan(self, state: dict) -> _Plan:
        epoch, batch, position = state["epoch"], state["batch"], state["position"]
        size, grid = self._global_size_and_grid(epoch, batch)
        if position + size > len(self.source):  # the epoch's incomplete tail is dropped
            epoch, batch, position = epoch + 1, 0, 0
            size, grid = self._global_size_and_grid(epoch, batch)
        order = self._epoch_order(epoch)
        local = size // self.world_size
        start = position + self.rank * local
        indices = tuple(order[start: start + local].tolist())
        return _Plan(epoch=epoch, indices=indices, grid=grid, global_size=size,
                     state={"epoch": epoch, "batch": batch + 1, "position": position + size})

    # -- iteration ---------------------------------------------------------------------------------------------
    def _start(self) -> Iterator[LoaderBatch]:
        sampler = _PlanSampler(self, self._state)
        builder = _BatchBuilder(self)
        if self.num_workers == 0:
            return (builder[plan] for plan in sampler)
        return iter(torch.utils.data.DataLoader(
            builder, batch_size=None, sampler=sampler, num_workers=self.num_workers,
            collate_fn=_identity_collate, prefetch_factor=self.prefetch_factor, persistent_workers=False))

    def __iter__(self) -> Iterator[LoaderBatch]:
        return self

    def __next__(self) -> LoaderBatch:
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        self._state = dict(batch.state)
        self.skipped.extend(batch.skipped)
        return batch

    def close(self) -> None:
        """Stop the workers (a later ``next`` restarts them from the current state)."""
        self._iter = None

    def state_dict(self) -> dict:
        """``{"epoch", "batch", "position"}`` after the last batch returned; the same for every rank."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Resume after the batch that produced ``state`` (any world size, for a fixed resolution)."""
        for name in ("epoch", "batch", "position"):
            value = state.get(name) if isinstance(state, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state[{name!r}] must be a non-negative int, got {value!r}")
        if state["position"] > len(self.source):
            raise ValueError(f"state['position'] {state['position']} is past the data's {len(self.source)} samples")
        self._state = {k: int(state[k]) for k in ("epoch", "batch", "position")}
        self._iter = None

    def __repr__(self) -> str:
        return (f"TrainLoader({len(self.source)} samples, global_batch={self.global_batch}, rank={self.rank}/"
                f"{self.world_size}, workers={self.num_workers}, native={self.native_budgets})")


def _as_list(batch: list) -> list:
    return batch


def list_batches(items: Any, batch_size: int, workers: int = 0) -> Iterator[list]:
    """``items[i]`` (any object with ``len`` and ``[]``) in order, as lists of at most ``batch_size``: in this
    process when ``workers`` is 0, else through a DataLoader with that many worker processes (no collation: each
    batch is the list of the items' values). For the extraction commands (``aimv2-extract``, ``aimv2-zeroshot``),
    whose items decode and transform one image each."""
    if workers == 0:
        for start in range(0, len(items), batch_size):
            yield [items[i] for i in range(start, min(start + batch_size, len(items)))]
        return
    yield from torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=workers,
                                           collate_fn=_as_list)
