"""aimv2.init_from: a new run from a training checkpoint or released weights (resolution and position changes)."""
import dataclasses

import pytest
import torch

from aimv2.checkpoint import CheckpointError, save_checkpoint
from aimv2.config import AIMv2Config, DecoderConfig, EncoderConfig
from aimv2.init_from import POS_EMBED_KEY, InitReport, init_from
from aimv2.layers import resize_pos_embed, sincos_pos_embed
from aimv2.model import AIMv2
from aimv2.pretrained import save_encoder
from aimv2.weights import WeightsError

TINY = "aimv2-tiny"  # image 56, patch 14: a 4x4 grid; dim 64, vocab 259, context 24


def _config(image_size: int = 56, pos_embed: str = "learned", **decoder) -> AIMv2Config:
    cfg = AIMv2Config.from_name(TINY, backend="cpu")
    enc = dataclasses.replace(cfg.encoder, image_size=image_size, pos_embed=pos_embed)
    return dataclasses.replace(cfg, encoder=enc, decoder=dataclasses.replace(cfg.decoder, **decoder))


def _perturbed(cfg: AIMv2Config, seed: int = 1) -> AIMv2:
    """A model whose every tensor is fresh noise (no equality can hold by the shared initialisation)."""
    torch.manual_seed(seed)
    model = AIMv2(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def _run(root, cfg: AIMv2Config, step: int = 3, seed: int = 1) -> tuple[AIMv2, object]:
    """A training run folder as aimv2-train writes it; returns the model and the checkpoint's path."""
    model = _perturbed(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"step": step, "bad_steps": 0, "loader": {"epoch": 0, "batch": step, "position": 0}, "world_size": 1,
             "train_config": {"preset": cfg.name, "steps": 10}, "model_config": cfg.to_dict()}
    return model, save_checkpoint(root / "checkpoints", step, model, opt, state)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _forward(model: AIMv2) -> None:
    enc, dec = model.cfg.encoder, model.cfg.decoder
    images = torch.randn(2, 3, enc.image_size, enc.image_size)
    tokens = torch.randint(2, dec.vocab_size, (2, dec.context_length))
    out = model.train()(images, tokens)
    assert torch.isfinite(out.loss)


def test_training_run_to_a_larger_grid(tmp_path):
    source, ckpt = _run(tmp_path / "run", _config())
    target = AIMv2(_config(image_size=84))  # 6x6
    params = {k: id(p) for k, p in target.named_parameters()}
    report = init_from(tmp_path / "run", target)

    assert isinstance(report, InitReport)
    assert report.kind == "training-checkpoint" and report.source == str(ckpt) and report.step == 3
    assert report.loaded == ["encoder", "decoder"] and report.skipped == []
    assert report.resized == [f"{POS_EMBED_KEY} (1, 16, 64) -> (1, 36, 64) (4x4 -> 6x6 grid, bicubic)"]
    assert report.source_config == _config().to_dict()
    assert str(ckpt) in report.summary() and len(report.summary().splitlines()) == 1
    assert {k: id(p) for k, p in target.named_parameters()} == params  # the same Parameter objects

    src, dst = source.state_dict(), target.state_dict()
    assert set(src) == set(dst)
    for k in src:
        if k != POS_EMBED_KEY:
            assert torch.equal(src[k], dst[k]), k
    assert torch.equal(dst[POS_EMBED_KEY], resize_pos_embed(src[POS_EMBED_KEY], (4, 4), (6, 6)))
    _forward(target)


def test_step_folder_and_checkpoints_folder_resolve_alike(tmp_path):
    _run(tmp_path / "run", _config(), step=2, seed=2)
    _, newest = _run(tmp_path / "run", _config(), step=5, seed=3)
    reports = [init_from(p, AIMv2(_config())) for p in
               (tmp_path / "run", tmp_path / "run" / "checkpoints", newest, newest / "state.json")]
    assert {r.source for r in reports} == {str(newest)} and {r.step for r in reports} == {5}
    assert reports[0].resized == []  # same grid: copied as is

    older = tmp_path / "run" / "checkpoints" / "step_00000002"
    model = AIMv2(_config())
    assert init_from(older, model).step == 2
    assert torch.equal(model.state_dict()[POS_EMBED_KEY], _perturbed(_config(), seed=2).state_dict()[POS_EMBED_KEY])


def test_released_weights_leave_the_decoder_fresh(tmp_path):
    encoder = _perturbed(_config()).encoder
    save_encoder(encoder, tmp_path / "hf", layout="hf")
    target = AIMv2(_config(image_size=84))
    before = _snapshot(target)
    report = init_from(tmp_path / "hf", target)

    assert report.kind == "released-weights" and report.source == str(tmp_path / "hf")
    assert report.loaded == ["encoder"] and report.source_config is None
    assert report.source_encoder["dim"] == 64 and report.source_encoder["image_size"] == 56
    assert len(report.skipped) == 1 and report.skipped[0].startswith("decoder: SOURCE has none")
    assert len(report.summary().splitlines()) == 2

    dst = target.state_dict()
    for k, v in encoder.state_dict().items():
        key = f"encoder.{k}"
        want = resize_pos_embed(v, (4, 4), (6, 6)) if key == POS_EMBED_KEY else v
        assert torch.equal(dst[key], want), key
    for k, v in before.items():
        if k.startswith("decoder."):
            assert torch.equal(dst[k], v), k
    _forward(target)


def test_learned_source_into_a_sincos_target(tmp_path):
    source, _ = _run(tmp_path / "run", _config())
    target = AIMv2(_config(pos_embed="sincos"))
    assert target.encoder.preprocessor.pos_embed is None
    report = init_from(tmp_path / "run", target)
    assert report.loaded == ["encoder", "decoder"] and report.resized == []
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{POS_EMBED_KEY} (1, 16, 64)")
    assert "sin-cos" in report.skipped[0]
    src, dst = source.state_dict(), target.state_dict()
    assert POS_EMBED_KEY not in dst
    assert all(torch.equal(src[k], v) for k, v in dst.items())
    _forward(target)


def test_sincos_source_into_a_learned_target(tmp_path):
    source, _ = _run(tmp_path / "run", _config(pos_embed="sincos"))
    target = AIMv2(_config(image_size=84))
    report = init_from(tmp_path / "run", target)
    assert len(report.resized) == 1 and "sin-cos" in report.resized[0]
    dst = target.state_dict()
    assert torch.equal(dst[POS_EMBED_KEY], sincos_pos_embed(6, 6, 64)[None])
    src = source.state_dict()
    assert all(torch.equal(v, dst[k]) for k, v in src.items())
    # The target at the source's grid adds what the sin-cos source added: the same features.
    images = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        assert torch.allclose(source.encoder.eval()(images), target.encoder.eval()(images), atol=1e-5)


def test_sincos_released_weights_into_a_learned_target(tmp_path):
    save_encoder(_perturbed(_config(pos_embed="sincos")).encoder, tmp_path / "native", layout="apple")
    target = AIMv2(_config())
    report = init_from(tmp_path / "native", target)
    assert report.loaded == ["encoder"] and "sin-cos" in report.resized[0]
    assert torch.equal(target.state_dict()[POS_EMBED_KEY], sincos_pos_embed(4, 4, 64)[None])


def test_another_width_is_refused_naming_keys_and_presets(tmp_path):
    _run(tmp_path / "run", _config())
    wide = dataclasses.replace(_config(), name="aimv2-wide",
                               encoder=EncoderConfig(image_size=56, dim=128, depth=2, num_heads=2),
                               decoder=DecoderConfig(dim=64, depth=1, num_heads=2, vocab_size=259,
                                                     context_length=24))
    target = AIMv2(wide)
    before = _snapshot(target)
    with pytest.raises(ValueError) as exc:
        init_from(tmp_path / "run", target)
    message = str(exc.value)
    assert "presets differ" in message and "SOURCE is aimv2-tiny (dim 64)" in message
    assert "this run is aimv2-wide (dim 128)" in message
    assert "encoder.preprocessor.patchifier.proj.weight (64, 3, 14, 14) in SOURCE vs (128, 3, 14, 14)" in message
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())  # nothing was changed


def test_another_depth_or_heads_is_refused(tmp_path):
    save_encoder(_perturbed(_config()).encoder, tmp_path / "hf", layout="hf")
    deeper = dataclasses.replace(_config(), encoder=dataclasses.replace(_config().encoder, depth=3))
    with pytest.raises(ValueError, match=r"depth 2\).*depth 3\).*missing in SOURCE: encoder\.trunk\.blocks\.2"):
        init_from(tmp_path / "hf", AIMv2(deeper))
    heads = dataclasses.replace(_config(), encoder=dataclasses.replace(_config().encoder, num_heads=4))
    with pytest.raises(ValueError, match="num_heads 2.*num_heads 4.*split the width"):
        init_from(tmp_path / "hf", AIMv2(heads))


def test_another_vocabulary_or_context_is_refused_unless_the_decoder_starts_afresh(tmp_path):
    _run(tmp_path / "run", _config())
    target = AIMv2(_config(vocab_size=300, context_length=32))
    with pytest.raises(ValueError, match="vocab_size 259 in SOURCE vs 300.*context_length 24 in SOURCE vs 32.*"
                                         "--tokenizer"):
        init_from(tmp_path / "run", target)
    before = _snapshot(target)
    report = init_from(tmp_path / "run", target, decoder="fresh")
    assert report.loaded == ["encoder"] and report.skipped[0].startswith("decoder: not taken")
    dst = target.state_dict()
    assert all(torch.equal(v, dst[k]) for k, v in before.items() if k.startswith("decoder."))
    assert not torch.equal(before["encoder.trunk.post_trunk_norm.weight"], dst["encoder.trunk.post_trunk_norm.weight"])
    with pytest.raises(ValueError, match="decoder must be one of"):
        init_from(tmp_path / "run", target, decoder="partial")


def test_missing_corrupt_and_wrong_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        init_from(tmp_path / "nowhere", AIMv2(_config()))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        init_from(tmp_path / "empty", AIMv2(_config()))
    _, ckpt = _run(tmp_path / "run", _config())
    (ckpt / "state.json").write_bytes(b"\x80\x04not json")
    with pytest.raises(CheckpointError, match="corrupt or unsafe"):
        init_from(ckpt, AIMv2(_config()))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot read checkpoint file"):
        init_from(tmp_path / "bad.safetensors", AIMv2(_config()))
    with pytest.raises(TypeError):
        init_from(tmp_path / "run", AIMv2(_config()).encoder)
    with torch.device("meta"):
        meta = AIMv2(_config())
    with pytest.raises(ValueError, match="meta device"):
        init_from(tmp_path / "run", meta)
