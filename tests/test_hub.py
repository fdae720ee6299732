"""Hugging Face hub ids wherever a weights path is accepted (aimv2.hub, through aimv2.weights.read_pretrained).

No network: the hub cache is built here in huggingface_hub's layout
(``<cache>/models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>}``)
and read offline (``HF_HUB_OFFLINE=1``); the online path is exercised with ``model_info`` and
``snapshot_download`` replaced by fakes that record what would be fetched.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")

from aimv2.config import EncoderConfig  # noqa: E402
from aimv2.hub import (  # noqa: E402
    HubCacheMissError,
    HubError,
    HubNotFoundError,
    allow_patterns,
    is_hub_id,
    resolve,
)
from aimv2.layouts import WeightsError  # noqa: E402
from aimv2.model import AIMv2Encoder  # noqa: E402
from aimv2.pretrained import save_encoder  # noqa: E402
from aimv2.weights import read_pretrained  # noqa: E402

REPO = "tiny/aimv2-test"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
ROOT = Path(__file__).resolve().parents[1]
REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


def _tiny(seed: int) -> AIMv2Encoder:
    torch.manual_seed(seed)
    return AIMv2Encoder(EncoderConfig(image_size=28, patch_size=14, dim=64, depth=1, num_heads=1))


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``folder``'s files into ``cache`` as huggingface_hub lays out a downloaded snapshot; its folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two tiny encoders exported in the transformers layout: ``{"a": folder, "b": folder}``."""
    root = tmp_path_factory.mktemp("exported")
    return {"a": save_encoder(_tiny(0), root / "a", layout="hf"), "b": save_encoder(_tiny(1), root / "b", layout="hf")}


def _use_cache(monkeypatch, cache: Path, offline: bool) -> None:
    """Point huggingface_hub at ``cache`` in this process (it reads HF_HUB_CACHE / HF_HUB_OFFLINE at import, so
    its constants are patched too; aimv2.hub reads HF_HUB_OFFLINE at call time)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, exported):
    """An offline cache holding REPO: main -> encoder a (COMMIT_A), tag v1 -> encoder b (COMMIT_B)."""
    cache = tmp_path / "hf-cache"
    add_to_cache(cache, REPO, exported["a"], COMMIT_A, refs=("main",))
    add_to_cache(cache, REPO, exported["b"], COMMIT_B, refs=("v1",))
    _use_cache(monkeypatch, cache, offline=True)
    return cache


def _assert_same(got: tuple, want: tuple) -> None:
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=0, atol=0)


# -- is_hub_id ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", ["apple/aimv2-large-patch14-224", "apple/aimv2-large-patch14-224@main",
                               "apple/aimv2-large-patch14-224-lit", "Org_1/name.v2", "a/b@refs/pr/1",
                               f"a/b@{COMMIT_A}", "a/b@v1.0"])
def test_hub_ids(s):
    assert is_hub_id(s)


@pytest.mark.parametrize("s", ["./x/y", "x/y/", "/abs/x", "/x", "x", "a/b/c", "C:/x", "C:\\x\\y", "a\\b", "~/x",
                               "../x", "x/..", "a/", "a//b", "a/b@", "a/b@x y", "a/b@../x", "a/b@/x", " a/b",
                               "a/b ", "", "-a/b", "a/b-", "a.", "a--b/c", "a/b..c", "x/model.safetensors",
                               "x/weights.bin", "x/config.json", "a/b@c@d", "a/b\n", "é/b",
                               Path("apple/aimv2-large-patch14-224"), None, 3, b"a/b"])
def test_not_hub_ids(s):
    assert not is_hub_id(s)


def test_an_existing_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("owner/name")
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not is_hub_id("owner/name")
    with pytest.raises(FileNotFoundError, match="has none of"):  # a local folder: never the hub
        read_pretrained("owner/name")


# -- loading by id from the cache (offline) ------------------------------------------------------------------

def test_an_id_loads_the_same_tensors_as_the_local_folder(hub_cache, exported):
    _assert_same(read_pretrained(REPO), read_pretrained(exported["a"]))
    enc, local = AIMv2Encoder.from_pretrained(REPO), AIMv2Encoder.from_pretrained(exported["a"])
    assert enc.cfg == local.cfg
    for (k, v), (k2, v2) in zip(enc.state_dict().items(), local.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert resolve(REPO) == hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A


def test_a_revision_pins_the_snapshot(hub_cache, exported):
    b = read_pretrained(exported["b"])
    _assert_same(read_pretrained(f"{REPO}@v1"), b)
    _assert_same(read_pretrained(f"{REPO}@{COMMIT_B}"), b)
    _assert_same(read_pretrained(f"{REPO}@main"), read_pretrained(exported["a"]))
    assert resolve(REPO, revision="v1") == resolve(f"{REPO}@v1") == resolve(f"{REPO}@{COMMIT_B}")
    with pytest.raises(ValueError, match="pins revision"):
        resolve(f"{REPO}@v1", revision="main")
    with pytest.raises(ValueError, match="applies to a hub id"):
        resolve(exported["a"], revision="main")


def _one_line_error(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


def test_a_repo_not_in_the_cache_offline_is_one_line_naming_hf_download(hub_cache):
    with pytest.raises(HubCacheMissError) as info:
        read_pretrained("apple/aimv2-large-patch14-224")
    text = _one_line_error(info)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, WeightsError)
    assert "`hf download apple/aimv2-large-patch14-224`" in text and str(hub_cache) in text, text
    assert "HF_HUB_OFFLINE" in text and "not in the Hugging Face cache" in text, text
    with pytest.raises(HubCacheMissError) as info:  # a revision not cached: the command fetches that one
        read_pretrained(f"{REPO}@v9")
    assert f"`hf download {REPO} --revision v9`" in _one_line_error(info)


def _write_tree_listing(cache: Path, repo_id: str, commit: str, files: list[str]) -> None:
    """The tree listing an online snapshot_download leaves in the cache (``trees/<commit>.json``)."""
    trees = cache / f"models--{repo_id.replace('/', '--')}" / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    listing = {f: {"size": 1, "blob_id": "0" * 40} for f in files}
    (trees / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))


def test_offline_the_cached_listing_picks_the_format_fetched_online(hub_cache, exported):
    """A repo with both formats was fetched online with safetensors only: offline, the missing .bin (and the
    remote code) are not asked for, so the snapshot is complete; a missing safetensors is an interrupted fetch."""
    add_to_cache(hub_cache, "tiny/listed", exported["a"], COMMIT_A)
    _write_tree_listing(hub_cache, "tiny/listed", COMMIT_A, ["config.json", "model.safetensors", "pytorch_model.bin",
                                                             "modeling_aimv2.py", "README.md"])
    _assert_same(read_pretrained("tiny/listed"), read_pretrained(exported["a"]))
    add_to_cache(hub_cache, "tiny/interrupted", exported["a"], COMMIT_A)
    _write_tree_listing(hub_cache, "tiny/interrupted", COMMIT_A, ["config.json", "model.safetensors",
                                                                  "model.safetensors.index.json"])
    with pytest.raises(HubCacheMissError) as info:
        read_pretrained("tiny/interrupted")
    text = _one_line_error(info)
    assert "completely" in text and "hf download tiny/interrupted" in text, text


def test_errors_from_the_files_name_the_hub_id(hub_cache, tmp_path):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    add_to_cache(hub_cache, "tiny/corrupt", tmp_path / "corrupt", COMMIT_A)
    with pytest.raises(WeightsError) as info:
        read_pretrained("tiny/corrupt")
    text = _one_line_error(info)
    assert text.startswith("hub repo tiny/corrupt: cannot read checkpoint file"), text


def test_a_pickled_bin_from_the_hub_is_not_executed(hub_cache, tmp_path):
    """pytorch_model.bin goes through torch.load(weights_only=True): a pickle that would run code is refused."""
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    (tmp_path / "evil").mkdir()
    torch.save({"x": Payload()}, tmp_path / "evil" / "pytorch_model.bin")
    add_to_cache(hub_cache, "tiny/evil", tmp_path / "evil", COMMIT_A)
    with pytest.raises(WeightsError, match="cannot read checkpoint file"):
        read_pretrained("tiny/evil")
    assert not marker.exists()


def test_a_sharded_snapshot_whose_shards_are_blob_symlinks_loads(hub_cache, exported, tmp_path):
    """In the cache every file is a symlink into ../../blobs: a shard resolving there is inside the checkpoint."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(exported["a"] / "model.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((exported["a"] / "config.json").read_bytes())
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    add_to_cache(hub_cache, "tiny/sharded", folder, COMMIT_A)
    _assert_same(read_pretrained("tiny/sharded"), read_pretrained(exported["a"]))


def test_without_huggingface_hub_an_id_says_how_to_install_and_local_paths_load(hub_cache, exported,
                                                                                monkeypatch):
    for name in [m for m in sys.modules if m == "huggingface_hub" or m.startswith("huggingface_hub.")]:
        monkeypatch.setitem(sys.modules, name, None)  # "not installed": every import of it fails
    with pytest.raises(ImportError) as info:
        read_pretrained(REPO)
    text = _one_line_error(info)
    assert "pip install huggingface_hub" in text and "local" in text, text
    assert read_pretrained(exported["a"])[0].dim == 64


def test_the_environment_is_honoured_in_a_fresh_process(hub_cache, exported, tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE set before huggingface_hub is imported, as a user sets them."""
    out = tmp_path / "sd.safetensors"
    code = ("import sys\n"
            "from safetensors.torch import save_file\n"
            "from aimv2.weights import HubCacheMissError, read_pretrained\n"
            f"save_file(read_pretrained({REPO!r})[1], {str(out)!r})\n"
            "try:\n"
            "    read_pretrained('tiny/not-cached')\n"
            "except HubCacheMissError as exc:\n"
            "    print(exc)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "hf download tiny/not-cached" in done.stdout and str(hub_cache) in done.stdout, done.stdout
    from safetensors.torch import load_file

    got = load_file(str(out))
    want = read_pretrained(exported["a"])[1]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- online (faked): what is fetched, and the hub's errors ---------------------------------------------------

RELEASED = ["config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack", "README.md",
            ".gitattributes", "configuration_aimv2.py", "modeling_aimv2.py", "preprocessor_config.json"]
LIT = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
       "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
       "special_tokens_map.json", "modeling_aimv2.py", "preprocessor_config.json"]
BIN_ONLY = ["config.json", "pytorch_model.bin", "README.md", "tf_model.h5"]
BIN_SHARDED = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
               "pytorch_model-00002-of-00002.bin", "modeling_aimv2.py"]


@pytest.fixture
def online(tmp_path, monkeypatch, exported):
    """The hub faked: ``files`` is the repo listing, ``calls`` the recorded snapshot_download keyword args."""
    _use_cache(monkeypatch, tmp_path / "empty-cache", offline=False)
    state = {"files": RELEASED, "calls": [], "list_error": None}

    def model_info(repo_id, *, revision=None, **kwargs):
        if state["list_error"] is not None:
            raise state["list_error"]
        return SimpleNamespace(sha=COMMIT_A, siblings=[SimpleNamespace(rfilename=f) for f in state["files"]])

    def snapshot_download(repo_id, **kwargs):
        state["calls"].append({"repo_id": repo_id, **kwargs})
        return str(exported["a"])

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def _fetched(files, patterns):
    from huggingface_hub.utils import filter_repo_objects

    return set(filter_repo_objects(files, allow_patterns=patterns))


@pytest.mark.parametrize("files, expected", [
    (RELEASED, {"config.json", "model.safetensors", "preprocessor_config.json"}),
    (LIT, set(LIT) - {"modeling_aimv2.py"}),
    (BIN_ONLY, {"config.json", "pytorch_model.bin"}),
    (BIN_SHARDED, set(BIN_SHARDED) - {"modeling_aimv2.py"}),
])
def test_only_what_loading_needs_is_requested(online, exported, files, expected):
    online["files"] = files
    _assert_same(read_pretrained("apple/aimv2-large-patch14-224@v2"), read_pretrained(exported["a"]))
    (call,) = online["calls"]
    assert call["repo_id"] == "apple/aimv2-large-patch14-224" and call["revision"] == "v2"
    assert call["local_files_only"] is False
    assert _fetched(files, call["allow_patterns"]) == expected
    assert not any(k in call for k in ("trust_remote_code", "local_dir"))


def test_without_a_listing_both_weight_formats_are_allowed():
    patterns = allow_patterns(None)
    assert _fetched(RELEASED, patterns) == {"config.json", "model.safetensors", "pytorch_model.bin",
                                            "preprocessor_config.json"}


def test_a_repo_without_weights_is_one_line(online):
    online["files"] = ["README.md", "config.json", "open_clip_pytorch_model.bin"]
    with pytest.raises(HubError) as info:
        read_pretrained("apple/not-weights")
    text = _one_line_error(info)
    assert "has no weights" in text and "open_clip_pytorch_model.bin" in text and not online["calls"]


def _hub_error(name: str, message: str) -> Exception:
    cls = getattr(__import__("huggingface_hub.errors", fromlist=[name]), name)
    err = cls.__new__(cls)  # no HTTP response needed: the message is all that is read
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize("name, kind, needle", [
    ("RepositoryNotFoundError", HubNotFoundError, "the Hugging Face hub has no model repo apple/nope"),
    ("GatedRepoError", HubError, "is gated"),
    ("RevisionNotFoundError", HubNotFoundError, "has no revision 'v2'"),
])
def test_the_hubs_errors_are_one_line(online, name, kind, needle):
    online["list_error"] = _hub_error(name, f"404 Client Error\nRepository Not Found for url: ...\n{name}")
    with pytest.raises(kind) as info:
        read_pretrained("apple/nope@v2")
    text = _one_line_error(info)
    assert needle in text, text
    assert isinstance(info.value, WeightsError) and not online["calls"]


def test_an_unreachable_hub_falls_back_to_the_cache(online, monkeypatch, tmp_path, exported):
    cache = tmp_path / "cache"
    add_to_cache(cache, REPO, exported["b"], COMMIT_B)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", REAL_SNAPSHOT_DOWNLOAD)  # the cache, for real
    online["list_error"] = ConnectionError("no route to host")
    _assert_same(read_pretrained(REPO), read_pretrained(exported["b"]))
    with pytest.raises(HubCacheMissError) as info:
        read_pretrained("apple/aimv2-large-patch14-224")
    text = _one_line_error(info)
    assert "could not be reached" in text and "no route to host" in text and str(cache) in text, text


# -- aimv2-probe --pretrained ID -----------------------------------------------------------------------------

FAST = ["--train-size", "16", "--test-size", "8", "--epochs", "1", "--batch-size", "8", "--no-progress"]


def test_probe_pretrained_hub_id(hub_cache, tmp_path, capsys):
    from aimv2.probe import random_encoder
    from aimv2.probe_cli import main

    add_to_cache(hub_cache, "tiny/probe-tiny", save_encoder(random_encoder("aimv2-tiny", seed=5), tmp_path / "t"),
                 COMMIT_A)
    assert main(["--pretrained", "tiny/probe-tiny", "--preset", "aimv2-tiny", *FAST]) == 0
    assert "pretrained tiny/probe-tiny" in capsys.readouterr().out
    assert main(["--pretrained", "apple/aimv2-large-patch14-224", *FAST]) == 1  # offline and not cached
    err = capsys.readouterr().err
    assert err.startswith("aimv2-probe: error: --pretrained apple/aimv2-large-patch14-224: ") and \
        "hf download apple/aimv2-large-patch14-224" in err and len(err.strip().splitlines()) == 1, err
    assert main(["--pretrained", "no/such/weights", *FAST]) == 2  # not an id (3 parts), not a path
    assert "no such file or directory" in capsys.readouterr().err


def test_probe_pretrained_unknown_repo_is_a_usage_error(online, capsys):
    from aimv2.probe_cli import main

    online["list_error"] = _hub_error("RepositoryNotFoundError", "404 Client Error")
    assert main(["--pretrained", "apple/nope", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aimv2-probe: error: --pretrained apple/nope: ") and "no model repo" in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_processor_reads_a_hub_repos_preprocessor_config(hub_cache):
    """AIMv2ImageProcessor.from_pretrained(hub id): the cached snapshot's preprocessor_config.json."""
    from aimv2.processor import AIMv2ImageProcessor

    got = AIMv2ImageProcessor.from_pretrained(REPO)
    assert got == AIMv2ImageProcessor.from_preset("released", image_size=28)
