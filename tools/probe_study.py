"""How far is the demo trunk from beating a random trunk on the probe? A reproducible study for issue 6.

Trains the ``aimv2-demo`` encoder for ``--steps`` steps, either with the AIMv2 objective (``--mode pretrain``,
exactly ``aimv2-train``'s step: same Trainer, data, schedule and seed) or supervised on the probe's own label
(``--mode supervised``: the encoder plus an attentive head, cross-entropy on the kind of the main shape of the
bundled *train* split; an upper bound on what any pre-training objective could give the frozen trunk in that
many steps). Every ``--snap`` step (and at the end) the frozen encoder is probed exactly as ``make demo``
does (``aimv2.probe.run_probes``, bundled held-out split, by default 2000 images to train the probe and 1000
to test it),
next to a random trunk of the same preset, and one JSON line is printed per probe.

    python tools/probe_study.py --mode pretrain --steps 2000 --snap 160,500,1000
    python tools/probe_study.py --mode supervised --steps 500 --lr 3e-3

Figures it gave on the 2-core CPU VM (2026-11-29) are in the README's probe section.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from aimv2 import probe as P
from aimv2.data import Normalize, ShapesDataset
from aimv2.train import TrainConfig, Trainer, lr_at


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("pretrain", "supervised"), default="pretrain")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the preset's)")
    p.add_argument("--snap", default="", help="comma-separated steps to probe at, besides the last")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-train", type=int, default=2000, help="held-out images to train the probe on")
    p.add_argument("--probe-test", type=int, default=1000, help="held-out images to test it on")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.probe_train, args.probe_test) < 1:
        p.error("--steps, --batch-size, --probe-train and --probe-test must be positive")
    try:
        snaps = {int(s) for s in args.snap.split(",") if s.strip()} | {args.steps}
    except ValueError:
        p.error(f"--snap must be comma-separated ints, got {args.snap!r}")

    cfg = TrainConfig(preset="aimv2-demo", out="/dev/null", steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, device=args.device, seed=args.seed, progress=False)
    trainer = Trainer(cfg)  # builds the model, data and optimizer exactly as aimv2-train does (writes nothing)
    encoder, device = trainer.model.encoder, trainer.device
    size = trainer.model_cfg.encoder.image_size
    probe_train, probe_test = P.heldout_shapes(size, args.probe_train, args.probe_test)
    baseline = P.random_encoder("aimv2-demo", seed=args.seed).to(device)
    if args.mode == "supervised":
        head = P.AttentionPoolingClassifier(trainer.model_cfg.encoder.dim, ShapesDataset.num_classes).to(device)
        opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=trainer.peak_lr, weight_decay=0.05)
        data, norm = ShapesDataset("train", image_size=size, seed=args.seed), Normalize()
        gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        if args.mode == "pretrain":
            m = trainer.train_step()
            losses = {"loss_img": round(m["loss_img"], 4), "loss_txt": round(m["loss_txt"], 4)}
        else:
            samples = [data[i] for i in torch.randint(len(data), (args.batch_size,), generator=gen).tolist()]
            x = norm(torch.stack([s.image for s in samples])).to(device)
            y = torch.tensor([s.label for s in samples], device=device)
            for group in opt.param_groups:  # the same warm-up + cosine as pre-training
                group["lr"] = lr_at(step - 1, cfg, trainer.peak_lr)
            encoder.train()
            head.train()
            loss = F.cross_entropy(head(encoder(x))[0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses = {"loss_ce": round(loss.item(), 4)}
        if step in snaps:
            train_s = time.perf_counter() - t0
            r = P.run_probes({"trained": encoder, "random": baseline}, probe_train, probe_test, progress=False)
            print(json.dumps({"mode": args.mode, "step": step, "lr": cfg.lr or trainer.peak_lr, **losses,
                              "train_s": round(train_s, 1), "device": str(device),
                              **{f"{k}_top1": round(100 * v["top1"], 1) for k, v in r.items()},
                              **{f"{k}_train_top1": round(100 * v["train_top1"], 1) for k, v in r.items()}}),
                  flush=True)
            t0 = time.perf_counter()
    return 0


if __name__ == "__main__":
    sys.exit(main())
