"""aimv2-train's run description and switches: --config files, micro-batches, activation checkpointing, compile,
--init-from, the warm-up default, the byte-tokenizer refusal, --keep-checkpoints and the metrics sinks of a run.

Equalities here are "to fp32 rounding": a micro-batched step sums the same per-sample terms in another order (two
partial means weighted by their counts instead of one mean), so its losses and updates agree with the whole
batch's to a few ulps, which a few AdamW steps amplify (seen: up to 3e-7 relative over three steps). RTOL = 1e-5
leaves room for another machine's summation order and still fails any real difference: a micro-batch weighted by
its own mean instead of its share of the global one moves the loss by more than 1e-3.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from aimv2.config import PAPER_WARMUP_STEPS, AIMv2Config
from aimv2.layers import resize_pos_embed
from aimv2.train import TrainConfig, Trainer, lr_at, main, parse_args, run, warmup_steps

RTOL = 1e-5


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(preset="aimv2-tiny", out=str(tmp_path / "run"), steps=3, batch_size=8, lr=3e-3, warmup_steps=1,
                backend="reference", device="cpu", log_every=1, ckpt_every=100, progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


# -- --config -------------------------------------------------------------------------------------------------
def _write(path, text: str):
    path.write_text(text)
    return str(path)


def test_config_file_sets_flags_and_typed_flags_override_it(tmp_path):
    file = _write(tmp_path / "run.toml", '\n'.join([
        'preset = "aimv2-tiny"', "steps = 40", "batch-size = 16", "micro_batch_size = 4", "augment = false",
        "native-budgets = [7, 9]", "betas = [0.9, 0.98]", 'activation-checkpointing = "selective"', "lr = 5e-4",
        "tensorboard = false", "compile = true", "weight-decay = 0.0"]))
    cfg = parse_args(["--config", file, "--steps", "7", "--lr", "1e-3", "--no-compile"])
    assert (cfg.preset, cfg.batch_size, cfg.micro_batch_size) == ("aimv2-tiny", 16, 4)
    assert cfg.steps == 7 and cfg.lr == 1e-3 and cfg.compile is False  # the typed flags win
    assert cfg.augment is False and cfg.tensorboard is False and cfg.weight_decay == 0.0
    assert cfg.native_budgets == (7, 9) and cfg.betas == (0.9, 0.98)
    assert cfg.activation_checkpointing == "selective" and cfg.config == file
    # and without typed flags, the file's values
    cfg = parse_args(["--config", file])
    assert cfg.steps == 40 and cfg.lr == 5e-4 and cfg.compile is True


@pytest.mark.parametrize("text, expected", [
    ("stepz = 3", "unknown key 'stepz'"),
    ("[train]\nsteps = 3", "key 'train' is a table"),
    ("steps = [1, 2]", "steps"),
    ("augment = 1", "key 'augment' must be true or false"),
    ("steps = true", "key 'steps' must be a number or a string"),
    ("config = 'other.toml'", "unknown key 'config'"),
    ("steps = ", "is not valid TOML"),
    ('activation-checkpointing = "some"', "invalid choice"),
    ("steps = 0", "--steps must be at least 1"),
])
def test_config_file_errors_name_the_key_and_the_file(tmp_path, capsys, text, expected):
    file = _write(tmp_path / "bad.toml", text)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", file])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    if "key" in expected or "TOML" in expected:
        assert str(file) in err


def test_missing_config_file_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", str(tmp_path / "nope.toml")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_run_folder_keeps_the_resolved_config_and_it_reads_back(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "aimv2-tiny", "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--micro-batch-size", "2", "--native-budgets", "7,8", "--no-progress", "--no-tensorboard",
                 "--keep-checkpoints", "1", "--ckpt-every", "1"]) == 0
    err = capsys.readouterr().err
    # the banner: preset and parameters, device and dtype, backends, world size, batches, patches and tokens
    for needle in ("preset aimv2-tiny", "M parameters", "device cpu", "fp32", "world size 1",
                   "prefix_attention=", "patch_mse_loss=", "linear_cross_entropy=",
                   "batch 4 global = 1 x 4 per rank = 2 micro-batch(es) of up to 2", "64 patches", "96 caption tokens",
                   "warm-up 1 (10% of the run)"):
        assert needle in err, needle
    again = parse_args(["--config", str(out / "config.toml")])
    first = parse_args(["--preset", "aimv2-tiny", "--out", str(out), "--steps", "2", "--batch-size", "4",
                        "--micro-batch-size", "2", "--native-budgets", "7,8", "--no-progress", "--no-tensorboard",
                        "--keep-checkpoints", "1", "--ckpt-every", "1"])
    assert dataclasses.replace(again, config=None) == first
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]  # --keep-checkpoints 1
    assert not (out / "tensorboard").exists()  # --no-tensorboard


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("file", CONFIGS, ids=[f.name for f in CONFIGS])
def test_shipped_configs_parse(file, tmp_path):
    """Every example config is a valid run description (its --init-from, a stage-1 run folder, given here)."""
    argv = ["--config", str(file), "--out", str(tmp_path / "out")]
    if "init-from" in file.read_text():
        argv += ["--init-from", str(tmp_path)]
    cfg = parse_args(argv)
    assert cfg.config == str(file) and cfg.preset
    if cfg.preset != "aimv2-demo":
        assert cfg.batch_size == 8192 and cfg.tokenizer.endswith(".model")
    if "stage" in file.name:
        assert cfg.weight_decay == 0.0 and cfg.init_from == str(tmp_path)  # the paper's high-resolution recipe


def test_demo_config_is_the_make_demo_run():
    assert len(CONFIGS) >= 5
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "--config configs/demo.toml" in makefile


# -- the paper's defaults ---------------------------------------------------------------------------------------
def test_warmup_follows_the_paper_for_released_presets():
    large = AIMv2Config.from_name("aimv2-large-patch14-224")
    assert large.warmup_steps == PAPER_WARMUP_STEPS == 12_500
    assert AIMv2Config.from_name("aimv2-large-patch14-native").warmup_steps == 12_500
    assert warmup_steps(TrainConfig(steps=1_500_000), large.warmup_steps) == 12_500
    assert warmup_steps(TrainConfig(steps=50_000), large.warmup_steps) == 5_000  # capped at 10% of a short run
    assert warmup_steps(TrainConfig(steps=50_000, warmup_steps=7), large.warmup_steps) == 7
    assert warmup_steps(TrainConfig(steps=300), AIMv2Config.from_name("aimv2-demo").warmup_steps) == 30
    cfg = TrainConfig(steps=1_500_000, init_lr=1e-6)
    assert lr_at(0, cfg, 1e-3, 12_500) == pytest.approx(1e-6)
    assert lr_at(12_500, cfg, 1e-3, 12_500) == pytest.approx(1e-3)
    assert lr_at(6_250, cfg, 1e-3, 12_500) == pytest.approx((1e-6 + 1e-3) / 2)


def test_byte_tokenizer_is_refused_for_a_32k_preset(tmp_path, capsys):
    from aimv2.cli import UsageError

    with pytest.raises(UsageError, match=r"vocabulary of 32000.*'bytes' \(259 symbols\).*aimv2-tokenizer train"):
        run(_cfg(tmp_path, preset="aimv2-large-patch14-224"))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    assert main(["--preset", "aimv2-huge-patch14-336", "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aimv2-tokenizer train" in err[0]


def test_new_flags_are_checked(capsys):
    for argv, needle in ((["--micro-batch-size", "0"], "at least 1"),
                         (["--weight-decay", "-1"], "--weight-decay"),
                         (["--betas", "0.9"], "--betas"),
                         (["--init-from", "/nonexistent/run"], "no such file"),
                         (["--activation-checkpointing", "half"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and needle in capsys.readouterr().err, argv


# -- micro-batches and activation checkpointing: the same steps -----------------------------------------------
def _steps(cfg: TrainConfig, n: int) -> tuple[list[dict], list[torch.Tensor]]:
    trainer = Trainer(cfg)
    rows = [trainer.train_step() for _ in range(n)]
    trainer.loader.close()
    return rows, [p.detach().clone() for p in trainer.model.parameters()]


def _same(a, b, exact: bool = False) -> None:
    rows_a, params_a = a
    rows_b, params_b = b
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "loss_img", "loss_txt", "grad_norm"):
            if exact:
                assert ra[key] == rb[key], (key, ra[key], rb[key])
            else:
                assert rb[key] == pytest.approx(ra[key], rel=RTOL, abs=0), (key, ra[key], rb[key])
    for pa, pb in zip(params_a, params_b):
        if exact:
            assert torch.equal(pa, pb)
        else:
            torch.testing.assert_close(pb, pa, rtol=RTOL, atol=RTOL * pa.abs().max().item())


@pytest.mark.slow
def test_micro_batches_and_activation_checkpointing_equal_the_whole_batch(tmp_path):
    plain = _steps(_cfg(tmp_path), 3)
    assert len({r["loss"] for r in plain[0]}) == 3  # the losses move: the comparison is not of constants
    assert all(r["micro_batches"] == 1 for r in plain[0])
    micro = _steps(_cfg(tmp_path, micro_batch_size=2), 3)
    assert all(r["micro_batches"] == 4 for r in micro[0])
    _same(plain, micro)
    uneven = _steps(_cfg(tmp_path, micro_batch_size=3), 3)  # 3 + 3 + 2
    assert all(r["micro_batches"] == 3 for r in uneven[0])
    _same(plain, uneven)
    # the recomputation repeats the same ops in the same order: bit for bit
    _same(plain, _steps(_cfg(tmp_path, activation_checkpointing="full"), 3), exact=True)
    _same(plain, _steps(_cfg(tmp_path, activation_checkpointing="selective"), 3), exact=True)
    _same(plain, _steps(_cfg(tmp_path, activation_checkpointing="selective", micro_batch_size=4), 3))
    # native resolution: batches of varying size and grid, micro-batches of constant patches (the last smaller)
    native = dict(native_resolution=True, native_budgets=(3, 6), batch_size=4)
    whole = _steps(_cfg(tmp_path, **native), 3)
    micro = _steps(_cfg(tmp_path, micro_batch_size=3, **native), 3)
    sizes = [r["images"] for r in whole[0]]
    assert sizes == [r["images"] for r in micro[0]] and len(set(sizes)) > 1, sizes
    assert any(r["micro_batches"] > 1 for r in micro[0])
    _same(whole, micro)


def _forward_backward_counts(model, mode: str) -> dict:
    """Block forwards (each block's forward hook) and matmuls dispatched in one forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from aimv2.layers import Block, set_activation_checkpointing

    set_activation_checkpointing(model, mode)
    calls = {"block": 0, "mm": 0}

    def count_block(*_):
        calls["block"] += 1

    class CountMM(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                calls["mm"] += 1
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_hook(count_block) for m in model.modules() if isinstance(m, Block)]
    torch.manual_seed(0)
    images, tokens = torch.randn(2, 3, 56, 56), torch.randint(2, 259, (2, 24))
    try:
        with CountMM():
            model(images, tokens, torch.tensor([3, 5])).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return calls


def test_activation_checkpointing_recomputes_in_the_backward():
    """'full' recomputes each block's matmuls in the backward; 'selective' keeps the matmuls' outputs and
    recomputes only the element-wise ops."""
    from aimv2.layers import set_activation_checkpointing
    from aimv2.model import AIMv2

    model = AIMv2(AIMv2Config.from_name("aimv2-tiny", backend="reference"))
    counts = {mode: _forward_backward_counts(model, mode) for mode in ("none", "full", "selective")}
    assert counts["none"]["block"] == counts["full"]["block"] == 3  # encoder 2 + decoder 1, hooks once each
    assert counts["full"]["mm"] > counts["none"]["mm"]  # the forward matmuls again
    assert counts["selective"]["mm"] == counts["none"]["mm"]  # the matmuls are kept, not recomputed
    with pytest.raises(ValueError, match="mode must be one of"):
        set_activation_checkpointing(model, "half")


@pytest.mark.slow
def test_compile_trains_the_same_model(tmp_path):
    """--compile: each block compiled in place (state-dict keys unchanged), losses equal to eager to fp32
    rounding (inductor fuses the element-wise ops)."""
    eager = _steps(_cfg(tmp_path), 2)
    trainer = Trainer(_cfg(tmp_path, compile=True))
    assert all(not k.startswith("_orig_mod") and "_orig_mod" not in k for k in trainer.model.state_dict())
    rows = [trainer.train_step() for _ in range(2)]
    trainer.loader.close()
    for ra, rb in zip(eager[0], rows):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)


# -- --init-from -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_init_from_a_run_folder_at_another_image_size(tmp_path):
    first = tmp_path / "first"
    run(_cfg(tmp_path, out=str(first), steps=2, ckpt_every=2))
    from aimv2.checkpoint import load_trained_encoder

    source, _ = load_trained_encoder(first, backend="reference")
    cfg = _cfg(tmp_path, out=str(tmp_path / "second"), image_size=84, init_from=str(first), steps=1)
    trainer = Trainer(cfg)
    enc = trainer.model.encoder
    assert enc.cfg.image_size == 84
    expected = resize_pos_embed(source.preprocessor.pos_embed.detach(), (4, 4), (6, 6))
    torch.testing.assert_close(enc.preprocessor.pos_embed.detach(), expected, rtol=0, atol=0)
    for (name, p), (_, q) in zip(source.trunk.named_parameters(), enc.trunk.named_parameters()):
        assert torch.equal(p, q), name
    assert trainer.step == 0 and not trainer.optimizer.state  # a new run: fresh optimizer and schedule
    assert "4x4 -> 6x6" in trainer.init_report.summary()
    trainer.loader.close()
    summary = run(cfg)
    assert summary["last"]["step"] == 1
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config["train"]["init_from"] == str(first) and config["model"]["encoder"]["image_size"] == 84
    # the stage resumed with the same description: the checkpoint is loaded, the source is not read again
    resumed = run(dataclasses.replace(cfg, steps=2, resume="latest", new_schedule=True))
    assert resumed["last"]["step"] == 2
    trainer = Trainer(dataclasses.replace(cfg, init_from=str(tmp_path / "gone"), resume="latest"))
    assert trainer.init_report is None  # a source that is gone by now does not matter to a resume
    trainer.loader.close()


def test_init_from_another_width_is_a_usage_error(tmp_path):
    from aimv2.cli import UsageError
    from aimv2.model import AIMv2Encoder
    from aimv2.pretrained import save_encoder

    save_encoder(AIMv2Encoder(AIMv2Config.from_name("aimv2-demo").encoder), tmp_path / "w", layout="hf")
    with pytest.raises(UsageError, match="--init-from .*dim"):
        Trainer(_cfg(tmp_path, init_from=str(tmp_path / "w")))


# -- metrics of a run -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_writes_tensorboard_events_and_the_jsonl_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run(_cfg(tmp_path, steps=3, tensorboard=True))
    rows = [json.loads(line) for line in summary["metrics"].read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "tokens_per_s", "skipped_samples", "peak_rss_gib",
                "step_time_s"):
        assert all(key in r for r in rows), key
    assert rows[0]["mfu"] is None and rows[0]["peak_mem_gib"] is None  # a CPU has no known peak
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    loss_tag = next(t for t in tags if t.endswith("total"))
    events = acc.Scalars(loss_tag)
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_init_from_a_hub_id_in_the_cache(tmp_path, monkeypatch):
    """--init-from apple/...: released weights by hub id, read offline from the Hugging Face cache."""
    pytest.importorskip("huggingface_hub")
    from test_hub import _use_cache, add_to_cache

    from aimv2.model import AIMv2Encoder
    from aimv2.pretrained import save_encoder

    torch.manual_seed(3)
    source = AIMv2Encoder(AIMv2Config.from_name("aimv2-tiny").encoder)
    cache = tmp_path / "hf-cache"
    add_to_cache(cache, "someone/aimv2-tiny", save_encoder(source, tmp_path / "export", layout="hf"), "c" * 40)
    _use_cache(monkeypatch, cache, offline=True)
    cfg = parse_args(["--preset", "aimv2-tiny", "--init-from", "someone/aimv2-tiny", "--out", str(tmp_path / "r")])
    trainer = Trainer(dataclasses.replace(cfg, backend="reference", device="cpu"))
    for (name, p), (_, q) in zip(source.named_parameters(), trainer.model.encoder.named_parameters()):
        assert torch.equal(p, q), name
    assert trainer.init_report.kind == "released-weights"
    trainer.loader.close()
    with pytest.raises(SystemExit):  # neither a path nor an id: refused at parse time
        parse_args(["--init-from", "not/a/hub/id/nor/a/path"])
    from aimv2.cli import OperationalError

    with pytest.raises(OperationalError, match="not in the Hugging Face cache.*hf download someone/missing"):
        Trainer(dataclasses.replace(cfg, init_from="someone/missing", backend="reference", device="cpu"))
