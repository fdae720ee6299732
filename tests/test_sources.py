"""Tests of aimv2.data's real data: tar shards, folders, CSV/JSONL, class folders, colour conversion, transforms.

Every file is built on the fly in tmp_path with Pillow, from tiny (40x30) images.
"""

import io
import json
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import (
    BadSample,
    ClassFolder,
    CSVSource,
    EvalTransform,
    ImageFolderCaptions,
    JSONLSource,
    RawSample,
    TarShards,
    TrainTransform,
    decode_image,
    fit_and_pad,
    native_grid,
    open_source,
    random_resized_crop_box,
    to_rgb,
    to_tensor,
)
from aimv2.data.tar_index import _tar_members

W, H = 40, 30


def noise(seed: int, mode: str = "RGB", size=(W, H)) -> Image.Image:
    """A random image of ``mode`` (RGB, L, RGBA, CMYK) and PIL ``size`` (w, h)."""
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "CMYK": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    if mode == "CMYK":
        return Image.frombytes("CMYK", size, arr.tobytes())
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)  # L, RGB or RGBA from the shape


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_tar(path, members) -> str:
    """A tar at ``path`` with ``members`` [(name, bytes | str)] in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            data = data.encode() if isinstance(data, str) else data
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture
def shards(tmp_path):
    """Two shards of 5 samples each: 6 readable, 4 bad ones (no image, empty caption, corrupt, truncated,
    no caption: 5 bad reasons over samples 3, 4, 6, 7, 8)."""
    png = encode(noise(7), "PNG")
    jpg = encode(noise(1), "JPEG", quality=95)
    first = [
        ("000000.png", encode(noise(0), "PNG")), ("000000.txt", "  a red thing \n"),
        ("000001.jpg", jpg), ("000001.json", json.dumps({"caption": "from json"})),
        ("000002.webp", encode(noise(2), "WEBP", lossless=True)), ("000002.txt", "webp"), ("000002.cls", "7\n"),
        ("000003.txt", "no image here"),
        ("000004.png", encode(noise(4), "PNG")), ("000004.txt", "  \n\t "),
    ]
    second = [
        ("sub/000005.png", encode(noise(5, "L"), "PNG")), ("sub/000005.txt", "grey"),
        ("000006.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("000006.txt", "corrupt"),
        ("000007.png", png[: len(png) // 2]), ("000007.txt", "truncated"),
        ("000008.png", encode(noise(8), "PNG")),
        ("000009.png", encode(noise(9, "RGBA"), "PNG")), ("000009.txt", "ünïcode caption"),
    ]
    d = tmp_path / "shards"
    d.mkdir()
    return [write_tar(d / "shard-000.tar", first), write_tar(d / "shard-001.tar", second)], jpg


# --------------------------------------------------------------------------------------------------------
# Tar shards
# --------------------------------------------------------------------------------------------------------

def test_tar_shards_samples(shards):
    shards, jpg = shards
    src = TarShards(shards)
    assert len(src) == 10 and src.shards == shards and src.num_shards == 2 and src.classes is None
    assert [src.shard_of(i) for i in range(10)] == [0] * 5 + [1] * 5
    assert src.key(5) == f"{shards[1]}:sub/000005" and src.key(-1) == f"{shards[1]}:000009"

    s = src.raw(0)
    assert isinstance(s, RawSample) and s.image.mode == "RGB" and s.image.size == (W, H)
    assert s.caption == "a red thing" and s.label == -1 and s.key == src.key(0)
    assert np.array_equal(pixels(s.image), pixels(noise(0)))  # png round-trips exactly
    s = src.raw(1)
    assert s.caption == "from json"  # no .txt: the json's "caption" field
    assert np.array_equal(pixels(s.image), pixels(Image.open(io.BytesIO(jpg)).convert("RGB")))
    s = src.raw(2)
    assert s.caption == "webp" and s.label == 7 and np.array_equal(pixels(s.image), pixels(noise(2)))
    s = src.raw(5)  # greyscale png, key with a directory
    assert s.image.mode == "RGB" and np.array_equal(pixels(s.image), pixels(noise(5, "L").convert("RGB")))
    s = src.raw(9)
    assert s.caption == "ünïcode caption" and s.image.mode == "RGB"
    assert np.array_equal(pixels(s.image), pixels(to_rgb(noise(9, "RGBA"))))

    reasons = {}
    for i in (3, 4, 6, 7, 8):
        with pytest.raises(BadSample) as exc:
            src.raw(i)
        assert exc.value.key == src.key(i) and src.key(i) in str(exc.value)
        reasons[i] = exc.value.reason
    assert "missing image" in reasons[3]
    assert reasons[4] == "empty caption"
    assert "cannot decode image" in reasons[6] and "cannot decode image" in reasons[7]
    assert "missing caption" in reasons[8]
    assert all("\n" not in r for r in reasons.values())
    assert src.raw(0).caption == "a red thing"  # still fine after the failures

    with pytest.raises(IndexError):
        src.raw(10)
    with pytest.raises(IndexError):
        src.raw(-11)
    for bad in ("1", 1.0, True, None):
        with pytest.raises(TypeError, match="index"):
            src.raw(bad)
    assert src.raw(np.int64(-10)).caption == "a red thing"


def test_tar_path_forms(shards, tmp_path):
    shards, _ = shards
    d = os.path.dirname(shards[0])
    expect = [TarShards(shards).key(i) for i in range(10)]
    for paths in (d, os.path.join(d, "shard-*.tar"), os.path.join(d, "shard-{000..001}.tar"),
                  os.path.join(d, "shard-{000,001}.tar"), shards, tuple(shards)):
        src = TarShards(paths)
        assert [src.key(i) for i in range(len(src))] == expect, paths
        assert [open_source(paths).key(i) for i in range(10)] == expect
    one = TarShards(shards[1])
    assert len(one) == 5 and one.shards == [shards[1]] and one.shard_of(4) == 0
    assert len(TarShards(os.path.join(d, "shard-{001..000}.tar"))) == 10  # descending range

    with pytest.raises(FileNotFoundError, match="shard-002.tar does not exist"):
        TarShards(os.path.join(d, "shard-{000..002}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        TarShards(os.path.join(d, "*.nothing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TarShards(str(tmp_path / "nope.tar"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="contains no .tar shards"):
        TarShards(str(tmp_path / "empty_dir"))
    with pytest.raises(ValueError, match="paths is empty"):
        TarShards([])
    with pytest.raises(TypeError, match="paths"):
        TarShards(3)
    with pytest.raises(ValueError, match="caption_key"):
        TarShards(shards, caption_key="")


def test_tar_empty_and_invalid(tmp_path):
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.tar contains no image–caption samples"):
        TarShards(str(tmp_path / "zero.tar"))
    only_arrays = write_tar(tmp_path / "arrays.tar", [("a.npy", b"x"), ("b.png", encode(noise(0), "PNG"))])
    with pytest.raises(ValueError, match=r"no image–caption samples.*png \(1\)"):
        TarShards(only_arrays)
    (tmp_path / "text.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ValueError, match="text.tar is not a readable uncompressed tar"):
        TarShards(str(tmp_path / "text.tar"))
    gz = tmp_path / "real.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        ti = tarfile.TarInfo("a.txt")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        TarShards(str(gz))


def test_tar_truncated_shard_and_json_captions(tmp_path):
    members = [
        ("a.png", encode(noise(0), "PNG")), ("a.json", json.dumps({"caption": "json a", "alt": "alt a"})),
        ("a.txt", "text a"),
        ("b.jpeg", encode(noise(1), "JPEG")), ("b.json", json.dumps({"alt": "alt b"})),
        ("c.png", encode(noise(2), "PNG")), ("c.json", "{not json"),
        ("d.png", encode(noise(3), "PNG")), ("d.json", json.dumps({"caption": 3})),
        ("e.txt", "last"), ("e.png", encode(noise(4), "PNG")),  # image last: cut by the truncation below
    ]
    path = write_tar(tmp_path / "s.tar", members)
    assert TarShards(path).raw(0).caption == "text a"  # .txt first
    src = TarShards(path, caption_key="json")
    assert src.raw(0).caption == "json a"
    for i, reason in ((1, "no field 'caption'"), (2, "malformed .json"), (3, "is a int, not a string")):
        with pytest.raises(BadSample, match=reason):
            src.raw(i)
    alt = TarShards(path, caption_key="json", json_field="alt")
    assert [alt.raw(i).caption for i in (0, 1)] == ["alt a", "alt b"]

    data = (tmp_path / "s.tar").read_bytes()
    png4 = encode(noise(4), "PNG")
    cut = data.index(png4) + len(png4) // 2
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    with pytest.warns(UserWarning, match="cut.tar: truncated inside the member"):
        src = TarShards(str(tmp_path / "cut.tar"))
    assert len(src) == 5 and src.raw(0).caption == "text a"
    with pytest.raises(BadSample, match="missing image"):  # the cut member is damaged: not indexed
        src.raw(4)


def _age(path, seconds: float = 60.0) -> None:
    """Set ``path``'s mtime ``seconds`` into the past (a settled shard, which the index cache may store)."""
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(then, then))


def test_tar_index_cache(shards, tmp_path, monkeypatch):
    """A settled shard's index is cached: the next open scans no header and gives the same samples. A shard
    modified in the last seconds is not cached; a rewritten shard (even same size, mtime and inode), a torn
    entry and another folder are scanned again; a damaged shard is never cached, so its warning comes on every
    open; an unwritable folder warns once and still works."""
    import aimv2.data.tar_index as tar_index

    shards, _ = shards
    cache = tmp_path / "cache"
    scanned = []
    real_scan = tar_index._tar_members
    monkeypatch.setattr(tar_index, "_tar_members", lambda p: scanned.append(p) or real_scan(p))
    first = TarShards(shards, index_cache=cache)  # just written: may still be changing, so not stored
    assert scanned == shards and not list(cache.glob("*.npz"))
    for path in shards:
        _age(path)
    scanned.clear()
    TarShards(shards, index_cache=cache)
    assert scanned == shards and len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob("*.tmp"))
    scanned.clear()
    again = TarShards(shards, index_cache=cache)
    assert scanned == []
    assert [again.key(i) for i in range(len(again))] == [first.key(i) for i in range(len(first))]
    assert np.array_equal(again._rows, first._rows)
    assert [again.raw(i).caption for i in (0, 1, 9)] == [first.raw(i).caption for i in (0, 1, 9)]

    # A shard rewritten with other content (new size and mtime) is scanned again and indexed anew.
    write_tar(shards[1], [("000005.txt", "rewritten"), ("000005.png", encode(noise(5), "PNG"))])
    changed = TarShards(shards, index_cache=cache)
    assert scanned == [shards[1]] and len(changed) == 6 and changed.raw(5).caption == "rewritten"
    _age(shards[1])
    TarShards(shards, index_cache=cache)
    scanned.clear()
    TarShards(shards, index_cache=cache)
    assert scanned == []

    # The same size, mtime and inode but other bytes (a rewrite with the mtime set back): scanned again.
    st = os.stat(shards[1])
    with open(shards[1], "r+b") as f:
        data = f.read()
        assert data.index(b"rewritten") < 4096  # inside the fingerprinted first block
        f.seek(0)
        f.write(data.replace(b"rewritten", b"REWRITTEN"))
    os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shards[1]).st_mtime_ns == st.st_mtime_ns and os.stat(shards[1]).st_ino == st.st_ino
    assert TarShards(shards, index_cache=cache).raw(5).caption == "REWRITTEN" and scanned == [shards[1]]

    # A torn entry (a crash mid-write elsewhere) is ignored and replaced.
    for entry in cache.glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:50])
    scanned.clear()
    assert len(TarShards(shards, index_cache=cache)) == 6 and scanned == shards
    scanned.clear()
    TarShards(shards, index_cache=cache)
    assert scanned == []

    # Off: nothing written, every open scans.
    off = tmp_path / "off"
    TarShards(shards, index_cache=False)
    monkeypatch.setenv("AIMV2_INDEX_CACHE", "off")
    TarShards(shards)
    assert len(scanned) == 4 and not off.exists()
    monkeypatch.setenv("AIMV2_INDEX_CACHE", str(off))
    TarShards(shards)
    assert len(list(off.glob("*.npz"))) == 2

    # Damaged: indexed up to the damage with a warning, every time, and never cached.
    data = open(shards[0], "rb").read()
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(data[:len(data) // 2 + 77])  # not on a 512-byte block boundary
    _age(damaged)
    for _ in range(2):
        with pytest.warns(UserWarning, match="damaged.tar: truncated"):
            TarShards(str(damaged), index_cache=cache)
    assert len(list(cache.glob("*.npz"))) == 2

    # Unwritable: one warning naming the folder, then the index lives in memory only.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(tar_index, "_cache_warned", set())
    with pytest.warns(UserWarning, match="cannot write the tar index cache"):
        src = TarShards(shards, index_cache=blocker / "sub")
    assert len(src) == 6
    with pytest.raises(TypeError, match="index_cache"):
        TarShards(shards, index_cache=3)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_header_formats(tmp_path, fmt):
    """The header scanner agrees with tarfile: ustar name prefixes, GNU long names, pax paths, non-ASCII
    names; directories and links are skipped."""
    long_dir = "p" * 120 + "/" + "q" * 90  # fits ustar's prefix/name split
    keys = ["a", long_dir, "ünï/çødé"] + ([] if fmt == tarfile.USTAR_FORMAT else ["e" * 300, "d/" + "x" * 150])
    path = tmp_path / "f.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, key in enumerate(keys):
            for name, data in ((f"{key}.png", encode(noise(i), "PNG")), (f"{key}.txt", f"caption {i}".encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        for name, kind in (("somedir.txt", tarfile.DIRTYPE), ("link.txt", tarfile.SYMTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, "a.txt"
            tf.addfile(ti)
    with tarfile.open(path) as tf:
        expect = [(ti.name, ti.offset_data, ti.size) for ti in tf if ti.isreg()]
    assert list(_tar_members(str(path))) == expect
    src = TarShards(str(path))
    assert [src.key(i).split(":", 1)[1] for i in range(len(src))] == keys
    assert [src.raw(i).caption for i in range(len(src))] == [f"caption {i}" for i in range(len(keys))]
    assert np.array_equal(pixels(src.raw(len(keys) - 1).image), pixels(noise(len(keys) - 1)))


# --------------------------------------------------------------------------------------------------------
# Folders, CSV, JSONL, class folders, auto-detection
# --------------------------------------------------------------------------------------------------------

def test_image_folder_captions(tmp_path):
    root = tmp_path / "caps"
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    noise(0).save(root / "x.png")
    (root / "x.txt").write_text("  caption x ")
    noise(1, "CMYK").save(root / "a" / "y.jpg", quality=95)
    (root / "a" / "y.json").write_text(json.dumps({"caption": "caption y"}))
    Image.fromarray(np.zeros((H, W), np.uint16) + 4000).save(root / "a" / "deep" / "z.PNG")
    (root / "a" / "deep" / "z.TXT").write_text("sixteen bit")
    noise(3).save(root / "a" / "nocap.png")
    (root / "a" / "orphan.txt").write_text("no image")
    (root / "README.txt").write_text("ignored")
    noise(4).save(root / ".hidden" / "h.png")
    (root / ".hidden" / "h.txt").write_text("hidden")
    noise(5).save(root / "._x.png")

    src = ImageFolderCaptions(root)
    assert len(src) == 4 and src.shards == [str(root)]
    keys = [src.key(i) for i in range(4)]
    # A directory's files (sorted), then its subdirectories (sorted), depth first.
    assert keys == [str(root / "x.png"), str(root / "a" / "nocap.png"), str(root / "a" / "y.jpg"),
                    str(root / "a" / "deep" / "z.PNG")]
    assert src.raw(0).caption == "caption x" and np.array_equal(pixels(src.raw(0).image), pixels(noise(0)))
    z = src.raw(3)
    assert z.caption == "sixteen bit" and z.image.mode == "RGB"
    assert np.all(pixels(z.image) == round(4000 / 257))
    with pytest.raises(BadSample, match="missing caption"):
        src.raw(1)
    y = src.raw(2)
    assert y.caption == "caption y" and y.image.mode == "RGB" and y.image.size == (W, H)
    assert open_source(root).key(2) == keys[2] and isinstance(open_source(root), ImageFolderCaptions)

    os.remove(root / "a" / "y.jpg")  # vanished after indexing: a bad sample, not a crash
    with pytest.raises(BadSample, match="missing image file"):
        src.raw(2)


def test_csv_and_jsonl(tmp_path):
    d = tmp_path / "rows"
    (d / "img").mkdir(parents=True)
    for i in range(3):
        noise(i).save(d / "img" / f"{i}.png")
    absolute = str(d / "img" / "2.png")
    (d / "data.csv").write_text(
        "id,FilePath,Text\n"
        "0,img/0.png,\"zero, with comma\"\n"
        f"1,{absolute},two absolute\n"
        "\n"
        "2,img/missing.png,gone\n"
        "3,img/1.png,   \n"
        "4,,no image\n"
        "5,http://example.com/a.png,url\n",
        encoding="utf-8",
    )
    src = CSVSource(d / "data.csv")
    assert src.image_column == "FilePath" and src.caption_column == "Text" and len(src) == 6
    assert src.raw(0).caption == "zero, with comma"
    assert np.array_equal(pixels(src.raw(0).image), pixels(noise(0)))
    assert np.array_equal(pixels(src.raw(1).image), pixels(noise(2)))
    assert src.key(0) == f"{d / 'data.csv'}:2" and src.key(2) == f"{d / 'data.csv'}:5"
    for i, reason in ((2, "missing image file"), (3, "empty caption"), (4, "missing image"), (5, "URL")):
        with pytest.raises(BadSample, match=reason):
            src.raw(i)
    assert isinstance(open_source(d / "data.csv"), CSVSource)
    explicit = CSVSource(d / "data.csv", image_column="FilePath", caption_column="id")
    assert explicit.raw(0).caption == "0"
    with pytest.raises(ValueError, match="caption_column 'nope'"):
        CSVSource(d / "data.csv", caption_column="nope")
    (d / "cols.csv").write_text("a,b\nimg/0.png,x\n")
    with pytest.raises(ValueError, match="cannot find the image column"):
        CSVSource(d / "cols.csv")
    (d / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="contains no image–caption samples"):
        CSVSource(d / "empty.csv")
    (d / "header.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="header.csv contains no image–caption samples"):
        open_source(d / "header.csv")

    lines = [
        json.dumps({"image": "img/0.png", "caption": "j zero"}),
        "",
        "{broken",
        json.dumps({"image": "img/1.png"}),
        json.dumps({"image": "img/2.png", "caption": ["a", "list"]}),
        json.dumps([1, 2]),
        json.dumps({"image": "img/2.png", "caption": "j two", "url": "x"}),
    ]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    src = JSONLSource(d / "data.jsonl")
    assert (src.image_key, src.caption_key, len(src)) == ("image", "caption", 6)
    assert src.raw(0).caption == "j zero" and src.raw(-1).caption == "j two"
    assert src.key(1) == f"{d / 'data.jsonl'}:3"
    for i, reason in ((1, "malformed JSON line"), (2, "missing caption"), (3, "not a string"), (4, "not an object")):
        with pytest.raises(BadSample, match=reason):
            src.raw(i)
    assert isinstance(open_source(d / "data.jsonl"), JSONLSource)
    (d / "bad.jsonl").write_text("{nope\n[]\n")
    with pytest.raises(ValueError, match="no image–caption samples"):
        JSONLSource(d / "bad.jsonl")


def test_class_folder_and_detection(tmp_path):
    root = tmp_path / "classes"
    for cls, n in (("dog", 2), ("cat", 1), ("zebra", 0)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            noise(10 * len(cls) + i).save(root / cls / f"{i}.jpg")
    (root / "cat" / "nested").mkdir()
    noise(99, "L").save(root / "cat" / "nested" / "n.png")
    noise(98).save(root / "stray.png")  # images directly in root are not in any class
    src = open_source(root)
    assert isinstance(src, ClassFolder) and src.classes == ["cat", "dog", "zebra"] and src.num_classes == 3
    assert len(src) == 4 and [src.label_of(i) for i in range(4)] == [0, 0, 1, 1]
    samples = [src.raw(i) for i in range(4)]
    assert [(s.caption, s.label) for s in samples] == [("cat", 0), ("cat", 0), ("dog", 1), ("dog", 1)]
    assert src.key(1) == str(root / "cat" / "nested" / "n.png") and samples[1].image.mode == "RGB"

    with pytest.raises(FileNotFoundError, match=r"aimv2: data path .*missing does not exist"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty contains no image–caption samples"):
        open_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="contains no images in class subfolders"):
        ClassFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="contains no image–caption samples"):
        ImageFolderCaptions(root)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="cannot tell what kind"):
        open_source(tmp_path / "notes.md")
    with pytest.raises(ValueError, match="is not a directory"):
        ClassFolder(tmp_path / "notes.md")
    with pytest.raises(TypeError, match="path"):
        open_source(3)


# --------------------------------------------------------------------------------------------------------
# Colour conversion and decoding
# --------------------------------------------------------------------------------------------------------

def test_to_rgb_modes():
    rgb = noise(0)
    assert to_rgb(rgb) is rgb
    grey = noise(1, "L")
    g = np.asarray(grey)
    for img, expect in (
        (grey, np.stack([g] * 3, -1)),
        (grey.convert("1"), np.stack([np.where(np.asarray(grey.convert("1")), 255, 0)] * 3, -1)),
        (Image.fromarray(np.full((H, W), 65535, np.uint16)), 255),
        (Image.fromarray(np.full((H, W), 257 * 40, np.int32)), 40),
        (Image.fromarray(np.full((H, W), 300.0, np.float32)), 255),
        (Image.fromarray(np.full((H, W), 12.4, np.float32)), 12),
        (Image.new("CMYK", (W, H), (0, 255, 0, 0)), (255, 0, 255)),  # full magenta ink: Pillow's naive CMYK
    ):
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (W, H), img.mode
        assert np.array_equal(pixels(out), np.broadcast_to(np.asarray(expect), (H, W, 3))), img.mode

    # Alpha over white: half-transparent red -> (255, 128, 128); fully transparent anything -> white.
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[:, :10, 3], rgba[:, 10:, 3], rgba[:, 10:, 1] = 255, 128, 0, 200
    out = pixels(to_rgb(Image.fromarray(rgba)))
    assert np.all(np.abs(out[:, :10] - [255, 127, 127]) <= 1) and np.all(out[:, 10:] == 255)
    la = Image.fromarray(np.stack([np.full((H, W), 0, np.uint8), np.full((H, W), 0, np.uint8)], -1))
    assert np.all(pixels(to_rgb(la)) == 255)
    assert np.all(pixels(to_rgb(la.convert("RGBA").convert("RGBa"))) == 255)
    # Premultiplied grey 64 at alpha 128 is grey 127.5: over white, about (127.5 + 255) / 2.
    la_pre = Image.frombytes("La", (W, H), bytes([64, 128]) * (W * H))
    assert np.all(np.abs(pixels(to_rgb(la_pre)) - 191) <= 1)

    pal = Image.new("P", (W, H), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.all(pixels(to_rgb(pal)) == [10, 20, 30])
    pal.info["transparency"] = 1
    assert np.all(pixels(to_rgb(pal)) == 255)
    buf = encode(pal, "PNG")  # palette + tRNS through a real file
    assert np.all(pixels(decode_image(buf)) == 255)
    assert np.all(pixels(decode_image(encode(noise(0, "CMYK"), "JPEG"))) >= 0)
    assert decode_image(encode(noise(0, "CMYK"), "JPEG")).mode == "RGB"
    with pytest.raises(TypeError, match="img"):
        to_rgb(np.zeros((3, 3)))
    with pytest.raises(BadSample, match="empty image"):
        decode_image(b"")
    with pytest.raises(BadSample, match="cannot decode"):
        decode_image(b"GIF89a" + b"\x00" * 10)


# --------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------

def test_random_resized_crop_boxes():
    t = TrainTransform(28)
    rng = np.random.default_rng(0)
    width, height = 400, 300
    boxes = np.array([t.crop_box(width, height, rng) for _ in range(3000)])
    top, left, h, w = boxes.T
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= height) and np.all(left + w <= width)
    frac = h * w / (width * height)
    assert frac.min() >= 0.39 and frac.max() <= 1.0
    assert frac.min() < 0.42 and frac.max() > 0.97  # the whole range is used
    # torchvision's rejection: with r = w/h log-uniform, a 4:3 image accepts area s when r >= 4s/3, so the
    # accepted s has density prop. to min(1, -log(s) / log(16/9)) on [0.4, 1]: mean 0.6022.
    assert abs(frac.mean() - 0.6022) < 0.012
    aspect = w / h
    assert aspect.min() >= 0.74 and aspect.max() <= 1.34
    assert abs(np.log(aspect).mean() - 0.0579) < 0.015  # log-uniform, the same rejection: E log r = 0.0579
    # Same generator state -> same box; the draws do not depend on anything else.
    assert t.crop_box(width, height, np.random.default_rng(5)) == t.crop_box(width, height, np.random.default_rng(5))
    # Every attempt fails on a 1000x10 strip: torchvision's central-crop fallback with the ratio clamped.
    assert random_resized_crop_box(1000, 10, (0.4, 1.0), (3 / 4, 4 / 3), rng) == (0, 493, 10, 13)
    assert random_resized_crop_box(10, 1000, (0.4, 1.0), (3 / 4, 4 / 3), rng) == (493, 0, 13, 10)
    assert random_resized_crop_box(20, 20, (1.0, 1.0), (1.0, 1.0), rng) == (0, 0, 20, 20)
    with pytest.raises(TypeError, match="rng"):
        t.crop_box(10, 10, 0)
    with pytest.raises(ValueError, match="width"):
        random_resized_crop_box(0, 10, (0.4, 1.0), (0.75, 1.33), rng)
    with pytest.raises(ValueError, match="ratio"):
        random_resized_crop_box(10, 10, (0.4, 1.0), (1.33, 0.75), rng)


def test_train_transform_determinism_and_flip():
    img = noise(3, size=(64, 48))
    t = TrainTransform(28)
    a, b = t(img, np.random.default_rng(11)), t(img, np.random.default_rng(11))
    assert a.dtype == torch.float32 and a.shape == (3, 28, 28) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, t(img, np.random.default_rng(12)))
    # The flip draw comes after the crop draws: flip=1 and flip=0 crop the same box, mirrored.
    on, off = TrainTransform(28, flip=1.0), TrainTransform(28, flip=0.0)
    assert torch.equal(on(img, np.random.default_rng(4)), off(img, np.random.default_rng(4)).flip(-1))
    flips = sum(not torch.equal(t(img, np.random.default_rng(s)), off(img, np.random.default_rng(s)))
                for s in range(40))
    assert 10 <= flips <= 30
    # scale 1 with the image's own ratio is the whole image: a plain bicubic resize.
    whole = TrainTransform(24, scale=(1.0, 1.0), ratio=(64 / 48, 64 / 48), flip=0.0)
    expect = to_tensor(img.resize((24, 24), Image.Resampling.BICUBIC))
    assert torch.equal(whole(img, np.random.default_rng(0)), expect)
    # Any mode in; a tensor in (the bundled shapes data) works too and is deterministic.
    assert t(noise(1, "L"), np.random.default_rng(0)).shape == (3, 28, 28)
    x = to_tensor(img)
    y = t(x, np.random.default_rng(2))
    assert y.shape == (3, 28, 28) and torch.equal(y, t(x, np.random.default_rng(2))) and 0 <= y.min() <= y.max() <= 1
    out = torch.empty(3, 28, 28)
    assert t(img, np.random.default_rng(11), out=out) is out and torch.equal(out, a)
    for kw, err in (({"image_size": 0}, ValueError), ({"image_size": 2.0}, TypeError),
                    ({"scale": (0.0, 1.0)}, ValueError), ({"scale": (0.8, 0.4)}, ValueError),
                    ({"scale": (0.4, 1.5)}, ValueError), ({"ratio": 3}, TypeError), ({"flip": 2}, ValueError)):
        with pytest.raises(err, match=next(iter(kw))):
            TrainTransform(**kw)
    with pytest.raises(TypeError, match="rng"):
        t(img, None)
    with pytest.raises(ValueError, match="out"):
        t(img, np.random.default_rng(0), out=torch.empty(3, 27, 28))


def test_eval_transform():
    img = noise(6)  # 40 x 30
    t = EvalTransform(28)
    assert t.resized_size(W, H) == (37, 28) and t.resized_size(H, W) == (28, 37)
    expect = to_tensor(img.resize((37, 28), Image.Resampling.BICUBIC).crop((4, 0, 32, 28)))  # round(4.5) = 4
    out = t(img)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32 and torch.equal(out, expect)
    assert torch.equal(t(img, np.random.default_rng(0)), out)  # rng ignored
    t875 = EvalTransform(28, crop_pct=0.875)
    assert t875.resize_size == 32 and t875.resized_size(W, H) == (42, 32)
    expect = to_tensor(img.resize((42, 32), Image.Resampling.BICUBIC).crop((7, 2, 35, 30)))
    assert torch.equal(t875(img), expect)
    exact = EvalTransform(30)  # shorter side already 30: no resize, just the crop
    assert torch.equal(exact(img), to_tensor(img.crop((5, 0, 35, 30))))
    y = t(to_tensor(img))
    assert y.shape == (3, 28, 28) and (y - out).abs().mean() < 0.05
    for kw in ({"crop_pct": 0.0}, {"crop_pct": 1.5}):
        with pytest.raises(ValueError, match="crop_pct"):
            EvalTransform(28, **kw)


def test_native_grid_and_fit_and_pad():
    assert native_grid(1) == (1, 1) and native_grid(2) == (1, 2)
    assert native_grid(128) == (8, 16) and native_grid(256) == (16, 16) and native_grid(4096) == (64, 64)
    for n in range(13):
        r, c = native_grid(2 ** n)
        assert r * c == 2 ** n and c in (r, 2 * r)
    for bad, err in ((0, ValueError), (3, ValueError), (96, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="budget"):
            native_grid(bad)

    p = 14
    img = noise(7)  # 40 wide, 30 tall; canvas 2x4 patches = 28 x 56: height limits, 30 -> 28, 40 -> 37
    out = fit_and_pad(img, (2, 4), p)
    assert out.shape == (3, 28, 56) and out.dtype == torch.float32
    assert torch.equal(out[:, :, :37], to_tensor(img.resize((37, 28), Image.Resampling.BICUBIC)))
    assert torch.all(out[:, :, 37:] == 0)
    tall = noise(8, size=(30, 40))  # canvas 4x2 = 56 x 28: width limits, 30 -> 28, 40 -> 37
    out = fit_and_pad(tall, (4, 2), p)
    assert torch.equal(out[:, :37, :], to_tensor(tall.resize((28, 37), Image.Resampling.BICUBIC)))
    assert torch.all(out[:, 37:] == 0)
    big = fit_and_pad(img, (8, 16), 4)  # upscaled to fit 32 x 64: 30 -> 32, 40 -> 43
    assert torch.all(big[:, :, 43:] == 0) and big[:, :, :43].abs().sum() > 0
    strip = fit_and_pad(noise(9, size=(400, 2)), (2, 2), p)  # a 2-pixel-high strip keeps one patch of height
    assert torch.all(strip[:, p:] == 0) and strip[:, :p].abs().sum() > 0
    # The tensor path keeps the same geometry.
    x = to_tensor(img)
    y = fit_and_pad(x, (2, 4), p)
    assert torch.all(y[:, :, 37:] == 0)
    assert (y[:, :, :37] - fit_and_pad(img, (2, 4), p)[:, :, :37]).abs().mean() < 0.05
    assert 0 <= y.min() and y.max() <= 1
    canvas = torch.full((3, 28, 56), 7.0)
    assert fit_and_pad(img, (2, 4), p, out=canvas) is canvas and torch.all(canvas[:, :, 37:] == 0)
    with pytest.raises(TypeError, match="grid"):
        fit_and_pad(img, 4, p)
    with pytest.raises(ValueError, match="patch_size"):
        fit_and_pad(img, (2, 2), 0)
    with pytest.raises(ValueError, match=r"img must be \(3, H, W\)"):
        fit_and_pad(torch.zeros(1, 5, 5), (2, 2), p)
    with pytest.raises(TypeError, match="img"):
        fit_and_pad(np.zeros((3, 5, 5)), (2, 2), p)


def test_to_tensor():
    img = noise(0)
    x = to_tensor(img)
    assert x.shape == (3, H, W) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    assert to_tensor(noise(0, "L")).shape == (3, H, W)
    assert torch.equal(to_tensor(x.double()), x)
    with pytest.raises(TypeError, match="floating-point"):
        to_tensor(torch.zeros(3, 2, 2, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------------

class _Pairs(torch.utils.data.Dataset):
    """(pid, tensor image or None, caption or reason) of each sample."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            s = self.source.raw(i)
            return os.getpid(), to_tensor(s.image), s.caption
        except BadSample as exc:
            return os.getpid(), None, exc.reason


def _collect(dataset, **kw):
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, **kw)
    return list(loader)


def test_workers_and_pickling_read_the_same(shards):
    shards, _ = shards
    src = TarShards(shards)
    main = [_Pairs(src)[i] for i in range(len(src))]  # opens the handles in this process first
    assert len(src._files) == 2
    for other in (_collect(_Pairs(src), num_workers=2, multiprocessing_context="fork"),
                  [_Pairs(pickle.loads(pickle.dumps(src)))[i] for i in range(len(src))]):
        assert len(other) == len(main)
        for (_, a, ca), (_, b, cb) in zip(main, other):
            assert ca == cb and (a is None) == (b is None) and (a is None or torch.equal(a, b))
    pids = {pid for pid, _, _ in _collect(_Pairs(src), num_workers=2, multiprocessing_context="fork")}
    assert len(pids) == 2 and os.getpid() not in pids
    # The parent's handles still work and were not moved by the children.
    assert [_Pairs(src)[i][2] for i in range(len(src))] == [c for _, _, c in main]
    assert pickle.loads(pickle.dumps(BadSample("why", "k"))).reason == "why"
