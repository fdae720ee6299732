"""No input stops or hangs the data loader: malformed tar headers, huge or nested JSON captions, symlink loops
and links out of the data root, FIFOs, and images whose header declares a huge size.

Tars are built by hand (``tarfile`` header blocks with fields overwritten and the checksum recomputed), so
every case is exactly the damage named. Each check runs under a deadline (SIGALRM), so a hang fails the test
instead of stopping the suite.
"""

import contextlib
import io
import json
import os
import signal
import struct
import tarfile
import tempfile
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from aimv2.data import BadSample, ClassFolder, CSVSource, ImageFolderCaptions, JSONLSource, TarShards, open_source
from aimv2.data import decode as decode_mod
from aimv2.data.decode import MAX_CAPTION_BYTES, MAX_IMAGE_PIXELS, MAX_JSON_DEPTH, decode_image
from aimv2.data.loader import _train_min_side
from aimv2.data.paths import _walk
from aimv2.data.tar_index import MAX_LONG_NAME_BYTES, MAX_PAX_HEADER_BYTES, _tar_members
from aimv2.data.transforms import TrainTransform

TIB = 1 << 40
pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM for the deadlines")


@contextlib.contextmanager
def deadline(seconds: float = 5.0):
    """Raise TimeoutError in the block when it runs longer than ``seconds`` (a hang becomes a failure)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------------------------
# Hand-built tars
# --------------------------------------------------------------------------------------------------------

def fix_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def header(name: str, size: int = 0, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """One ustar header block; ``size_field`` (12 bytes) overwrites the size as written, e.g. base-256."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = kind, (size if size_field is None else 0)
    block = bytearray(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    if size_field is not None:
        assert len(size_field) == 12
        block[124:136] = size_field
    return fix_checksum(block)


def base256(n: int) -> bytes:
    """A GNU base-256 size field: 0x80 then 11 big-endian bytes, or 0xff and two's complement when negative."""
    return (b"\x80" + n.to_bytes(11, "big")) if n >= 0 else (b"\xff" + ((1 << 88) + n).to_bytes(11, "big"))


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: str, data: bytes, kind: bytes = b"0") -> bytes:
    return header(name, len(data), kind) + pad(data)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


END = bytes(1024)
GOOD = member("a.txt", b"first caption")  # the member before the damage, which the scan keeps


def scan(tmp_path, data: bytes, name: str = "t.tar"):
    """``(members, warning messages)`` of a tar holding ``data``, under a deadline."""
    path = tmp_path / name
    path.write_bytes(data)
    with deadline(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = list(_tar_members(str(path)))
    return members, [str(w.message) for w in caught]


def test_negative_base256_size_ends_the_scan(tmp_path):
    """Today a negative size sends the scan back to an earlier header, forever."""
    for size in (-512, -1024, -1):
        data = GOOD + header("b.txt", size_field=base256(size)) + pad(b"x" * 600) + END
        members, warned = scan(tmp_path, data)
        assert [m[0] for m in members] == ["a.txt"]
        assert len(warned) == 1 and "negative size" in warned[0] and "stopped indexing at byte 1024" in warned[0]


def test_member_declaring_1tib_is_damaged_not_listed(tmp_path):
    data = GOOD + header("b.txt", size_field=base256(TIB)) + pad(b"x" * 100) + END
    members, warned = scan(tmp_path, data)
    assert members == [("a.txt", 512, 13)]
    assert len(warned) == 1 and "truncated inside the member at byte 1024" in warned[0]
    # The same for an octal size just past the end of the file: the member is not listed.
    data = GOOD + header("b.txt", 2000) + pad(b"x" * 100)
    assert scan(tmp_path, data)[0] == [("a.txt", 512, 13)]


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_metadata_header_declaring_1tib_is_not_read(tmp_path, kind):
    data = GOOD + header("././@meta", size_field=base256(TIB), kind=kind) + pad(b"x" * 100) + END
    members, warned = scan(tmp_path, data)
    assert [m[0] for m in members] == ["a.txt"]
    assert len(warned) == 1 and "over the limit" in warned[0]


def test_metadata_header_past_the_end_of_the_file(tmp_path):
    data = GOOD + header("././@PaxHeader", 5000, kind=b"x") + pad(pax_record("path", "b.txt"))
    members, warned = scan(tmp_path, data)
    assert [m[0] for m in members] == ["a.txt"] and "truncated inside the pax header" in warned[0]


def test_negative_and_huge_pax_sizes(tmp_path):
    for value, message in (("-1", "bad pax size"), ("-99999", "bad pax size"), (" 12", "bad pax size"),
                           ("1_0", "bad pax size"), ("0x10", "bad pax size"), (str(TIB), "truncated inside")):
        pax = pax_record("size", value)
        data = GOOD + member("././@PaxHeader", pax, kind=b"x") + member("b.txt", b"0123456789") + END
        members, warned = scan(tmp_path, data)
        assert [m[0] for m in members] == ["a.txt"], value
        assert all(size >= 0 for _, _, size in members)
        assert len(warned) == 1 and message in warned[0], (value, warned)
    # A good pax size still overrides the header's.
    data = GOOD + member("././@PaxHeader", pax_record("size", "4"), kind=b"x") + member("b.txt", b"0123") + END
    assert scan(tmp_path, data) == ([("a.txt", 512, 13), ("b.txt", 2560, 4)], [])


@pytest.mark.parametrize("records", [
    b"abc path=b.txt\n",  # the length is not a number (today: ValueError out of the scan)
    b"0 path=b.txt\n",  # zero
    b"5 path=b.txt\n",  # shorter than its own prefix
    b"99999 path=b.txt\n",  # past the end of the header
    b"14 path=b.txtX",  # not ended by a newline
    b"10 nokey\n",  # no key=value
    b"-5 path=b.txt\n",
    b"1" * 40 + b" path=b.txt\n",  # a length of 40 digits
])
def test_bad_pax_records_end_the_scan(tmp_path, records):
    data = GOOD + member("././@PaxHeader", records, kind=b"x") + member("b.txt", b"text") + END
    members, warned = scan(tmp_path, data)
    assert [m[0] for m in members] == ["a.txt"]
    assert len(warned) == 1 and "bad pax record" in warned[0]


def test_long_name_record_over_the_limit_is_not_read(tmp_path):
    long = b"n" * (MAX_LONG_NAME_BYTES + 1)
    data = GOOD + member("././@LongLink", long, kind=b"L") + member("b.txt", b"text") + END
    members, warned = scan(tmp_path, data)
    assert [m[0] for m in members] == ["a.txt"]
    assert len(warned) == 1 and f"over the limit of {MAX_LONG_NAME_BYTES}" in warned[0]
    # Just under the limit is a (long) name.
    name = "d/" + "n" * 5000 + ".txt"
    data = GOOD + member("././@LongLink", name.encode() + b"\0", kind=b"L") + member("b.txt", b"text") + END
    assert [m[0] for m in scan(tmp_path, data)[0]] == ["a.txt", name]
    big_pax = pax_record("comment", "c" * MAX_PAX_HEADER_BYTES)
    data = GOOD + member("././@PaxHeader", big_pax, kind=b"x") + member("b.txt", b"text") + END
    members, warned = scan(tmp_path, data)
    assert [m[0] for m in members] == ["a.txt"] and f"over the limit of {MAX_PAX_HEADER_BYTES}" in warned[0]


def test_gnu_long_link_name_is_not_read_as_pax(tmp_path):
    """A GNU tar whose symlink has a long target with a space: the ``K`` record is a link name, not pax
    records (today its "my" is parsed as a record length and the scan raises)."""
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("link.txt")
        ti.type, ti.linkname = tarfile.SYMTYPE, "my " + "t" * 120 + ".txt"
        tf.addfile(ti)
        ti = tarfile.TarInfo("b.txt")
        ti.size = 4
        tf.addfile(ti, io.BytesIO(b"text"))
    members, warned = scan(tmp_path, path.read_bytes(), "gnu2.tar")
    assert [m[0] for m in members] == ["b.txt"] and warned == []


# --------------------------------------------------------------------------------------------------------
# Fuzzing the tar scanner
# --------------------------------------------------------------------------------------------------------

def _seed_tars() -> list[bytes]:
    """Small valid tars in pax and GNU format (pax records, long names), cut after their end blocks."""
    out = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, data in (("a.txt", b"caption"), ("d/" + "x" * 120 + ".png", b"\x89PNG" * 40),
                               ("ünï.json", b'{"caption": "c"}')):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            end = tf.offset
        out.append(buf.getvalue()[:end + 1024])
    return out


def _is_header(block: bytes) -> bool:
    try:
        return bool(block.strip(b"\0")) and tarfile.calc_chksums(block)[0] == int(block[148:154], 8)
    except ValueError:
        return False


SEEDS = _seed_tars()
# The header blocks of each seed, so a mutation can keep its header's checksum right and reach the field
# checks behind it.
HEADER_BLOCKS = [[k for k in range(0, len(s), 512) if _is_header(s[k:k + 512])] for s in SEEDS]
FIELD_VALUES = [base256(-1024), base256(TIB), b"-0000001000\0", b"77777777777\0", b"\0" * 12, b"x", b"L",
                b"K", b"g", b"99999 path=", b"-1 size=1\n", b"30 size=-5\n", b"1 ", b"\n"]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, len(SEEDS) - 1),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
       fields=st.lists(st.tuples(st.integers(0, 20), st.sampled_from([0, 124, 156, 345, 512]),
                                 st.sampled_from(FIELD_VALUES)), max_size=3),
       fix=st.booleans(), cut=st.none() | st.integers(0, 1 << 20))
def test_fuzz_tar_scanner(seed, edits, fields, fix, cut):
    """Random byte and field edits of a small valid tar (its header checksums recomputed half of the time),
    maybe cut short: the scan either raises the documented ValueError (a first header that is not a tar
    header) or lists members that lie inside the file, in increasing order, with at most UserWarnings; and
    it ends (under a deadline). 150 examples, about 1 s."""
    data = bytearray(SEEDS[seed])
    for pos, value in edits:
        data[pos % len(data)] = value
    for header_index, field, value in fields:  # a field of a header block (512: its record's first bytes)
        blocks = HEADER_BLOCKS[seed]
        start = (blocks[header_index % len(blocks)] + field) % len(data)
        data[start:start + len(value)] = value
    if fix:
        for k in HEADER_BLOCKS[seed]:
            data[k:k + 512] = fix_checksum(bytearray(data[k:k + 512]))
    data = bytes(data if cut is None else data[:cut % len(data)])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f.tar")
        with open(path, "wb") as f:
            f.write(data)
        with deadline(2.0), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                members = list(_tar_members(path))
            except ValueError as exc:
                assert "is not a readable uncompressed tar file" in str(exc)
                return
    assert all(issubclass(w.category, UserWarning) for w in caught)
    last = 0
    for name, offset, size in members:
        assert isinstance(name, str)
        assert offset > last and offset % 512 == 0 and size >= 0 and offset + size <= len(data)
        last = offset


# --------------------------------------------------------------------------------------------------------
# JSON captions and JSONL lines
# --------------------------------------------------------------------------------------------------------

def _png(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size, quality=90) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize(size).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


NESTED = "[" * 100_000 + "]" * 100_000  # json.loads recurses: RecursionError today


def test_nested_json_in_a_jsonl_source_is_a_bad_sample(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    lines = [json.dumps({"image": "a.png", "caption": "fine"}),
             '{"image": "a.png", "caption": ' + NESTED + "}",
             NESTED,
             '{"image": "a.png", "caption": "' + "[" * 10_000 + '"}',  # brackets inside a string are text
             json.dumps({"image": "a.png", "caption": "c" * (MAX_CAPTION_BYTES + 10)}),  # a line over the limit
             json.dumps({"image": "a.png", "caption": "after"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with deadline():
        src = JSONLSource(tmp_path / "d.jsonl")
    assert len(src) == 6 and src.raw(0).caption == "fine" and src.raw(5).caption == "after"
    assert src.raw(3).caption == "[" * 10_000
    for i, reason in ((1, f"nested deeper than {MAX_JSON_DEPTH}"), (2, f"nested deeper than {MAX_JSON_DEPTH}"),
                      (4, "limit")):
        with pytest.raises(BadSample, match=reason):
            src.raw(i)
    assert src.key(5).endswith(":6")  # line numbers count the skipped long line


def test_nested_and_huge_json_captions_in_tars_and_folders(tmp_path):
    deep = '{"caption": ' + "[" * 5000 + "]" * 5000 + "}"
    path = tmp_path / "s.tar"
    path.write_bytes(member("a.png", _png()) + member("a.json", deep.encode()) + member("b.png", _png())
                     + member("b.txt", b"x" * (MAX_CAPTION_BYTES + 1)) + member("c.png", _png())
                     + member("c.json", b'{"caption": "ok"}') + END)
    src = TarShards(str(path), index_cache=False)
    with pytest.raises(BadSample, match="nested deeper"):
        src.raw(0)
    with pytest.raises(BadSample, match="over the .*limit"):
        src.raw(1)
    assert src.raw(2).caption == "ok"
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "a.json").write_text(deep)
    (folder / "b.png").write_bytes(_png())
    (folder / "b.txt").write_text("y" * (MAX_CAPTION_BYTES + 1))
    src = ImageFolderCaptions(folder)
    with pytest.raises(BadSample, match="nested deeper"):
        src.raw(0)
    with pytest.raises(BadSample, match="over the .*limit"):
        src.raw(1)


# --------------------------------------------------------------------------------------------------------
# Folder walks: symlinks, loops, FIFOs
# --------------------------------------------------------------------------------------------------------

def test_walk_stays_in_the_root_and_ends(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "cls").mkdir(parents=True)
    (outside / "stolen").mkdir(parents=True)
    (root / "cls" / "a.png").write_bytes(_png())
    (outside / "stolen" / "b.png").write_bytes(_png())
    (outside / "c.png").write_bytes(_png())
    os.symlink(outside, root / "escape")  # a directory link out of the root
    os.symlink(outside / "c.png", root / "cls" / "evil.png")  # a file link out of the root
    os.symlink("../..", root / "cls" / "up")  # out of the root through ..
    os.symlink(root, root / "cls" / "loop")  # a loop back to the root
    os.symlink("self.png", root / "cls" / "self.png")  # a link to itself
    os.symlink("x.png", root / "cls" / "y.png")  # a link cycle between two files
    os.symlink("y.png", root / "cls" / "x.png")
    os.symlink("gone.png", root / "cls" / "broken.png")
    os.symlink("a.png", root / "cls" / "alias.png")  # inside the root: kept
    os.mkfifo(root / "cls" / "fifo.png")  # would block a reader forever
    with deadline():
        listing = _walk(str(root))
        src = ClassFolder(root)
        detected = open_source(root)
    assert listing == [("", []), ("cls", ["a.png", "alias.png"])]
    assert src.classes == ["cls"] and len(src) == 2 and len(detected) == 2
    assert sorted(os.path.basename(src.key(i)) for i in range(2)) == ["a.png", "alias.png"]


def test_walk_follows_links_inside_the_root_once(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "a" / "deep" / "x.png").write_bytes(_png())
    (root / "a" / "deep" / "x.txt").write_text("cap")
    os.symlink(root / "a", root / "b")  # a second name for a directory inside the root
    os.symlink("..", root / "a" / "deep" / "parent")  # a loop
    with deadline():
        listing = _walk(str(root))
    assert [rel for rel, _ in listing] == ["", "a", os.path.join("a", "deep")]
    assert len(ImageFolderCaptions(root)) == 1


def test_fifo_and_device_paths_do_not_block(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "rows.csv").write_text(f"image,caption\n{fifo},a fifo\n/dev/zero,endless\n")
    src = CSVSource(tmp_path / "rows.csv")
    for i in range(2):
        with deadline(), pytest.raises(BadSample, match="not a regular file"):
            src.raw(i)
    shard = tmp_path / "shard.tar"
    os.mkfifo(shard)
    with deadline(), pytest.raises(ValueError, match="not a regular file"):
        TarShards(str(shard), index_cache=False)


# --------------------------------------------------------------------------------------------------------
# Images: declared size, reduced-size decoding
# --------------------------------------------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring ``width x height`` RGB, then a tiny (truncated) IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))


def _bmp_header(width: int, height: int) -> bytes:
    """A BMP file and info header declaring ``width x height`` at 24 bits, with almost no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 14 + 40) + info + bytes(16)


@pytest.mark.parametrize("make,size", [(_png_header, (100_000, 100_000)), (_png_header, (9000, 9000)),
                                       (_bmp_header, (9000, 9000)), (_bmp_header, (100_000, 100_000))])
def test_image_declaring_a_huge_size_is_refused_before_decoding(monkeypatch, make, size):
    """9000 x 9000 (81 MP) is under Pillow's own bomb limit: today it is decoded (allocated) until the data
    runs out; now the header alone refuses it."""
    def no_load(self, *a, **k):
        raise AssertionError("decoded an image the header declared too large")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(BadSample, match="image too large") as exc:
        decode_image(make(*size))
    assert size[0] * size[1] > MAX_IMAGE_PIXELS
    if size[0] * size[1] < 2 * Image.MAX_IMAGE_PIXELS:
        assert f"over the limit of {MAX_IMAGE_PIXELS}" in exc.value.reason


def test_pixel_limit_is_a_module_constant(monkeypatch):
    assert decode_image(_png((20, 20))).size == (20, 20)
    monkeypatch.setattr(decode_mod, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(BadSample, match="400 pixels"):
        decode_image(_png((20, 20)))


def test_big_jpeg_is_decoded_at_reduced_size(tmp_path):
    data = _jpeg((1600, 1200))
    assert decode_image(data).size == (1600, 1200)
    assert decode_image(data, min_side=200).size == (400, 300)  # 1/4: both sides still >= 200
    assert decode_image(data, min_side=500).size == (800, 600)  # 1/2
    assert decode_image(data, min_side=700).size == (1600, 1200)  # not twice as large: full size
    assert decode_image(_png((64, 48)), min_side=8).size == (64, 48)  # only JPEG has reduced decoding
    path = tmp_path / "s.tar"
    path.write_bytes(member("a.jpg", data) + member("a.txt", b"big") + END)
    src = TarShards(str(path), index_cache=False)
    assert src.raw(0, min_side=400).image.size == (800, 600) and src.raw(0).image.size == (1600, 1200)
    # The loader asks for no less than the smallest crop of its TrainTransform needs.
    side = _train_min_side(TrainTransform(224))
    assert 224 / np.sqrt(0.4 * 0.75) <= side <= 224 / np.sqrt(0.4 * 0.75) + 2
    assert _train_min_side(lambda img, rng: img) is None
