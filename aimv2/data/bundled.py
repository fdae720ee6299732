"""The bundled data: a procedural image-caption dataset of coloured shapes, and the tensor-source protocol.

Nothing here downloads anything. ``ShapesDataset`` draws flat-coloured scenes of one or two shapes and
captions them from a small grammar that names every shape's size, colour, kind and position, so both
halves of the AIMv2 objective have real signal: the pixel loss (edges and colours to predict from the
prefix patches) and the caption loss (what was drawn, where). Real sources (webdataset shards, image
folders, CSV files) are in ``sources``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["Sample", "ImageTextSource", "ShapeSpec", "Scene", "ShapesDataset", "build_dataset"]


@dataclasses.dataclass
class Sample:
    """One image-caption pair: ``image`` float32 ``(3, H, W)`` in ``[0, 1]``; ``label`` -1 when unknown."""

    image: torch.Tensor
    caption: str
    label: int = -1


@runtime_checkable
class ImageTextSource(Protocol):
    """A map-style image-caption source: ``len(src)`` samples; ``src[i]`` is a ``Sample`` (0 <= i < len)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {  # six hues 60 degrees apart, all far from the low-saturation backgrounds
    "red": (0.90, 0.12, 0.12),
    "yellow": (0.95, 0.85, 0.15),
    "green": (0.15, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.60, 0.20, 0.80),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
SIZE_FRACTION = (0.22, 0.40)  # half-extent of a shape as a fraction of a grid cell
POSITIONS = (  # cell index = 3 * row + column
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
TEMPLATES = ("{}.", "a picture of {}.", "there is {}.", "an image showing {}.")
SPLITS = {"train": 0, "heldout": 1}
DEFAULT_SIZES = {"train": 100_000, "heldout": 10_000}
_LONGEST_PHRASE = max(
    len(f"a {z} {c} {k} {p}") for z in SIZES for c in COLOUR_NAMES for k in SHAPES for p in POSITIONS
)
# Upper bound on len(caption) (ASCII, so also on its UTF-8 bytes): 109. A byte tokenizer needs
# context_length > this to never truncate a caption; 77 cuts about 84% of two-shape captions.
MAX_CAPTION_CHARS = max(len(t) - 2 for t in TEMPLATES) + 2 * _LONGEST_PHRASE + len(" and ")
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
_SQRT3_2 = math.sqrt(3.0) / 2.0


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One shape: indices into ``SHAPES``, ``COLOUR_NAMES``, ``SIZES``, ``POSITIONS`` (``cell``), and its
    centre ``(cx, cy)`` and half-extent ``radius`` in pixels (pixel ``(r, c)`` has its centre at
    ``(c + 0.5, r + 0.5)``)."""

    kind: int
    colour: int
    size: int
    cell: int
    cx: float
    cy: float
    radius: float

    def phrase(self) -> str:
        """E.g. ``"a large red circle at the top left"``."""
        return f"a {SIZES[self.size]} {COLOUR_NAMES[self.colour]} {SHAPES[self.kind]} {POSITIONS[self.cell]}"

    def anchor(self) -> tuple[int, int]:
        """``(row, col)`` of a pixel fully covered by the shape (for a ring, a point on the band), so it has
        exactly the shape's colour; guaranteed for ``image_size >= 56`` (thin arms may be partial below)."""
        x = self.cx + (0.75 * self.radius if SHAPES[self.kind] == "ring" else 0.0)
        return int(self.cy), int(x)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene: flat ``background`` RGB in ``[0, 1]``, 1 or 2 ``shapes`` (the first is the main one, whose
    kind is the label) in distinct cells, and the caption ``template`` index into ``TEMPLATES``."""

    background: tuple[float, float, float]
    shapes: tuple[ShapeSpec, ...]
    template: int


def _signed_distance(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside) of a shape of half-extent ``r`` centred at 0.

    ``dx`` is ``(1, w)`` and ``dy`` ``(h, 1)``; the result broadcasts to ``(h, w)``. Exact along edges,
    which is all the one-pixel anti-aliasing ramp needs.
    """
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if kind == "square":
        return np.maximum(ax, ay) - 0.85 * r
    if kind == "triangle":  # equilateral, pointing up, circumradius r, centroid at 0
        return np.maximum(dy - 0.5 * r, _SQRT3_2 * ax - 0.5 * dy - 0.5 * r)
    if kind == "cross":  # a plus sign, arms of half-width 0.3 r
        w = 0.3 * r
        return np.minimum(np.maximum(ax - r, ay - w), np.maximum(ax - w, ay - r))
    if kind == "ring":  # outer radius r, inner radius r / 2
        return np.abs(np.sqrt(dx * dx + dy * dy) - 0.75 * r) - 0.25 * r
    raise AssertionError(kind)


class ShapesDataset:
    """Procedural scenes of coloured shapes with exact captions; deterministic, needs no download.

    Sample ``i`` of split ``split`` depends only on ``(seed, split, i)`` (and ``image_size``): its scene is
    drawn from ``numpy.random.default_rng([seed, split_id, i])``, so the train and heldout streams never
    share a draw. A scene is a flat background colour (no per-pixel noise, which per-patch normalization
    would turn into unpredictable targets) with 1 or 2 shapes on a 3x3 grid, each one of ``SHAPES``
    (5 kinds) in one of ``COLOUR_NAMES`` (6), ``SIZES`` (2) and ``POSITIONS`` (9 cells), anti-aliased with
    a one-pixel ramp. The caption names every shape, e.g. ``"a picture of a large red circle at the top
    left and a small blue square in the center."``; ``label`` is the kind of the first-named shape.
    Captions are at most ``max_caption_chars`` (109) ASCII characters: under 30 tokens of a 100-piece BPE
    SentencePiece model trained on them, but more than 77 bytes for most two-shape captions. The scene of
    an index does not depend on ``image_size``; only its pixels do.

    Args:
        split: ``"train"`` or ``"heldout"``.
        size: number of samples; default 100_000 (train) or 10_000 (heldout).
        image_size: side in pixels, any int >= 28 (use a multiple of the patch size, 14, for the model).
        seed: non-negative int.

    ``ds[i]`` is a ``Sample`` (image float32 ``(3, image_size, image_size)`` in ``[0, 1]``).
    """

    classes = list(SHAPES)
    max_caption_chars = MAX_CAPTION_CHARS
    num_classes = len(SHAPES)
    colours = list(COLOUR_NAMES)

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 112, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        size = DEFAULT_SIZES[split] if size is None else size
        for name, value, low in (("size", size, 1), ("image_size", image_size, 28), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.split, self.size, self.image_size, self.seed = split, int(size), int(image_size), int(seed)
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._ys, self._xs = coords[:, None], coords[None, :]

    def __len__(self) -> int:
        return self.size

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = int(index) + (self.size if index < 0 else 0)
        if not 0 <= i < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        return i

    def scene(self, index: int) -> Scene:
        """The scene of sample ``index`` (negative indices count from the end)."""
        # One call for all 18 uniforms of a scene: far cheaper than many small numpy draws.
        u = np.random.default_rng([self.seed, SPLITS[self.split], self._index(index)]).random(18).tolist()
        grey = 0.05 + 0.9 * u[0]
        background = tuple(min(max(grey + 0.12 * (t - 0.5), 0.0), 1.0) for t in u[1:4])
        first = int(u[5] * 9)
        cells = [first] if u[4] < 0.5 else [first, (first + 1 + int(u[6] * 8)) % 9]  # distinct cells
        cell_px = self.image_size / 3.0
        shapes = []
        for cell, (uk, uc, us, ux, uy) in zip(cells, (u[8:13], u[13:18]), strict=False):
            size = int(us * 2)
            shapes.append(ShapeSpec(
                kind=int(uk * len(SHAPES)), colour=int(uc * len(COLOUR_NAMES)), size=size, cell=cell,
                cx=(cell % 3 + 0.5 + 0.12 * (ux - 0.5)) * cell_px,
                cy=(cell // 3 + 0.5 + 0.12 * (uy - 0.5)) * cell_px,
                radius=SIZE_FRACTION[size] * cell_px,
            ))
        template = int(u[7] * len(TEMPLATES))
        return Scene(background=background, shapes=tuple(shapes), template=template)

    def render(self, scene: Scene) -> torch.Tensor:
        """Draw ``scene``: float32 ``(3, image_size, image_size)`` in ``[0, 1]``."""
        s = self.image_size
        out = torch.empty((3, s, s), dtype=torch.float32)
        img = out.numpy()
        img[:] = np.asarray(scene.background, dtype=np.float32)[:, None, None]
        for sh in scene.shapes:
            ext = sh.radius + 1.5
            y0, y1 = max(int(sh.cy - ext), 0), min(int(math.ceil(sh.cy + ext)), s)
            x0, x1 = max(int(sh.cx - ext), 0), min(int(math.ceil(sh.cx + ext)), s)
            dy, dx = self._ys[y0:y1] - sh.cy, self._xs[:, x0:x1] - sh.cx
            cover = np.clip(0.5 - _signed_distance(SHAPES[sh.kind], dx, dy, sh.radius), 0.0, 1.0)
            region = img[:, y0:y1, x0:x1]
            region += cover * (_PALETTE[sh.colour][:, None, None] - region)
        return out

    @staticmethod
    def caption(scene: Scene) -> str:
        """The caption of ``scene``: every shape's size, colour, kind and position, main shape first."""
        return TEMPLATES[scene.template].format(" and ".join(sh.phrase() for sh in scene.shapes))

    def __getitem__(self, index: int) -> Sample:
        scene = self.scene(index)
        return Sample(image=self.render(scene), caption=self.caption(scene), label=scene.shapes[0].kind)

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed})")


def build_dataset(name: str = "shapes", split: str = "train", image_size: int = 112, size: int | None = None,
                  seed: int = 0) -> ImageTextSource:
    """A bundled ``ImageTextSource`` by name. Only ``"shapes"`` (``ShapesDataset``) exists; any other
    ``name`` raises ValueError."""
    if name == "shapes":
        return ShapesDataset(split=split, size=size, image_size=image_size, seed=seed)
    raise ValueError(f"name must be one of ['shapes'], got {name!r}")
