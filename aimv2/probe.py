"""The attentive probe of AIMv2's evaluation: top-1 of a frozen trunk on labelled images (the library).

The head follows Apple's ``AttentionPoolingClassifier`` (ml-aim): an optional non-affine BatchNorm over the
features, one learned query per head (no query projection), key and value projections without bias, a softmax
over the patches, the mean over queries, then a linear classifier. Heads = ``dim // 128`` (at least 1). Which
exact variant produced the paper's numbers is not published (docs/aimv2-reference.md §4); this one is Apple's code.

The protocol (docs/aimv2-reference.md §4, scaled down): the trunk is frozen (eval mode, bidirectional attention, no
grad) and its last-layer features ``(N, D)`` (the encoder's output, after the final RMSNorm) are extracted once
per image and cached; the probe is then trained on the cached features with AdamW betas (0.9, 0.999), a linear
warm-up then a cosine schedule down to ``min_lr``, gradient clipping at 3.0, and evaluated by top-1 on held-out
images. Unlike the paper there is no data augmentation (features are cached) and no learning-rate sweep.

The paper's protocol (Table A2; :func:`run_paper_probes`, ``aimv2-probe --protocol paper``): the same frozen
trunk and head, but the training images are augmented anew every epoch (RandomResizedCrop 0.08-1 bicubic, flip,
RandAugment ``rand-m9-mstd0.5-inc1``, ColorJitter 0.3: :mod:`aimv2.data.randaugment`), so the trunk runs on
every training batch of every epoch (a trunk forward per image per epoch: 100 epochs cost about 100 feature
extractions), and a sweep of probes over learning rate x weight decay (7 x 2 in the paper) is trained at once:
each augmented batch goes through the trunk once and its features feed every probe of the sweep, so the sweep
costs one trunk pass, not one per probe. Every sweep point's test top-1 is reported, and the best of them, as the
paper reports it; choosing the best on the evaluation split itself is optimistic. Test images are not augmented
(their features are extracted once).

Python: :func:`run_probe` (one trunk) and :func:`run_probes` (several trunks on the same images), with the
pieces :func:`extract_features`, :func:`train_probe`, :func:`evaluate_probe` and :func:`random_encoder`;
:func:`run_paper_probe` / :func:`run_paper_probes` with :class:`PaperProbeSettings` and :class:`AugmentedImages`.
Command line: ``aimv2-probe --checkpoint runs/demo --vs-random`` (:mod:`aimv2.probe_cli`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ._extras import require
from .cli import UsageError
from .data import NORMALIZATIONS

if TYPE_CHECKING:
    from .config import AIMv2Config, EncoderConfig

PROBE_HEAD_DIM = 128


def probe_heads(dim: int) -> int:
    """Heads of the probe for features of width ``dim``: ``dim // 128``, at least 1, and a divisor of ``dim``."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    heads = max(1, dim // PROBE_HEAD_DIM)
    while dim % heads:
        heads -= 1
    return heads


class AttentionPoolingClassifier(nn.Module):
    """Attentive probe: ``features (B, N, dim)`` -> ``(logits (B, num_classes), pooled (B, dim))``.

    Args:
        dim: feature width (the trunk's ``D``).
        num_classes: classifier outputs.
        num_heads: attention heads; None = :func:`probe_heads` (``dim // 128``, at least 1).
        num_queries: learned query tokens, averaged after pooling (1 in Apple's default).
        use_batch_norm: normalize the features with a non-affine BatchNorm (eps 1e-6) first, as ml-aim does.
    Parameters: ``query (1, num_queries, dim)``, ``k``/``v`` ``Linear(dim, dim, bias=False)``, ``linear``
    ``Linear(dim, num_classes)``: ``2 dim^2 + num_queries dim`` for the pooling.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None, num_queries: int = 1,
                 use_batch_norm: bool = True):
        super().__init__()
        heads = probe_heads(dim) if num_heads is None else num_heads
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"num_heads must be a positive divisor of dim={dim}, got {heads!r}")
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
        self.dim, self.num_heads, self.num_queries = dim, heads, num_queries
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if use_batch_norm else nn.Identity()
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3 or features.shape[-1] != self.dim:
            raise ValueError(f"features must have shape (B, N, {self.dim}), got {tuple(features.shape)}")
        b, n, d = features.shape
        h, hd = self.num_heads, d // self.num_heads
        x = self.bn(features.transpose(1, 2)).transpose(1, 2)
        q = self.query.expand(b, -1, -1).reshape(b, self.num_queries, h, hd).transpose(1, 2)
        k = self.k(x).reshape(b, n, h, hd).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, hd).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, h, queries, hd): softmax over the N patches
        pooled = pooled.transpose(1, 2).reshape(b, self.num_queries, d).mean(dim=1)
        return self.linear(pooled), pooled


def probe_forward(probe: AttentionPoolingClassifier, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``probe(features)`` computed without projecting every token: the same function, far fewer FLOPs.

    Softmax attention of a learned query is linear in the keys and values, so per head h
    ``q_h . (W_k x_n)_h = (W_k,h^T q_h) . x_n`` and ``sum_n a_n (W_v x_n)_h = W_v,h (sum_n a_n x_n)``: the
    scores cost ``O(B N D h)`` instead of the ``O(B N D^2)`` of the k/v projections of all N tokens (for
    the demo trunk about 60x less). Same parameters, same BatchNorm (train or eval mode); differs from
    ``probe.forward`` only by rounding. ``features (B, N, dim)`` -> ``(logits (B, C), pooled (B, dim))``.
    """
    if features.dim() != 3 or features.shape[-1] != probe.dim:
        raise ValueError(f"features must have shape (B, N, {probe.dim}), got {tuple(features.shape)}")
    b, _, d = features.shape
    h, nq = probe.num_heads, probe.num_queries
    hd = d // h
    x = probe.bn(features.transpose(1, 2)).transpose(1, 2)
    q = probe.query.reshape(nq, h, hd)
    kq = torch.einsum("qhc,hcd->qhd", q, probe.k.weight.reshape(h, hd, d)) * hd ** -0.5  # (Q, h, D)
    attn = torch.einsum("bnd,qhd->bqhn", x, kq).softmax(dim=-1)  # (B, Q, h, N)
    pooled_x = torch.einsum("bqhn,bnd->bqhd", attn, x)  # (B, Q, h, D)
    pooled = torch.einsum("bqhd,hcd->bqhc", pooled_x, probe.v.weight.reshape(h, hd, d)).reshape(b, nq, d).mean(1)
    return probe.linear(pooled), pooled


# --------------------------------------------------------------------------------------------------------
# Labelled images
# --------------------------------------------------------------------------------------------------------

class _LabelledItems(Protocol):
    """What the probe reads images from: ``len(items)`` and ``items[i] -> (image (3, S, S), label)``
    (:class:`LabelledImages`, :class:`SourceImages`, :class:`FolderImages`, or a plain list of pairs)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]: ...


class ProbeUsageError(UsageError):
    """Bad input to the probe (a flag, a path, a preset; a ValueError); the CLI prints it as one line and exits
    with 2."""


class ProbeDataError(ValueError):
    """The images cannot be probed: none is readable, or too few are left to train or test the probe. The CLI
    prints it as one line and exits with 1 (an operational error, see :mod:`aimv2.cli`)."""


class LabelledImages:
    """Images with labels for the probe: ``len(x)`` items; ``x[i]`` is ``(image, label)``, image float32
    ``(3, S, S)`` in ``[0, 1]`` (not normalized), label a non-negative int. An item may raise
    ``aimv2.data.BadSample`` (a corrupt file): the probe skips and counts it.

    Built from ``images`` float ``(M, 3, S, S)`` in ``[0, 1]`` and ``labels`` int ``(M,)`` tensors; see
    :class:`SourceImages` and :class:`FolderImages` for the other kinds.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]):
        labels = torch.as_tensor(labels)
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
            raise ValueError(f"images must be a float tensor (M, 3, S, S), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be an int tensor of shape ({images.shape[0]},), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be non-negative, got {int(labels.min())}")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def label_of(self, i: int) -> int:
        """The label of item ``i`` (without reading its image)."""
        return int(self.labels[i])


class SourceImages:
    """``(image, label)`` items of an ``aimv2.data.ImageTextSource`` (e.g. ``ShapesDataset``), at ``indices``.

    Args:
        source: ``source[i]`` is a ``Sample`` (image float32 ``(3, S, S)`` in ``[0, 1]``, ``label >= 0``).
        indices: which items, in order (a ``range`` or a list); None: all of them.
    """

    def __init__(self, source, indices: Sequence[int] | None = None):
        self.source = source
        self.indices = range(len(source)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.source[self.indices[i]]
        return sample.image, int(sample.label)

    def label_of(self, i: int) -> int:
        """The label of item ``i``: the source's ``label_of`` when it has one, else read from the sample."""
        label_of = getattr(self.source, "label_of", None)
        return int(label_of(self.indices[i])) if label_of else int(self.source[self.indices[i]].label)


class FolderImages:
    """``(image, label)`` items of an ``aimv2.data.ClassFolder`` (a folder of class subfolders).

    Each image goes through ``aimv2.data.EvalTransform(image_size, crop_pct)`` (float32 ``(3, S, S)`` in
    ``[0, 1]``). ``classes``: the label space; a folder class is mapped to its index there by name (so a test
    folder can be labelled in the train folder's classes); None: the folder's own ``classes``. A corrupt
    image raises ``BadSample`` (skipped and counted by the probe).
    """

    def __init__(self, folder, image_size: int, *, classes: Sequence[str] | None = None, crop_pct: float = 1.0,
                 indices: Sequence[int] | None = None):
        from .data import EvalTransform

        self.folder, self.transform = folder, EvalTransform(image_size, crop_pct=crop_pct)
        self.classes = list(folder.classes if classes is None else classes)
        label_of = getattr(folder, "label_of", None)
        used = sorted({label_of(i) for i in range(len(folder))}) if label_of else range(len(folder.classes))
        unknown = [folder.classes[k] for k in used if folder.classes[k] not in self.classes]
        if unknown:
            raise ProbeUsageError(f"classes {unknown[:5]} are not among the train classes {self.classes[:10]}")
        self._remap = [self.classes.index(c) if c in self.classes else -1 for c in folder.classes]
        self.indices = range(len(folder)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raw = self.folder.raw(self.indices[i])
        return self.transform(raw.image), self._remap[int(raw.label)]

    def label_of(self, i: int) -> int:
        """The label of item ``i`` in ``classes`` (from the folder's listing when it can, else by reading it)."""
        label_of = getattr(self.folder, "label_of", None)
        label = label_of(self.indices[i]) if label_of else self.folder.raw(self.indices[i], lazy=True).label
        return self._remap[int(label)]

    def raw_item(self, i: int) -> tuple[Any, int]:
        """``(image, label)`` of item ``i`` before any transform: the folder's image with only its header read
        (a ``LazyImage``; decoded by the transform, at a reduced JPEG size when it allows), for an augmentation
        to crop from the full image (:class:`AugmentedImages`). A corrupt file raises ``BadSample``."""
        raw = self.folder.raw(self.indices[i], lazy=True)
        return raw.image, self._remap[int(raw.label)]


def heldout_shapes(image_size: int, train_size: int = 2000, test_size: int = 1000) -> tuple[SourceImages, SourceImages]:
    """The bundled probe data: ``ShapesDataset("heldout")`` items ``[0, train_size)`` to train the probe and
    ``[train_size, train_size + test_size)`` to test it, at ``image_size``. Label: the kind of the first shape
    (5 classes). The heldout split never shares a draw with the training split.

    NOTE: in a two-shape scene (half of them) nothing in the pixels says which shape is "first", so the
    best possible top-1 is about 80% (0.5 + 0.5 * (0.2 + 0.8 * 0.5)). What trained and random aimv2-demo
    trunks reach on it (2000/1000, default settings) is in the README's probe section."""
    from .data import ShapesDataset

    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProbeUsageError(f"{name} must be a positive int, got {value!r}")
    ds = ShapesDataset("heldout", size=train_size + test_size, image_size=image_size, seed=0)
    return SourceImages(ds, range(train_size)), SourceImages(ds, range(train_size, train_size + test_size))


def _as_items(data, name: str):
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return LabelledImages(*data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"{name} must be (images, labels) tensors or a sequence of (image, label) items, "
                        f"got {type(data).__name__}")
    return data


def _normalizer(normalize) -> Callable[[torch.Tensor], torch.Tensor]:
    from .data import Normalize

    if isinstance(normalize, str):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)} or a callable, got {normalize!r}")
        return Normalize(*NORMALIZATIONS[normalize])
    if not callable(normalize):
        raise TypeError(f"normalize must be 'imagenet', 'clip' or a callable, got {type(normalize).__name__}")
    return normalize


# --------------------------------------------------------------------------------------------------------
# Features, probe training, evaluation
# --------------------------------------------------------------------------------------------------------

def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(encoders: nn.Module | Mapping[str, nn.Module],
                     data: tuple[torch.Tensor, torch.Tensor] | _LabelledItems, *,
                     normalize: str | Callable[[torch.Tensor], torch.Tensor] = "imagenet", batch_size: int = 64,
                     feature_dtype: torch.dtype = torch.float32, progress: bool | None = None,
                     desc: str = "features") -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor, int]:
    """Last-layer features of every image, batched, in eval mode without grad (bidirectional attention).

    Args:
        encoders: an ``AIMv2Encoder`` (``images (B, 3, S, S) -> (B, N, D)``), or a mapping name -> encoder to
            run several trunks on the same images (each image is read and normalized once). Each encoder
            runs on its own device (bf16 autocast on CUDA); its train/eval mode is restored afterwards.
        data: ``(images, labels)`` tensors or a sequence of ``(image float32 (3, S, S) in [0, 1], label)``
            items (:class:`LabelledImages`, :class:`SourceImages`, :class:`FolderImages`).
        normalize: ``"imagenet"`` (the training default), ``"clip"``, or a callable on ``(B, 3, S, S)``.
        batch_size: images per forward.
        feature_dtype: dtype of the cached features (float32; bfloat16/float16 halve the memory).
        progress: tqdm bar over the batches; None: only on a terminal.
    Returns:
        ``(features, labels, skipped)``: features ``feature_dtype (M, N, D)`` on the encoder's device (a dict
        name -> features when ``encoders`` is a mapping), labels int64 ``(M,)`` on the CPU, and the number of
        items skipped because they raised ``BadSample`` (``M = len(data) - skipped``).
    """
    tqdm = require("tqdm.auto", "the probe's progress bar").tqdm

    from .data import BadSample  # one unreadable image: skipped and counted

    single = isinstance(encoders, nn.Module)
    encs = {"trunk": encoders} if single else dict(encoders)
    if not encs:
        raise ValueError("encoders must hold at least one encoder")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    items, norm = _as_items(data, "data"), _normalizer(normalize)
    n = len(items)
    modes = {name: enc.training for name, enc in encs.items()}
    feats: dict[str, torch.Tensor] = {}
    labels = torch.empty(n, dtype=torch.long)
    count = skipped = 0
    try:
        for enc in encs.values():
            enc.eval()
        for start in tqdm(range(0, n, batch_size), disable=None if progress is None else not progress,
                          desc=desc, unit="batch", dynamic_ncols=True):
            images, batch_labels = [], []
            for i in range(start, min(start + batch_size, n)):
                try:
                    image, label = items[i]
                except BadSample:
                    skipped += 1
                    continue
                if int(label) < 0:
                    raise ValueError(f"data item {i} has no label ({int(label)}): the probe needs labelled images")
                images.append(image)
                batch_labels.append(int(label))
            if not images:
                continue
            shapes = {tuple(im.shape) for im in images}
            if len(shapes) != 1 or len(next(iter(shapes))) != 3:
                raise ValueError(f"data images must all be (3, S, S) of one size, got {sorted(shapes)[:3]}")
            x = norm(torch.stack(images).float())
            labels[count: count + len(images)] = torch.tensor(batch_labels, dtype=torch.long)
            for name, enc in encs.items():
                device = _device_of(enc)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = enc(x.to(device, non_blocking=True))
                if name not in feats:  # allocated once the token count N and width D are known
                    feats[name] = torch.empty((n, *out.shape[1:]), dtype=feature_dtype, device=device)
                feats[name][count: count + out.shape[0]] = out.to(feature_dtype)
            count += len(images)
    finally:
        for name, enc in encs.items():
            enc.train(modes[name])
    if count == 0:
        raise ProbeDataError(f"data has no readable image ({skipped} skipped of {n})")
    feats = {name: f[:count] for name, f in feats.items()}
    return (feats["trunk"] if single else feats), labels[:count], skipped


def probe_lr(step: int, total_steps: int, peak: float, warmup_steps: int, min_lr: float) -> float:
    """The probe's schedule: linear warm-up to ``peak`` over ``warmup_steps`` steps (from ``peak/warmup``),
    then cosine from ``peak`` down to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass
class ProbeSettings:
    """Hyper-parameters of the probe (defaults: a few seconds on 2 CPU cores for the demo preset).

    The paper (docs/aimv2-reference.md §4) sweeps lr in [5e-5, 2e-3] and wd in {0.05, 0.1}, 100 epochs, batch
    1024/512, with augmentation; here the features are cached, so there is no augmentation and no sweep (that
    protocol: :class:`PaperProbeSettings` and :func:`run_paper_probes`).
    """
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    min_lr: float = 1e-5
    grad_clip: float = 3.0
    betas: tuple[float, float] = (0.9, 0.999)
    use_batch_norm: bool = True
    num_queries: int = 1

    def check(self) -> None:
        _check_fields(self, ints=("epochs", "batch_size", "num_queries"),
                      numbers=(("lr", False), ("weight_decay", True), ("warmup_epochs", True), ("min_lr", True),
                               ("grad_clip", False)))
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                settings: ProbeSettings | None = None, *, seed: int = 0,
                progress: bool | None = None) -> AttentionPoolingClassifier:
    """Train an :class:`AttentionPoolingClassifier` on cached features (cross-entropy, AdamW, warm-up + cosine).

    Args:
        features: float ``(M, N, D)`` (any float dtype; batches are cast to float32), M >= 2. The probe is
            built and trained on their device.
        labels: int ``(M,)`` in ``[0, num_classes)``.
        num_classes: classifier outputs.
        settings: :class:`ProbeSettings` (None: the defaults).
        seed: the probe's initialisation and the batch order; the same seed gives the same probe.
        progress: tqdm bar over the epochs; None: only on a terminal.
    Returns:
        The trained probe, in eval mode. Weight decay applies to the k/v/linear weights, not to biases or
        the query. Each epoch visits every sample once, in ``ceil(M / batch_size)`` near-equal batches.
    """
    tqdm = require("tqdm.auto", "the probe's progress bar").tqdm

    settings = settings or ProbeSettings()
    settings.check()
    if features.dim() != 3 or not features.is_floating_point():
        raise ValueError(f"features must be a float tensor (M, N, D), got {features.dtype} {tuple(features.shape)}")
    m = features.shape[0]
    if labels.shape != (m,):
        raise ValueError(f"labels must have shape ({m},), got {tuple(labels.shape)}")
    if m < 2:
        raise ProbeDataError(f"the probe needs at least 2 training images, got {m}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    device = features.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = AttentionPoolingClassifier(features.shape[-1], num_classes, num_queries=settings.num_queries,
                                           use_batch_norm=settings.use_batch_norm)
    probe = probe.to(device).train()
    decay = [p for name, p in probe.named_parameters() if name.endswith("weight")]
    no_decay = [p for name, p in probe.named_parameters() if not name.endswith("weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.lr, betas=settings.betas)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(m / settings.batch_size)
    total = per_epoch * settings.epochs
    warmup = round(settings.warmup_epochs * per_epoch)
    labels = labels.to(device)
    step = 0
    for _ in tqdm(range(settings.epochs), disable=None if progress is None else not progress, desc="probe",
                  unit="epoch", dynamic_ncols=True):
        for idx in torch.tensor_split(torch.randperm(m, generator=gen), per_epoch):
            lr = probe_lr(step, total, settings.lr, warmup, settings.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = idx.to(device)
            logits, _ = probe_forward(probe, features[idx].float())
            loss = F.cross_entropy(logits, labels[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(probe.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return probe.eval()


@torch.no_grad()
def evaluate_probe(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in ``[0, 1]`` of ``probe`` (eval mode) on features ``(M, N, D)`` with labels int ``(M,)``."""
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"features and labels must hold the same non-zero number of samples, got "
                         f"{features.shape[0]} and {labels.shape[0]}")
    probe.eval()
    labels = labels.to(features.device)
    correct = 0
    for start in range(0, features.shape[0], batch_size):
        logits, _ = probe_forward(probe, features[start: start + batch_size].float())
        correct += int((logits.argmax(-1) == labels[start: start + batch_size]).sum())
    return correct / features.shape[0]


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, test)`` (int64, sorted): per class, a seeded shuffle puts ``round(n_c * fraction)``
    samples in test (at least 1 when the class has 2 or more, and always at least 1 left to train)."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = min(max(round(idx.numel() * test_fraction), 1 if idx.numel() >= 2 else 0), idx.numel() - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def run_probes(encoders: Mapping[str, nn.Module], train: tuple[torch.Tensor, torch.Tensor] | _LabelledItems,
               test: tuple[torch.Tensor, torch.Tensor] | _LabelledItems | None = None, *,
               num_classes: int | None = None, test_fraction: float = 0.2,
               normalize: str | Callable[[torch.Tensor], torch.Tensor] = "imagenet",
               settings: ProbeSettings | None = None, seed: int = 0, extract_batch_size: int = 64,
               feature_dtype: torch.dtype = torch.float32, progress: bool | None = None) -> dict[str, dict]:
    """:func:`run_probe` for several trunks on the same images and with the same probe settings and seed
    (each image is read and normalized once, then fed to every trunk). Returns name -> the result dict of
    :func:`run_probe`; its ``extract_s`` is the extraction time divided evenly among the trunks."""
    if isinstance(encoders, nn.Module):
        encoders = {"trunk": encoders}
    settings = settings or ProbeSettings()
    settings.check()
    if test is None and not (isinstance(test_fraction, float | int) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    t0 = time.perf_counter()
    tr_feats, tr_labels, tr_skipped = extract_features(encoders, train, normalize=normalize,
                                                       batch_size=extract_batch_size, feature_dtype=feature_dtype,
                                                       progress=progress, desc="train features")
    te_skipped = 0
    if test is None:
        tr_idx, te_idx = _stratified_split(tr_labels, float(test_fraction), seed)
        if te_idx.numel() == 0:
            raise ProbeDataError("the split left no test image: give more images or a test set")
        te_labels, tr_labels = tr_labels[te_idx], tr_labels[tr_idx]
        te_feats = {k: f[te_idx.to(f.device)] for k, f in tr_feats.items()}
        tr_feats = {k: f[tr_idx.to(f.device)] for k, f in tr_feats.items()}
    else:
        te_feats, te_labels, te_skipped = extract_features(encoders, test, normalize=normalize,
                                                           batch_size=extract_batch_size,
                                                           feature_dtype=feature_dtype, progress=progress,
                                                           desc="test features")
    extract_s = time.perf_counter() - t0
    top = int(max(tr_labels.max(), te_labels.max()))
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        raise ValueError(f"num_classes is {num_classes} but the data has label {top}")
    majority = int(torch.bincount(tr_labels, minlength=num_classes).argmax())
    results = {}
    for name in tr_feats:
        t1 = time.perf_counter()
        probe = train_probe(tr_feats[name], tr_labels, num_classes, settings, seed=seed, progress=progress)
        train_s = time.perf_counter() - t1
        results[name] = {
            "top1": evaluate_probe(probe, te_feats[name], te_labels),
            "train_top1": evaluate_probe(probe, tr_feats[name], tr_labels),
            "majority_top1": float((te_labels == majority).float().mean()),
            "num_train": int(tr_labels.numel()), "num_test": int(te_labels.numel()),
            "skipped": tr_skipped + te_skipped, "num_classes": num_classes,
            "tokens": int(tr_feats[name].shape[1]), "dim": int(tr_feats[name].shape[2]),
            "extract_s": round(extract_s / len(tr_feats), 3), "train_s": round(train_s, 3),
            "seed": seed, "settings": dataclasses.asdict(settings), "probe": probe,
        }
    return results


def run_probe(encoder: nn.Module, train: tuple[torch.Tensor, torch.Tensor] | _LabelledItems,
              test: tuple[torch.Tensor, torch.Tensor] | _LabelledItems | None = None, **kwargs: Any) -> dict:
    """Frozen-trunk attentive probe: top-1 of ``encoder``'s last-layer features on labelled images.

    Args:
        encoder: an ``AIMv2Encoder`` (``images (B, 3, S, S) -> features (B, N, D)``), used frozen on its own
            device (eval mode, no grad; its mode is restored afterwards).
        train: images to train the probe on: ``(images float (M, 3, S, S) in [0, 1], labels int (M,))``
            tensors, or a sequence of ``(image, label)`` items (:class:`LabelledImages`,
            :class:`SourceImages`, :class:`FolderImages`, :func:`heldout_shapes`). S must be a multiple of
            the patch size.
        test: the images to report top-1 on, in the same forms; None: a seeded stratified split of
            ``train`` (``test_fraction`` of each class to test).
        num_classes: None: ``1 + the largest label``.
        test_fraction: when ``test`` is None, in ``(0, 1)``; default 0.2.
        normalize: ``"imagenet"`` (default, as in training), ``"clip"`` or a callable on ``(B, 3, S, S)``.
        settings: :class:`ProbeSettings` (None: defaults).
        seed: probe init, batch order and the split; the same seed and data give the same result on a device.
        extract_batch_size, feature_dtype, progress: see :func:`extract_features`.
    Returns:
        ``dict(top1, train_top1, majority_top1, num_train, num_test, skipped, num_classes, tokens, dim,
        extract_s, train_s, seed, settings, probe)``: accuracies are floats in ``[0, 1]`` (``majority_top1``:
        always answering the most frequent train class), ``probe`` the trained
        :class:`AttentionPoolingClassifier`, times in seconds.
    """
    return run_probes({"trunk": encoder}, train, test, **kwargs)["trunk"]


# --------------------------------------------------------------------------------------------------------
# The paper's protocol: images augmented on the fly, a sweep of probes sharing each trunk forward
# --------------------------------------------------------------------------------------------------------

PAPER_LRS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3)
PAPER_WEIGHT_DECAYS = (0.05, 0.1)


@dataclasses.dataclass
class PaperProbeSettings:
    """The AIMv2 paper's attentive-probe recipe (Table A2); every default is the paper's ImageNet-1k value.

    A sweep: one probe per ``(lr, weight_decay)`` in ``lrs x weight_decays`` (lr-major order, :meth:`sweep`),
    each with its own AdamW (betas ``betas``; weight decay on the k/v/linear weights, as :func:`train_probe`),
    linear warm-up over ``warmup_epochs`` then cosine to ``min_lr``, gradient clipping at ``grad_clip``. The
    augmentation: ``aimv2.data.randaugment.ProbeTrainTransform(scale, ratio, flip, rand_augment,
    color_jitter)``. ``batch_size``: 1024 for IN-1k in the paper, 512 for its other datasets. Epochs visit every
    training image once, in ``ceil(M / batch_size)`` near-equal batches (no batch is dropped).
    """
    epochs: int = 100
    batch_size: int = 1024
    lrs: tuple[float, ...] = PAPER_LRS
    weight_decays: tuple[float, ...] = PAPER_WEIGHT_DECAYS
    warmup_epochs: float = 5.0
    min_lr: float = 1e-5
    grad_clip: float = 3.0
    betas: tuple[float, float] = (0.9, 0.999)
    use_batch_norm: bool = True
    num_queries: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check_fields(self, ints=("epochs", "batch_size", "num_queries"),
                      numbers=(("warmup_epochs", True), ("min_lr", True), ("grad_clip", False),
                               ("color_jitter", True)))
        for name, low_ok in (("lrs", False), ("weight_decays", True)):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)) or not values or any(
                    not _is_number(v) or v < 0 or (v == 0 and not low_ok) for v in values):
                raise ValueError(f"{name} must be a non-empty sequence of "
                                 f"{'non-negative' if low_ok else 'positive'} numbers, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has a repeated value: {values!r}")
        if self.min_lr > min(self.lrs):
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed the smallest lr ({min(self.lrs)})")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip must be in [0, 1], got {self.flip!r}")

    def sweep(self) -> list[tuple[float, float]]:
        """The ``(lr, weight_decay)`` points, lr-major: ``[(lrs[0], wds[0]), (lrs[0], wds[1]), ...]``."""
        return [(float(lr), float(wd)) for lr in self.lrs for wd in self.weight_decays]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(settings: object, *, ints: tuple[str, ...], numbers: tuple[tuple[str, bool], ...]) -> None:
    """ValueError naming the first bad field of ``settings``: ``ints`` must be positive ints, ``numbers`` finite
    numbers, positive (or also 0 where the flag says so)."""
    for name in ints:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, zero_ok in numbers:
        value = getattr(settings, name)
        if not _is_number(value) or value < 0 or (value == 0 and not zero_ok):
            raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} number, got {value!r}")


def _raw_item(items: _LabelledItems, i: int) -> tuple[Any, int]:
    raw = getattr(items, "raw_item", None)
    return raw(i) if raw is not None else items[i]


class AugmentedImages(torch.utils.data.Dataset):
    """Training items augmented per epoch: ``ds[(epoch, i)] -> (image float32 (3, S, S) in [0, 1] or None,
    label, i)``.

    Item ``i``'s image before any transform (``items.raw_item(i)`` when the items have it, e.g.
    :class:`FolderImages`: the full image; else ``items[i]``) goes through ``transform(image, rng)`` with
    ``rng = numpy.random.default_rng([seed, epoch, i])``: an image's augmentation depends on ``(seed, epoch,
    i)`` only (not on the batch, the order or the data-loading worker), and differs from epoch to epoch. An
    unreadable item (``BadSample``) gives ``(None, -1, i)``. Picklable when ``items`` and ``transform`` are
    (the data-loading workers of :func:`run_paper_probes`).
    """

    def __init__(self, items: _LabelledItems, transform: Callable[..., torch.Tensor], seed: int = 0):
        self.items, self.transform, self.seed = items, transform, int(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, int]:
        import numpy as np

        from .data import BadSample

        epoch, i = key
        rng = np.random.default_rng([self.seed, int(epoch), int(i)])
        try:
            image, label = _raw_item(self.items, i)
            return self.transform(image, rng), int(label), int(i)
        except BadSample:
            return None, -1, int(i)


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(epoch, item)`` keys: per epoch a seeded permutation of ``indices`` split into
    ``ceil(M / batch_size)`` near-equal batches (as :func:`train_probe` batches cached features)."""

    def __init__(self, indices: Sequence[int], batch_size: int, epochs: int, seed: int):
        self.indices, self.epochs, self.seed = list(indices), epochs, seed
        self.per_epoch = math.ceil(len(self.indices) / batch_size)

    def __len__(self) -> int:
        return self.epochs * self.per_epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for epoch in range(self.epochs):
            for chunk in torch.tensor_split(torch.randperm(len(self.indices), generator=gen), self.per_epoch):
                yield [(epoch, self.indices[j]) for j in chunk.tolist()]


def _collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    good = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in good]) if good else None
    return images, torch.tensor([b[1] for b in good], dtype=torch.long), [b[2] for b in batch if b[0] is None]


class _Subset:
    """Items ``indices`` of ``items`` (keeps ``raw_item`` and ``label_of``)."""

    def __init__(self, items: _LabelledItems, indices: Sequence[int]):
        self.items, self.indices = items, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[self.indices[i]]

    def raw_item(self, i: int) -> tuple[Any, int]:
        return _raw_item(self.items, self.indices[i])

    def label_of(self, i: int) -> int:
        return _label_of(self.items, self.indices[i])


def _label_of(items: _LabelledItems, i: int) -> int:
    label_of = getattr(items, "label_of", None)
    return int(label_of(i)) if label_of is not None else int(items[i][1])


def _item_labels(items: _LabelledItems) -> tuple[list[int], list[int], int]:
    """``(indices, labels, skipped)`` of the readable items (labels without decoding when the items can)."""
    from .data import BadSample

    indices, labels, skipped = [], [], 0
    for i in range(len(items)):
        try:
            label = _label_of(items, i)
        except BadSample:
            skipped += 1
            continue
        if label < 0:
            raise ValueError(f"data item {i} has no label ({label}): the probe needs labelled images")
        indices.append(i)
        labels.append(label)
    return indices, labels, skipped


def _mean_of(normalize: str | Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, ...]:
    from .data import IMAGENET_MEAN

    if isinstance(normalize, str) and normalize in NORMALIZATIONS:
        return tuple(NORMALIZATIONS[normalize][0])
    mean = getattr(normalize, "mean", None)
    if isinstance(mean, torch.Tensor) and mean.numel() == 3:
        return tuple(float(v) for v in mean.flatten())
    return IMAGENET_MEAN


def paper_transform(image_size: int, settings: PaperProbeSettings | None = None,
                    normalize: str | Callable[[torch.Tensor], torch.Tensor] = "imagenet",
                    ) -> Callable[..., torch.Tensor]:
    """The training augmentation of :func:`run_paper_probes`: ``ProbeTrainTransform`` at ``image_size`` with
    ``settings``' crop, flip, RandAugment and colour jitter; RandAugment's fill is ``normalize``'s mean."""
    from .data.randaugment import ProbeTrainTransform

    s = settings or PaperProbeSettings()
    return ProbeTrainTransform(image_size, scale=s.scale, ratio=s.ratio, flip=s.flip, rand_augment=s.rand_augment,
                               color_jitter=s.color_jitter or None, mean=_mean_of(normalize))


def _first_side(items: _LabelledItems) -> int:
    """The side of the first readable image of ``items`` (they are all of one size: ``extract_features``)."""
    from .data import BadSample

    for i in range(len(items)):
        try:
            return int(items[i][0].shape[-1])
        except BadSample:
            continue
    raise ProbeDataError("data has no readable image")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BEST_OF_SWEEP_NOTE = ("best = the sweep point with the highest top-1 on the evaluation split itself, as the paper "
                      "reports; optimistic (the split that scores the probe also chose its lr and weight decay)")


def run_paper_probes(encoders: nn.Module | Mapping[str, nn.Module],
                     train: tuple[torch.Tensor, torch.Tensor] | _LabelledItems,
                     test: tuple[torch.Tensor, torch.Tensor] | _LabelledItems | None = None, *,
                     num_classes: int | None = None, test_fraction: float = 0.2,
                     normalize: str | Callable[[torch.Tensor], torch.Tensor] = "imagenet",
                     settings: PaperProbeSettings | None = None, seed: int = 0, image_size: int | None = None,
                     transform: Callable[..., torch.Tensor] | None = None, extract_batch_size: int = 64,
                     feature_dtype: torch.dtype = torch.float32, workers: int = 0,
                     progress: bool | None = None) -> dict[str, dict]:
    """The paper's attentive-probe protocol: frozen trunks, training images augmented every epoch, and a sweep of
    probes over learning rate x weight decay that share each trunk forward.

    Each step: a batch of training images is augmented (:class:`AugmentedImages`; once for all trunks),
    normalized, run through each frozen trunk once (eval mode, no grad, bf16 autocast on CUDA; in chunks of
    ``extract_batch_size`` images), and those features train every probe of the sweep (one AdamW step each, at
    its own lr and weight decay). A step costs the trunk's forward on the batch (the bulk: about 165 GFLOPs per
    image for AIMv2-L at 224 px) plus, per probe, the head's forward and backward (``O(N D h + D^2 + D C)`` per
    image with :func:`probe_forward`: about 38 MFLOPs for AIMv2-L and 1000 classes, 0.02% of the trunk's; the
    paper's 14 probes together 0.3%), plus the CPU augmentation (a few ms per image: use ``workers`` on a GPU
    machine). Without the sharing, a sweep of P probes would cost P trunk passes. Test images are not augmented; their
    features are extracted once per trunk and every probe is scored on them at the end.

    Args:
        encoders: an ``AIMv2Encoder`` or a mapping name -> encoder (all see the same augmented images); each
            used frozen on its own device, its train/eval mode restored afterwards.
        train, test, num_classes, test_fraction, normalize, seed, extract_batch_size, feature_dtype,
            progress: as :func:`run_probes` (``feature_dtype``: of the cached test features; ``seed``: the
            probes' init (the same for every sweep point), batch order, augmentation and the split).
        settings: :class:`PaperProbeSettings` (None: the paper's values).
        image_size: the side of the augmented crops; None: the size of the first test image.
        transform: ``transform(image, rng) -> float32 (3, S, S)`` for the training images; None:
            :func:`paper_transform` (the paper's augmentation).
        workers: data-loading processes for the augmentation (0: in this process). The results do not depend
            on it.
    Returns:
        name -> ``dict(protocol="paper", top1 (the best sweep point's), best=dict(index, lr, weight_decay,
        top1), best_note, sweep=[dict(lr, weight_decay, top1, train_top1_augmented, final_loss, epoch_loss)],
        majority_top1, num_train, num_test, skipped, num_classes, tokens, dim, steps, trunk_forwards,
        extract_s, train_s, time_s=dict(data, trunk, probes), seed, settings, augmentation, probes)``:
        ``train_top1_augmented`` is top-1 on the augmented batches of the last epoch (probes in training mode),
        ``epoch_loss`` the mean cross-entropy of each epoch, ``trunk_forwards`` the trunk's calls during training
        (one per chunk of each batch, whatever the sweep size), ``probes`` the trained
        :class:`AttentionPoolingClassifier` per sweep point, in eval mode.
    """
    tqdm = require("tqdm.auto", "the probe's progress bar").tqdm

    single = isinstance(encoders, nn.Module)
    encs = {"trunk": encoders} if single else dict(encoders)
    if not encs:
        raise ValueError("encoders must hold at least one encoder")
    settings = settings or PaperProbeSettings()
    settings.check()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if test is None and not (isinstance(test_fraction, float | int) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    norm = _normalizer(normalize)
    train_items = _as_items(train, "train")
    indices, labels, skipped = _item_labels(train_items)
    test_items = _as_items(test, "test") if test is not None else None
    if test_items is None:
        tr, te = _stratified_split(torch.tensor(labels, dtype=torch.long), float(test_fraction), seed)
        if te.numel() == 0:
            raise ProbeDataError("the split left no test image: give more images or a test set")
        test_items = _Subset(train_items, [indices[k] for k in te.tolist()])
        indices, labels = [indices[k] for k in tr.tolist()], [labels[k] for k in tr.tolist()]
    if len(indices) < 2:
        raise ProbeDataError(f"the probe needs at least 2 training images, got {len(indices)}")

    t0 = time.perf_counter()
    te_feats, te_labels, te_skipped = extract_features(encs, test_items, normalize=norm,
                                                       batch_size=extract_batch_size, feature_dtype=feature_dtype,
                                                       progress=progress, desc="test features")
    extract_s = time.perf_counter() - t0
    tr_labels = torch.tensor(labels, dtype=torch.long)
    top = int(max(tr_labels.max(), te_labels.max()))
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        raise ValueError(f"num_classes is {num_classes} but the data has label {top}")
    majority = int(torch.bincount(tr_labels, minlength=num_classes).argmax())
    if transform is None:
        transform = paper_transform(image_size or _first_side(test_items), settings, normalize)

    sweep = settings.sweep()
    devices = {name: _device_of(enc) for name, enc in encs.items()}
    dim = {name: int(f.shape[-1]) for name, f in te_feats.items()}
    heads: dict[str, list[AttentionPoolingClassifier]] = {}
    optimizers: dict[str, list[torch.optim.Optimizer]] = {}
    for name in encs:
        heads[name], optimizers[name] = [], []
        for lr, wd in sweep:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # every sweep point starts from the same probe
                probe = AttentionPoolingClassifier(dim[name], num_classes, num_queries=settings.num_queries,
                                                   use_batch_norm=settings.use_batch_norm)
            probe = probe.to(devices[name]).train()
            decay = [p for n, p in probe.named_parameters() if n.endswith("weight")]
            no_decay = [p for n, p in probe.named_parameters() if not n.endswith("weight")]
            heads[name].append(probe)
            optimizers[name].append(torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                                                       {"params": no_decay, "weight_decay": 0.0}],
                                                      lr=lr, betas=settings.betas))

    sampler = _EpochBatches(indices, settings.batch_size, settings.epochs, seed)
    total, per_epoch = len(sampler), sampler.per_epoch
    warmup = round(settings.warmup_epochs * per_epoch)
    loader = torch.utils.data.DataLoader(AugmentedImages(train_items, transform, seed), batch_sampler=sampler,
                                         num_workers=workers, collate_fn=_collate,
                                         pin_memory=any(d.type == "cuda" for d in devices.values()))
    zeros = {name: [torch.zeros((), device=devices[name]) for _ in sweep] for name in encs}
    ep_loss = {name: [z.clone() for z in zeros[name]] for name in encs}
    ep_correct = {name: [z.clone() for z in zeros[name]] for name in encs}
    epoch_loss: dict[str, list[list[float]]] = {name: [[] for _ in sweep] for name in encs}
    last_correct: dict[str, list[float]] = {name: [0.0] * len(sweep) for name in encs}
    forwards = dict.fromkeys(encs, 0)
    bad: set[int] = set()
    seen = 0
    times = {"data": 0.0, "trunk": 0.0, "probes": 0.0}
    modes = {name: enc.training for name, enc in encs.items()}
    bar = tqdm(total=total, disable=None if progress is None else not progress, desc="paper probe", unit="step",
               dynamic_ncols=True)
    t_train = time.perf_counter()
    try:
        for enc in encs.values():
            enc.eval()
        step = 0
        t_data = time.perf_counter()
        for images, batch_labels, batch_bad in loader:
            times["data"] += time.perf_counter() - t_data
            bad.update(batch_bad)
            if images is not None:
                x = norm(images.float())
                seen += len(batch_labels)
                for name, enc in encs.items():
                    device = devices[name]
                    t1 = time.perf_counter()
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                         enabled=device.type == "cuda"):
                        chunks = []
                        for xc in torch.split(x, extract_batch_size):
                            chunks.append(enc(xc.to(device, non_blocking=True)).float())
                            forwards[name] += 1
                    feats = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
                    y = batch_labels.to(device, non_blocking=True)
                    _sync(device)
                    t2 = time.perf_counter()
                    times["trunk"] += t2 - t1
                    for k, ((lr, _), probe, opt) in enumerate(zip(sweep, heads[name], optimizers[name])):
                        for group in opt.param_groups:
                            group["lr"] = probe_lr(step, total, lr, warmup, settings.min_lr)
                        logits, _ = probe_forward(probe, feats)
                        loss = F.cross_entropy(logits, y)
                        loss.backward()
                        nn.utils.clip_grad_norm_(probe.parameters(), settings.grad_clip)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        ep_loss[name][k] += loss.detach() * len(y)
                        ep_correct[name][k] += (logits.detach().argmax(-1) == y).sum()
                    _sync(device)
                    times["probes"] += time.perf_counter() - t2
            step += 1
            bar.update(1)
            if step % per_epoch == 0:  # the end of an epoch: one sync for the running sums
                for name in encs:
                    losses = torch.stack(ep_loss[name]).tolist()
                    correct = torch.stack(ep_correct[name]).tolist()
                    for k in range(len(sweep)):
                        epoch_loss[name][k].append(losses[k] / max(1, seen))
                        last_correct[name][k] = correct[k] / max(1, seen)
                        ep_loss[name][k].zero_()
                        ep_correct[name][k].zero_()
                best_loss = min(v[-1] for per in epoch_loss.values() for v in per)
                bar.set_postfix(epoch=step // per_epoch, best_loss=f"{best_loss:.3f}")
                seen = 0
            t_data = time.perf_counter()
    finally:
        bar.close()
        for name, enc in encs.items():
            enc.train(modes[name])
    train_s = time.perf_counter() - t_train
    num_train = len(indices) - len(bad)
    if num_train < 1:
        raise ProbeDataError(f"train data has no readable image ({skipped + len(bad)} skipped)")
    results = {}
    for name in encs:
        points = []
        for k, ((lr, wd), probe) in enumerate(zip(sweep, heads[name])):
            probe.eval()
            points.append({"lr": lr, "weight_decay": wd, "top1": evaluate_probe(probe, te_feats[name], te_labels),
                           "train_top1_augmented": last_correct[name][k],
                           "final_loss": epoch_loss[name][k][-1] if epoch_loss[name][k] else None,
                           "epoch_loss": [round(v, 6) for v in epoch_loss[name][k]]})
        best = max(range(len(points)), key=lambda k: points[k]["top1"])  # ties: the first in sweep order
        results[name] = {
            "protocol": "paper", "top1": points[best]["top1"],
            "best": {"index": best, "lr": points[best]["lr"], "weight_decay": points[best]["weight_decay"],
                     "top1": points[best]["top1"]},
            "best_note": BEST_OF_SWEEP_NOTE, "sweep": points,
            "majority_top1": float((te_labels == majority).float().mean()),
            "num_train": num_train, "num_test": int(te_labels.numel()),
            "skipped": skipped + len(bad) + te_skipped, "num_classes": num_classes,
            "tokens": int(te_feats[name].shape[1]), "dim": dim[name], "steps": total,
            "trunk_forwards": forwards[name], "extract_s": round(extract_s / len(encs), 3),
            "train_s": round(train_s, 3), "time_s": {k: round(v, 3) for k, v in times.items()}, "seed": seed,
            "settings": dataclasses.asdict(settings), "augmentation": repr(transform), "probes": heads[name],
        }
    return results


def run_paper_probe(encoder: nn.Module, train: tuple[torch.Tensor, torch.Tensor] | _LabelledItems,
                    test: tuple[torch.Tensor, torch.Tensor] | _LabelledItems | None = None,
                    **kwargs: Any) -> dict:
    """:func:`run_paper_probes` for one trunk: its result dict (every sweep point, the best, the trained probes)."""
    return run_paper_probes({"trunk": encoder}, train, test, **kwargs)["trunk"]


# --------------------------------------------------------------------------------------------------------
# Trunks
# --------------------------------------------------------------------------------------------------------

def random_encoder(config: str | AIMv2Config | EncoderConfig, *, seed: int = 0, backend: str = "auto") -> nn.Module:
    """A randomly initialised trunk, in eval mode on the CPU (the baseline of the probe).

    ``config``: a preset name or an ``AIMv2Config``: the encoder of ``AIMv2(config)`` built under
    ``torch.manual_seed(seed)``, i.e. exactly the trunk a training run with that ``--seed`` starts from; or
    an ``EncoderConfig``: ``AIMv2Encoder`` with its training initialisation (``init_weights``). The global
    RNG state is left untouched.
    """
    from .config import PRESETS, AIMv2Config, EncoderConfig
    from .model import AIMv2, AIMv2Encoder

    if isinstance(config, str):
        if config not in PRESETS:
            raise ProbeUsageError(f"unknown preset {config!r}; choose one of: {', '.join(sorted(PRESETS))}")
        config = AIMv2Config.from_name(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(config, AIMv2Config):
            return AIMv2(dataclasses.replace(config, backend=backend)).encoder.eval()
        if isinstance(config, EncoderConfig):
            return AIMv2Encoder(config, backend).eval()  # the constructor runs init_weights
    raise TypeError(f"config must be a preset name, an AIMv2Config or an EncoderConfig, got {type(config).__name__}")
