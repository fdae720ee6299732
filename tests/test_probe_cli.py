"""aimv2.probe's protocol and the ``aimv2-probe`` CLI (aimv2.probe_cli): run_probe, trunks, data plumbing, JSON
and bad input.

Everything uses the aimv2-tiny preset (56 px, 16 patches of width 64), a few dozen images and a few probe epochs.
"""
import json

import numpy as np
import pytest
import torch

from aimv2.probe import (
    AttentionPoolingClassifier,
    LabelledImages,
    ProbeSettings,
    heldout_shapes,
    probe_forward,
    random_encoder,
    run_probe,
    run_probes,
)
from aimv2.probe_cli import main

FAST = ["--train-size", "32", "--test-size", "16", "--epochs", "2", "--batch-size", "16", "--no-progress"]
FAST_SETTINGS = ProbeSettings(epochs=2, batch_size=16)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step aimv2-tiny training run (the run folder holds its checkpoint)."""
    from aimv2.train import TrainConfig, run

    out = tmp_path_factory.mktemp("probe") / "tiny"
    run(TrainConfig(preset="aimv2-tiny", out=str(out), steps=2, batch_size=4, device="cpu", log_every=1,
                    ckpt_every=2, progress=False))
    return out


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """``root/{red,green,blue}/*.png``: 8 images per class of assorted sizes, classes separable by colour,
    plus one corrupt ``.png`` in ``red`` (must be skipped and counted)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder") / "colours"
    rng = np.random.default_rng(0)
    base = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for name, rgb in base.items():
        (root / name).mkdir(parents=True)
        for k in range(8):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    (root / "red" / "corrupt.png").write_bytes(b"this is not a png")
    return root


def _tiny_data(n_train=32, n_test=16):
    return heldout_shapes(56, n_train, n_test)


# -- the probe's pieces -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim, queries, bn", [(64, 1, True), (256, 3, False), (384, 2, True)])
def test_probe_forward_is_the_module_forward(dim, queries, bn):
    probe = AttentionPoolingClassifier(dim, 5, num_queries=queries, use_batch_norm=bn).double()
    torch.nn.init.normal_(probe.query)  # a peaked softmax, not the near-uniform one of the init
    x = torch.randn(6, 11, dim, dtype=torch.float64) * 2 + 0.3
    for mode in (True, False):
        probe.train(mode)
        ref_logits, ref_pooled = probe(x)
        logits, pooled = probe_forward(probe, x)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pooled, ref_pooled, rtol=1e-10, atol=1e-10)


def test_random_encoder_is_the_trunk_a_training_run_starts_from():
    from aimv2.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(preset="aimv2-tiny", out="unused", steps=1, batch_size=2, device="cpu", seed=3))
    enc = random_encoder("aimv2-tiny", seed=3)
    ref = trainer.model.encoder.state_dict()
    assert enc.state_dict().keys() == ref.keys()
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=0, atol=0, msg=key)
    assert not enc.training
    other = random_encoder("aimv2-tiny", seed=4).state_dict()["trunk.blocks.0.attn.qkv.weight"]
    assert not torch.equal(other, ref["trunk.blocks.0.attn.qkv.weight"])


def test_random_encoder_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    random_encoder("aimv2-tiny", seed=1)
    assert torch.equal(state, torch.get_rng_state())


# -- run_probe ----------------------------------------------------------------------------------------------

def test_run_probe_top1_in_range_and_deterministic():
    enc = random_encoder("aimv2-tiny", seed=0)
    train, test = _tiny_data()
    a = run_probe(enc, train, test, num_classes=5, settings=FAST_SETTINGS, seed=1, progress=False)
    b = run_probe(enc, train, test, num_classes=5, settings=FAST_SETTINGS, seed=1, progress=False)
    assert 0.0 <= a["top1"] <= 1.0 and 0.0 <= a["train_top1"] <= 1.0
    assert a["top1"] == b["top1"] and a["train_top1"] == b["train_top1"]
    for (name, p), q in zip(a["probe"].state_dict().items(), b["probe"].state_dict().values()):
        assert torch.equal(p, q), name
    assert (a["num_train"], a["num_test"], a["num_classes"], a["skipped"]) == (32, 16, 5, 0)
    assert (a["tokens"], a["dim"]) == (16, 64)
    assert not enc.training  # the trunk's mode is restored (it was eval)


def test_run_probe_on_tensors_with_a_split_and_the_trunk_mode_restored():
    enc = random_encoder("aimv2-tiny", seed=0).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(30, 3, 56, 56, generator=gen)
    labels = torch.arange(30) % 3
    r = run_probe(enc, (images, labels), settings=FAST_SETTINGS, test_fraction=0.2, progress=False)
    assert (r["num_train"], r["num_test"], r["num_classes"]) == (24, 6, 3)  # 2 of each class's 10 to test
    assert enc.training


def test_run_probes_share_images_settings_and_seed():
    """Several trunks in one pass give each the result it gets alone."""
    trunks = {"a": random_encoder("aimv2-tiny", seed=0), "b": random_encoder("aimv2-tiny", seed=1)}
    train, test = _tiny_data(24, 12)
    both = run_probes(trunks, train, test, num_classes=5, settings=FAST_SETTINGS, progress=False)
    alone = run_probe(trunks["b"], train, test, num_classes=5, settings=FAST_SETTINGS, progress=False)
    assert set(both) == {"a", "b"}
    assert both["b"]["top1"] == alone["top1"]


def test_run_probe_bad_input_names_the_argument():
    enc = random_encoder("aimv2-tiny", seed=0)
    train, test = _tiny_data(8, 4)
    with pytest.raises(ValueError, match="epochs"):
        run_probe(enc, train, test, settings=ProbeSettings(epochs=0), progress=False)
    with pytest.raises(ValueError, match="test_fraction"):
        run_probe(enc, train, None, test_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="labels"):
        LabelledImages(torch.rand(4, 3, 56, 56), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="normalize"):
        run_probe(enc, train, test, normalize="nope", progress=False)
    with pytest.raises(TypeError, match="data"):
        run_probe(enc, 42, test, progress=False)
    with pytest.raises(ValueError, match="one size"):
        run_probe(enc, [(torch.rand(3, 56, 56), 0), (torch.rand(3, 28, 28), 1)], progress=False)
    with pytest.raises(ValueError, match="no label"):
        run_probe(enc, [(torch.rand(3, 56, 56), 0), (torch.rand(3, 56, 56), -1)], progress=False)


# -- the CLI ------------------------------------------------------------------------------------------------

def test_cli_random_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "probe.json"
    assert main(["--random", "aimv2-tiny", "--out", str(out), *FAST]) == 0
    line = capsys.readouterr().out
    assert "random aimv2-tiny (seed 0): top-1" in line
    report = json.loads(out.read_text())
    assert 0.0 <= report["top1"] <= 1.0
    assert report["num_train"] == 32 and report["num_test"] == 16 and report["num_classes"] == 5
    assert report["normalize"] == "imagenet" and report["image_size"] == 56
    assert report["settings"]["epochs"] == 2 and report["settings"]["grad_clip"] == 3.0
    assert report["settings"]["betas"] == [0.9, 0.999]
    assert "baseline" not in report


def test_cli_checkpoint_vs_random(tiny_run, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["--checkpoint", str(tiny_run), "--preset", "aimv2-tiny", "--vs-random", "--out", str(out),
                 *FAST]) == 0
    text = capsys.readouterr().out
    assert "checkpoint" in text and "random aimv2-tiny" in text and "trained - random" in text
    report = json.loads(out.read_text())
    assert report["trunk"].startswith("checkpoint") and "step_00000002" in report["trunk"]
    assert 0.0 <= report["baseline"]["top1"] <= 1.0 and report["baseline"]["num_test"] == 16
    assert report["seed"] == report["baseline"]["seed"]


def test_cli_pretrained_folder(tmp_path, capsys):
    from aimv2.pretrained import save_encoder

    save_encoder(random_encoder("aimv2-tiny", seed=5), tmp_path / "released")
    out = tmp_path / "p.json"
    assert main(["--pretrained", str(tmp_path / "released"), "--preset", "aimv2-tiny", "--vs-random",
                 "--out", str(out), *FAST]) == 0
    assert "pretrained" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["normalize"] == "clip" and "baseline" in report  # released weights: the CLIP statistics
    assert main(["--pretrained", str(tmp_path / "released"), "--preset", "aimv2-demo", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aimv2-probe: error: --pretrained") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    ([], "one of the arguments --checkpoint --pretrained --random is required"),
    (["--random", "aimv2-tiny", "--checkpoint", "x"], "not allowed with argument"),
    (["--random", "aimv2-nope"], "--random"),
    (["--random", "aimv2-tiny", "--preset", "aimv2-demo"], "--preset aimv2-demo"),
    (["--random", "aimv2-tiny", "--vs-random"], "--vs-random"),
    (["--random", "aimv2-tiny", "--epochs", "0"], "--epochs"),
    (["--random", "aimv2-tiny", "--test-fraction", "1"], "--test-fraction"),
    (["--random", "aimv2-tiny", "--test-data", "x"], "--test-data"),
    (["--random", "aimv2-tiny", "--image-size", "50"], "--image-size 50"),
    (["--random", "aimv2-tiny", "--normalize", "abc"], "--normalize"),
    (["--checkpoint", "/no/such/run"], "--checkpoint /no/such/run: no such file or directory"),
    (["--pretrained", "/no/such/weights"], "--pretrained /no/such/weights: no such file or directory"),
    (["--random", "aimv2-tiny", "--data", "/no/such/folder"], "--data /no/such/folder: no such file"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, needle, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_checkpoint_of_another_preset_is_refused(tiny_run, capsys):
    assert main(["--checkpoint", str(tiny_run), "--preset", "aimv2-demo", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "'aimv2-tiny'" in err and "'aimv2-demo'" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_folder_of_class_subfolders(colour_folder, tmp_path, capsys):
    """Classes separable by colour: even a random trunk gets them; the corrupt image is skipped and counted."""
    pytest.importorskip("aimv2.data.sources")
    out = tmp_path / "folder.json"
    assert main(["--random", "aimv2-tiny", "--data", str(colour_folder), "--epochs", "15", "--batch-size", "8",
                 "--lr", "3e-3", "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_classes"] == 3 and report["skipped"] == 1
    # 8 readable per class; round(20% of 8) = 2 of each class to test
    assert (report["num_train"], report["num_test"]) == (18, 6)
    assert report["top1"] >= 0.8, report
    assert "1 unreadable skipped" in capsys.readouterr().out


def test_cli_folder_with_a_test_folder(colour_folder, tmp_path):
    pytest.importorskip("aimv2.data.sources")
    import shutil

    test_root = tmp_path / "test"
    for name in ("blue", "red"):  # a subset of the classes, labelled in the train folder's classes by name
        shutil.copytree(colour_folder / name, test_root / name)
    out = tmp_path / "t.json"
    assert main(["--random", "aimv2-tiny", "--data", str(colour_folder), "--test-data", str(test_root),
                 "--epochs", "15", "--batch-size", "8", "--lr", "3e-3", "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_train"] == 24 and report["num_test"] == 16 and report["skipped"] == 2
    assert report["top1"] >= 0.8, report


def test_cli_test_folder_with_an_unknown_class_is_refused(colour_folder, tmp_path, capsys):
    pytest.importorskip("aimv2.data.sources")
    from PIL import Image

    (tmp_path / "t" / "purple").mkdir(parents=True)
    Image.new("RGB", (30, 30), (120, 20, 160)).save(tmp_path / "t" / "purple" / "a.png")
    assert main(["--random", "aimv2-tiny", "--data", str(colour_folder), "--test-data", str(tmp_path / "t"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--test-data" in err and "purple" in err and len(err.strip().splitlines()) == 1


def test_cli_operational_errors_are_one_line_exit_1(tiny_run, tmp_path, capsys):
    """Input that exists but cannot be read (see aimv2.cli): one line, exit status 1; a training run given as
    --pretrained is a usage error (exit 2) pointing at --checkpoint."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"not a safetensors file")
    for argv, needle in ((["--checkpoint", str(tmp_path / "empty")], "no checkpoint"),
                         (["--pretrained", str(tmp_path / "weights.safetensors")], "cannot read")):
        assert main([*argv, *FAST]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"aimv2-probe: error: {argv[0]}") and needle in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert main(["--pretrained", str(tiny_run), *FAST]) == 2
    err = capsys.readouterr().err
    assert "training run" in err and f"--checkpoint {tiny_run}" in err and len(err.strip().splitlines()) == 1


def test_cli_out_is_checked_before_the_probe_runs(tmp_path, monkeypatch, capsys):
    """--out naming a folder (exit 2) or a path that cannot be written (exit 1), and a --backend that cannot
    run here (exit 2), are one line before any probe work; an existing --out file is left as it is."""
    import aimv2.probe_cli as probe_cli

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran before --out was checked")

    monkeypatch.setattr(probe_cli, "run_probes", no_probe)
    (tmp_path / "file").write_text("keep")
    for argv, rc, needle in ((["--out", str(tmp_path)], 2, "is a folder"),
                             (["--out", str(tmp_path / "file" / "p.json")], 1, "cannot be written"),
                             (["--backend", "cuda", "--device", "cpu"], 2, "--backend cuda")):
        assert main(["--random", "aimv2-tiny", *argv, *FAST]) == rc, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "file").read_text() == "keep"
    with pytest.raises(AssertionError, match="probe ran"):  # a writable --out: the check lets the probe run
        main(["--random", "aimv2-tiny", "--out", str(tmp_path / "file"), *FAST])
    assert (tmp_path / "file").read_text() == "keep" and not (tmp_path / "p.json").exists()
