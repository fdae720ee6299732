"""Tests of aimv2.data's bundled shapes dataset and of the pixel normalization."""

import dataclasses

import numpy as np
import pytest
import torch

from aimv2.data import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTextSource,
    Normalize,
    Sample,
    ShapesDataset,
    build_dataset,
)
from aimv2.data.bundled import COLOURS, POSITIONS, SHAPES, SIZE_FRACTION, SIZES


def test_sample_types_and_range():
    ds = ShapesDataset("train", size=50, image_size=112)
    assert isinstance(ds, ImageTextSource) and len(ds) == 50
    assert ds.classes == list(SHAPES) and ds.num_classes == len(SHAPES) == 5
    for i in range(50):
        s = ds[i]
        assert isinstance(s, Sample)
        assert s.image.dtype == torch.float32 and s.image.shape == (3, 112, 112)
        assert s.image.min() >= 0 and s.image.max() <= 1
        assert isinstance(s.caption, str) and s.caption.endswith(".")
        assert len(s.caption) <= ds.max_caption_chars
        assert 0 <= s.label < ds.num_classes
    assert ds[-1].caption == ds[49].caption
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(TypeError, match="index"):
        ds[1.0]


def test_deterministic_and_splits_differ():
    a, b = ShapesDataset("train", size=200, seed=3), ShapesDataset("train", size=200, seed=3)
    for i in (0, 7, 199):
        assert torch.equal(a[i].image, b[i].image) and a[i].caption == b[i].caption
    # The same index in another split or seed is another scene; no heldout image equals a train image.
    held, other_seed = ShapesDataset("heldout", size=200, seed=3), ShapesDataset("train", size=200, seed=4)
    train_imgs = torch.stack([a[i].image for i in range(200)]).flatten(1)
    held_imgs = torch.stack([held[i].image for i in range(200)]).flatten(1)
    assert torch.cdist(held_imgs, train_imgs).min() > 0
    assert sum(a.scene(i) == held.scene(i) for i in range(200)) == 0
    assert sum(a.scene(i) == other_seed.scene(i) for i in range(200)) == 0
    assert len(ShapesDataset("train")) == 100_000 and len(ShapesDataset("heldout")) == 10_000


def test_caption_names_what_is_drawn():
    ds = ShapesDataset("heldout", size=300, image_size=112)
    counts = np.zeros((2, len(SHAPES)), dtype=int)
    for i in range(len(ds)):
        scene, sample = ds.scene(i), ds[i]
        assert sample.label == scene.shapes[0].kind
        assert sample.caption.count(" and ") == len(scene.shapes) - 1
        img = sample.image
        bg = torch.tensor(scene.background).view(3, 1, 1)
        assert torch.allclose(img[:, 0, 0], bg[:, 0, 0]) or any(s.cell == 0 for s in scene.shapes)
        cells = set()
        pos = -1
        for sh in scene.shapes:
            phrase = f"a {SIZES[sh.size]} {list(COLOURS)[sh.colour]} {SHAPES[sh.kind]} {POSITIONS[sh.cell]}"
            new_pos = sample.caption.find(phrase)
            assert new_pos > pos, (phrase, sample.caption)  # named, in drawing order (main shape first)
            pos = new_pos
            # The named colour is the drawn colour, at a pixel inside the shape and inside the named cell.
            r, c = sh.anchor()
            expected = torch.tensor(COLOURS[list(COLOURS)[sh.colour]])
            assert torch.allclose(img[:, r, c], expected, atol=1e-6), (i, phrase)
            assert (r * 3 // 112) * 3 + (c * 3 // 112) == sh.cell
            cells.add(sh.cell)
            counts[len(cells) - 1, sh.kind] += 1
        assert len(cells) == len(scene.shapes) in (1, 2)
    assert (counts > 0).all()  # every kind appears, as main and as second shape


def test_shape_kinds_are_visually_distinct():
    """Two scenes that differ only in the main shape's kind differ in pixels; size changes the area."""
    ds = ShapesDataset("train", size=1, image_size=112)
    base = ds.scene(0)
    main = base.shapes[0]
    def area(kind, size):
        sh = dataclasses.replace(main, kind=kind, size=size, radius=SIZE_FRACTION[size] * 112 / 3)
        img = ds.render(dataclasses.replace(base, shapes=(sh,)))
        bg = torch.tensor(base.background).view(3, 1, 1)
        return (img - bg).abs().sum(0).gt(1e-3)

    masks = [area(k, 1) for k in range(len(SHAPES))]
    for k in range(len(SHAPES)):
        assert area(k, 0).sum() < masks[k].sum()
        for j in range(k):
            assert (masks[k] ^ masks[j]).sum() > 20


def test_image_sizes():
    for size in (28, 56, 224, 100):
        img = ShapesDataset(size=4, image_size=size)[3].image
        assert img.shape == (3, size, size) and img.min() >= 0 and img.max() <= 1


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("val")
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=14)
    with pytest.raises(TypeError, match="image_size"):
        ShapesDataset(image_size=112.0)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(size=0)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(seed=-1)
    with pytest.raises(ValueError, match="name"):
        build_dataset("imagenet")
    ds = build_dataset("shapes", split="heldout", image_size=56, size=10, seed=2)
    assert isinstance(ds, ShapesDataset)
    assert (ds.split, ds.image_size, len(ds), ds.seed) == ("heldout", 56, 10, 2)


def test_normalize():
    x = torch.rand(2, 3, 8, 8)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    y = norm(x)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(y, (x - mean) / std)
    assert torch.allclose(norm(x[0]), y[0])
    z = x.clone()
    assert norm(z, inplace=True) is z and torch.equal(z, y)
    assert torch.allclose(norm.inverse(y), x, atol=1e-6)
    assert torch.allclose(Normalize(CLIP_MEAN, CLIP_STD)(x)[:, 0], (x[:, 0] - 0.48145466) / 0.26862954)
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5, 0.5, 0.5), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="x"):
        norm(torch.rand(4, 8, 8))
    with pytest.raises(TypeError, match="x"):
        norm(torch.zeros(3, 8, 8, dtype=torch.uint8))
