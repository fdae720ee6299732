"""aimv2-train on real data: webdataset shards with a corrupt sample, CSV files, native resolution, bad paths."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.train import TrainConfig, Trainer, main, run


def _jpeg(rng, mode="RGB", size=(48, 40)) -> bytes:
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(root, n_shards=2, per_shard=12, corrupt=("000003",)):
    """Webdataset shards: jpg (RGB, greyscale, CMYK) or png (RGBA) + txt, one corrupt jpg, one json caption."""
    rng = np.random.default_rng(0)
    root.mkdir()
    modes = ("RGB", "L", "CMYK", "RGBA")
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s * per_shard + i:06d}"
                mode = modes[i % 4]
                ext = "png" if mode == "RGBA" else "jpg"
                data = b"\xff\xd8 this is not a jpeg" if key in corrupt else _jpeg(rng, mode)
                _add(tar, f"{key}.{ext}", data)
                if i == 5:
                    _add(tar, f"{key}.json", json.dumps({"caption": f"a json caption {key}"}).encode())
                else:
                    _add(tar, f"{key}.txt", ("a long caption " * 20 + key).encode())  # > 77 tokens: truncated
    return root


def _cfg(tmp_path, **kw):
    base = dict(preset="aimv2-tiny", out=str(tmp_path / "run"), steps=3, batch_size=4, lr=1e-3, warmup_steps=1,
                log_every=1, ckpt_every=3, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_train_on_webdataset_shards_skips_and_reports_corrupt_images(tmp_path, capsys):
    shards = _shards(tmp_path / "shards")
    summary = run(_cfg(tmp_path, data=str(shards), steps=6, workers=2, normalize="clip"))
    rows = [json.loads(line) for line in summary["metrics"].read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
    # 24 samples, batch 4: every sample is read once in 6 steps, the corrupt one among them
    assert len(summary["skipped"]) == 1 and "shard-000.tar" in summary["skipped"][0][0]
    assert "000003" in summary["skipped"][0][0]
    report = json.loads(summary["skipped_file"].read_text())
    assert report[0]["reason"]
    assert "skipped 1 unreadable samples" in capsys.readouterr().err


def test_caption_longer_than_the_context_is_truncated(tmp_path):
    trainer = Trainer(_cfg(tmp_path, data=str(_shards(tmp_path / "shards")), augment=False))
    batch = next(trainer.loader)
    assert batch.tokens.shape == (4, 24)  # aimv2-tiny's context length
    assert (batch.tokens[:, -1] == trainer.tokenizer.eos_id).all()  # cut, the EOS kept last
    assert batch.images.shape == (4, 3, 56, 56)


@pytest.mark.slow
def test_train_on_a_csv_file(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    lines = ["filepath,caption"]
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,a picture {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    summary = run(_cfg(tmp_path, data=str(tmp_path / "pairs.csv"), steps=2, ckpt_every=2))
    assert summary["last"]["step"] == 2 and summary["skipped"] == []


@pytest.mark.slow
def test_native_resolution_training_uses_sincos_and_budgets(tmp_path):
    trainer = Trainer(_cfg(tmp_path, native_resolution=True, native_budgets=(3, 5), batch_size=8))
    assert trainer.model_cfg.encoder.pos_embed == "sincos"
    assert trainer.model.encoder.preprocessor.pos_embed is None
    seen = set()
    for _ in range(4):
        m = trainer.train_step()
        assert np.isfinite(m["loss"])
        seen.add(m["patches"])
        assert m["images"] * m["patches"] == 8 * 16  # the patches per batch stay constant
    assert seen <= {8, 16, 32}


@pytest.mark.parametrize("argv,needle", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--normalize", "sunset"], "--normalize"),
    (["--native-budgets", "9,3"], "--native-budgets"),
    (["--workers", "-1"], "--workers"),
])
def test_bad_data_flags_are_one_line_errors(argv, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "aimv2-tiny", "--out", str(tmp_path / "x"), "--device", "cpu", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_empty_data_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--preset", "aimv2-tiny", "--out", str(tmp_path / "x"), "--device", "cpu", "--no-progress",
                 "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "empty") in err[0]


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    trainer = Trainer(_cfg(tmp_path, steps=1))
    trainer.train_step()
    trainer.save()
    other = Trainer(_cfg(tmp_path, steps=2, native_resolution=True))  # same preset name, sin-cos positions
    from aimv2.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="pos_embed"):
        other.resume("latest")
    torch.manual_seed(0)
