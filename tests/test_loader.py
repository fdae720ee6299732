"""The training loader: world-size invariance, exact resume, workers, native resolution and bad samples."""
import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import BadSample, Normalize, RawSample, ShapesDataset, TrainLoader, sample_budget_exponent
from aimv2.data.loader import MAX_REPLACEMENTS
from aimv2.tokenizer import ByteTokenizer

TOK = ByteTokenizer(context_length=24)


def _shapes(n=28):
    return ShapesDataset("train", size=n, image_size=56, seed=3)


class _Pictures:
    """A raw source of random-coloured pictures of varied sizes; the indices in ``bad`` cannot be read."""

    def __init__(self, n=24, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def key(self, i):
        return f"pic-{i}"

    def raw(self, i):
        if i in self.bad:
            raise BadSample("image file is truncated", key=self.key(i))
        rng = np.random.default_rng(i)
        w, h = 20 + 7 * (i % 5), 30 + 5 * (i % 3)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return RawSample(image=Image.fromarray(pixels), caption=f"picture number {i}", key=self.key(i))


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)
        assert torch.equal(x.prefix_lens, y.prefix_lens) and torch.equal(x.labels, y.labels)
        assert x.state == y.state


@pytest.mark.parametrize("make", [_shapes, _Pictures], ids=["shapes", "raw+augment"])
def test_ranks_split_the_same_global_batch(make):
    """World sizes 2 and 4: the ranks' batches, concatenated, are exactly the 1-rank batch, across an epoch end."""
    src = make()
    one = _take(TrainLoader(src, TOK, 8, image_size=56, seed=5), 4)  # 28 or 24 samples: an epoch end inside
    assert {b.state["epoch"] for b in one} == {0, 1}
    for world in (2, 4):
        parts = [_take(TrainLoader(src, TOK, 8, image_size=56, seed=5, rank=r, world_size=world), 4)
                 for r in range(world)]
        for step, whole in enumerate(one):
            shares = [p[step] for p in parts]
            assert all(s.images.shape[0] == 8 // world for s in shares)
            for name in ("images", "tokens", "prefix_lens", "labels"):
                assert torch.equal(torch.cat([getattr(s, name) for s in shares]), getattr(whole, name)), name
            assert all(s.state == whole.state for s in shares)


def test_batches_are_random_but_seeded():
    a = _take(TrainLoader(_shapes(), TOK, 8, image_size=56, seed=5), 2)
    b = _take(TrainLoader(_shapes(), TOK, 8, image_size=56, seed=6), 2)
    assert not torch.equal(a[0].tokens, b[0].tokens)
    p = a[0].prefix_lens
    assert p.dtype == torch.int64 and int(p.min()) >= 1 and int(p.max()) <= 15 and len(set(p.tolist())) > 1
    assert a[0].images.dtype == torch.float32 and a[0].images.shape == (8, 3, 56, 56)
    assert a[0].global_size == 8 and a[0].skipped == []


def test_batches_are_the_normalized_samples_of_each_epochs_permutation():
    """A global batch holds the normalized images, tokenized captions and labels of distinct samples of the
    epoch's permutation; the incomplete tail is dropped; each epoch draws another permutation; a callable
    ``normalize`` is applied as given."""
    src = ShapesDataset("train", size=20, image_size=28, seed=3)
    loader = TrainLoader(src, TOK, 6, image_size=28, seed=1)
    epochs = [_take(loader, 3), _take(loader, 3)]
    assert epochs[0][-1].state == {"epoch": 0, "batch": 3, "position": 18}  # 2 of 20 samples dropped
    assert epochs[1][-1].state == {"epoch": 1, "batch": 3, "position": 18}
    norm = Normalize()
    samples = [src[i] for i in range(len(src))]
    orders = []
    for batches in epochs:
        order = []
        for batch in batches:
            for row in range(6):
                i = next(i for i, s in enumerate(samples)
                         if torch.allclose(norm(s.image), batch.images[row], atol=1e-6))
                assert torch.equal(batch.tokens[row], TOK([samples[i].caption])[0])
                assert batch.labels[row].item() == samples[i].label
                order.append(i)
        assert len(set(order)) == 18
        orders.append(order)
    assert orders[0] != orders[1]
    doubled = next(TrainLoader(src, TOK, 6, image_size=28, seed=1, normalize=lambda x: 2 * x))
    assert torch.equal(doubled.images, 2 * torch.stack([samples[i].image for i in orders[0][:6]]))


@pytest.mark.parametrize("make", [_shapes, _Pictures], ids=["shapes", "raw+augment"])
def test_resume_is_exact_on_the_same_and_another_world_size(make):
    src = make()
    straight = _take(TrainLoader(src, TOK, 8, image_size=56, seed=1), 6)
    first = TrainLoader(src, TOK, 8, image_size=56, seed=1, rank=1, world_size=2)
    _take(first, 3)
    state = first.state_dict()
    again = TrainLoader(src, TOK, 8, image_size=56, seed=1)  # one rank now
    again.load_state_dict(state)
    _same(_take(again, 3), straight[3:])


def test_workers_give_the_same_batches():
    src = _Pictures()
    plain = _take(TrainLoader(src, TOK, 4, image_size=28, seed=2), 5)
    loader = TrainLoader(src, TOK, 4, image_size=28, seed=2, num_workers=2)
    workers = _take(loader, 5)
    _same(plain, workers)
    # a checkpoint taken now records what was consumed, not what the workers prefetched
    assert loader.state_dict() == plain[-1].state
    loader.close()


def test_bad_samples_are_skipped_counted_and_replaced():
    src = _Pictures(n=24, bad={3, 7, 11, 12, 20})
    loader = TrainLoader(src, TOK, 8, image_size=28, seed=0)
    batches = _take(loader, 6)  # two epochs: every sample read twice
    assert all(b.images.shape[0] == 8 for b in batches)
    assert torch.isfinite(torch.stack([b.images for b in batches])).all()
    skipped = [key for b in batches for key, _ in b.skipped]
    assert sorted(set(skipped)) == sorted(f"pic-{i}" for i in src.bad)
    assert len(loader.skipped) == len(skipped) >= 2 * len(src.bad)  # each epoch reads (and skips) them again
    assert all(reason == "image file is truncated" for _, reason in loader.skipped)
    for b in batches:  # the replacement is a readable sample: its caption is that of a good index
        for row in b.tokens:
            text = TOK.decode(row)
            assert int(text.split()[-1]) not in src.bad
    again = _take(TrainLoader(src, TOK, 8, image_size=28, seed=0), 6)
    _same(batches, again)

    with pytest.raises(RuntimeError, match=f"{MAX_REPLACEMENTS} samples in a row"):
        next(TrainLoader(_Pictures(n=8, bad=range(8)), TOK, 4, image_size=28))


def test_native_resolution_batches_keep_the_patches_per_batch():
    src = _Pictures(n=400)
    global_batch, n = 8, (56 // 14) ** 2  # 128 patches per global batch at 56 px
    loader = TrainLoader(src, TOK, global_batch, image_size=56, seed=4, native_budgets=(2, 5))
    seen = set()
    for batch in _take(loader, 30):
        b, _, h, w = batch.images.shape
        grid = (h // 14, w // 14)
        budget = grid[0] * grid[1]
        seen.add(budget)
        assert budget in (4, 8, 16, 32) and grid[1] >= grid[0]
        assert b == batch.global_size == global_batch * n // budget
        assert int(batch.prefix_lens.min()) >= 1 and int(batch.prefix_lens.max()) <= budget - 1
    assert len(seen) >= 3
    # two ranks still split each global batch
    a = _take(TrainLoader(src, TOK, global_batch, image_size=56, seed=4, native_budgets=(2, 5)), 3)
    r = [_take(TrainLoader(src, TOK, global_batch, image_size=56, seed=4, native_budgets=(2, 5), rank=k,
                           world_size=2), 3) for k in range(2)]
    for step in range(3):
        assert torch.equal(torch.cat([r[0][step].images, r[1][step].images]), a[step].images)


def test_budget_exponent_is_a_truncated_normal():
    rng = np.random.default_rng(0)
    draws = np.array([sample_budget_exponent(rng, 7, 12) for _ in range(4000)])
    assert draws.min() == 7 and draws.max() == 12
    counts = np.bincount(draws - 7, minlength=6) / len(draws)
    assert counts[2] + counts[3] > counts[0] + counts[5]  # the middle of the range is the most likely


def test_bad_arguments():
    src = _shapes()
    with pytest.raises(ValueError, match="world_size"):
        TrainLoader(src, TOK, 6, image_size=56, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        TrainLoader(src, TOK, 8, image_size=56, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainLoader(_shapes(5), TOK, 8, image_size=56)
    with pytest.raises(ValueError, match="native_budgets"):
        TrainLoader(src, TOK, 8, image_size=56, native_budgets=(9, 3))
    with pytest.raises(TypeError, match="global_batch"):
        TrainLoader(src, TOK, 8.0, image_size=56)
    with pytest.raises(ValueError, match="image_size"):
        TrainLoader(src, TOK, 8, image_size=50)
    loader = TrainLoader(src, TOK, 8, image_size=56)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({"epoch": 0, "batch": 0, "position": -1})
    with pytest.raises(ValueError, match="batch"):
        loader.load_state_dict({"epoch": 0, "position": 0})
