"""The whole model on the Triton backend (through the interpreter on a CPU): same losses and gradients as the
reference backend, a training step through ``aimv2-train``'s Trainer, and torch.compile without graph breaks."""
import pytest
import torch

from aimv2 import AIMv2, AIMv2Config
from aimv2.train import TrainConfig, Trainer
from aimv2_kernels.testing import FORWARD_K, GRADIENT_K, assert_within_budget


def _model(backend, device):
    torch.manual_seed(0)
    return AIMv2(AIMv2Config.from_name("aimv2-tiny", backend=backend)).to(device)


def _inputs(model, device, b=2):
    gen = torch.Generator().manual_seed(1)
    cfg = model.cfg
    images = torch.randn(b, 3, cfg.encoder.image_size, cfg.encoder.image_size, generator=gen)
    tokens = torch.randint(3, cfg.decoder.vocab_size, (b, cfg.decoder.context_length), generator=gen)
    tokens[:, -4:] = cfg.decoder.pad_id
    lens = torch.tensor([1, cfg.encoder.num_patches - 1])[:b]
    return images.to(device), tokens.to(device), lens.to(device)


def _loss_and_grads(model, images, tokens, lens):
    out = model(images, tokens, prefix_lens=lens)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, grads


def test_model_triton_matches_reference(device):
    images, tokens, lens = _inputs(_model("reference", device), device)
    ref_out, ref_grads = _loss_and_grads(_model("reference", device), images, tokens, lens)
    tri_out, tri_grads = _loss_and_grads(_model("triton", device), images, tokens, lens)
    oracle = _model("reference", device).double()
    ora_out, ora_grads = _loss_and_grads(oracle, images.double(), tokens, lens)
    for key in ("loss", "loss_img", "loss_txt"):
        assert_within_budget(getattr(tri_out, key), getattr(ref_out, key), getattr(ora_out, key),
                             k=FORWARD_K, name=key)
    for name in ("encoder.trunk.blocks.0.attn.qkv.weight", "encoder.preprocessor.patchifier.proj.weight",
                 "decoder.pixel_head.weight", "decoder.text_head.weight", "decoder.text_embedding.weight"):
        assert_within_budget(tri_grads[name], ref_grads[name], ora_grads[name], k=GRADIENT_K, name=name)


def test_trainer_steps_with_triton_backend(tmp_path, device):
    cfg = TrainConfig(preset="aimv2-tiny", out=str(tmp_path), steps=2, batch_size=2, backend="triton",
                      device=str(device), progress=False)
    trainer = Trainer(cfg)
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_model_compiles_without_graph_breaks(device):
    model = _model("triton", device)
    images, tokens, lens = _inputs(model, device)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(images, tokens, lens)
    out.loss.backward()
    eager = _model("triton", device)(images, tokens, lens)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-4, atol=1e-5)
