"""Start a new training run from a trained model: the paper's later stages (higher resolution, native resolution).

:func:`init_from` copies the weights of SOURCE (a training checkpoint of ``aimv2-train`` or released weights)
into a freshly built, not yet sharded :class:`aimv2.model.AIMv2`; the run keeps its own optimizer and schedule.

- The encoder must have the source's architecture (width, depth, heads, MLP, patch size, channels): only the
  image size and the kind of position embedding may change. A learned position table is resized bicubically to
  this run's grid (:func:`aimv2.layers.resize_pos_embed`); a learned table is dropped when this run uses fixed
  sin-cos positions (native resolution); a sin-cos source gives a learned target its sin-cos values at the
  target's grid (:func:`aimv2.layers.sincos_pos_embed`), which is what the source model added.
- The decoder is taken from a training checkpoint when it has exactly this run's shape; another vocabulary or
  context length (another tokenizer or preset) is refused unless ``decoder="fresh"`` keeps this run's freshly
  initialised decoder. Released weights have no decoder: it stays as initialised.

Everything is checked before anything is copied: on an error the model is unchanged. Values are copied into the
existing parameters (``copy_`` under ``no_grad``: device, dtype and Parameter identity are kept). Nothing read
can run code: training checkpoints load through :mod:`aimv2.checkpoint` (no pickle), released weights through
:func:`aimv2.weights.read_pretrained` (safetensors, or ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, read_state
from .config import PRESETS, AIMv2Config, EncoderConfig
from .hub import is_hub_id
from .layers import resize_pos_embed, sincos_pos_embed
from .model import AIMv2
from .weights import WEIGHT_FILES, is_training_run, read_pretrained

__all__ = ["InitReport", "init_from", "POS_EMBED_KEY", "DECODER_MODES"]

POS_EMBED_KEY = "encoder.preprocessor.pos_embed"  # the learned position table (1, N, D) of AIMv2's state dict
DECODER_MODES = ("load", "fresh")
_ARCH = ("dim", "depth", "num_heads", "mlp_hidden", "patch_size", "in_chans")  # what the encoders must share
_SHOWN = 4  # keys named in an error message


@dataclass
class InitReport:
    """What :func:`init_from` took from SOURCE, and what it did not."""
    source: str  # what was read: the resolved step_* checkpoint, or the released weights' path
    kind: str  # "training-checkpoint" or "released-weights"
    loaded: list[str] = field(default_factory=list)  # parts loaded: "encoder", "decoder"
    resized: list[str] = field(default_factory=list)  # tensors reshaped or derived, e.g. the position table
    skipped: list[str] = field(default_factory=list)  # what was not taken, and why
    source_config: dict | None = None  # the source's AIMv2Config dict (training checkpoints)
    source_encoder: dict | None = None  # the source's EncoderConfig dict (both kinds)
    step: int | None = None  # the training checkpoint's step

    def summary(self) -> str:
        """One or two lines for the trainer's banner."""
        name = (self.source_config or {}).get("name")
        what = ", ".join(x for x in (name, f"step {self.step}" if self.step is not None else None) if x)
        line = (f"initialised from {self.kind.replace('-', ' ')} {self.source}{f' ({what})' if what else ''}: "
                f"loaded {' + '.join(self.loaded) or 'nothing'}")
        if self.resized:
            line += "; " + "; ".join(self.resized)
        return line + ("\n  not taken: " + "; ".join(self.skipped) if self.skipped else "")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _family(enc: EncoderConfig) -> str | None:
    """The released size whose encoder has ``enc``'s architecture (e.g. ``aimv2-large-patch14``), or None."""
    for name, make in PRESETS.items():
        other = make().encoder
        if all(getattr(other, f) == getattr(enc, f) for f in _ARCH):
            return name.rsplit("-", 1)[0] if "-patch" in name else name
    return None


def _describe(name: str | None, enc: EncoderConfig, fields: tuple[str, ...]) -> str:
    label = name or (f"an {_family(enc)} encoder" if _family(enc) else "a custom encoder")
    return f"{label} ({', '.join(f'{f} {getattr(enc, f)}' for f in fields)})"


def _key_problems(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> list[str]:
    """Shape mismatches, then missing and unexpected keys, as ``"key (shape) in SOURCE vs (shape) here"``."""
    wrong = [f"{k} {_shape(src[k])} in SOURCE vs {_shape(dst[k])} in this run"
             for k in dst if k in src and _shape(src[k]) != _shape(dst[k])]
    missing = [k for k in dst if k not in src]
    unexpected = [k for k in src if k not in dst]
    out = []
    if wrong:
        out.append("shape mismatch for " + ", ".join(wrong[:_SHOWN])
                   + (f", ... ({len(wrong)} in all)" if len(wrong) > _SHOWN else ""))
    if missing:
        out.append(f"missing in SOURCE: {', '.join(missing[:_SHOWN])}" + (f", ... ({len(missing)} in all)"
                                                                            if len(missing) > _SHOWN else ""))
    if unexpected:
        out.append(f"not in this run: {', '.join(unexpected[:_SHOWN])}"
                   + (f", ... ({len(unexpected)} in all)" if len(unexpected) > _SHOWN else ""))
    return out


def _read_training(ckpt: Path) -> tuple[AIMv2Config, dict[str, torch.Tensor], int | None]:
    """The model config, the model tensors (CPU) and the step of training checkpoint ``ckpt``."""
    state = read_state(ckpt)
    try:
        cfg = AIMv2Config.from_dict(state["model_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has no valid model_config in its state.json "
                              f"({type(exc).__name__}: {exc})") from None
    with torch.device("meta"):  # no forward runs on it: the backend is immaterial
        source = AIMv2(dataclasses.replace(cfg, backend="auto"))
    source = source.to_empty(device="cpu")
    load_checkpoint(ckpt, source, restore_rng=False)  # the model only (no optimizer), strictly, without pickle
    step = state.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    return cfg, {k: v.detach() for k, v in source.state_dict().items()}, step


def _is_training_source(p: Path) -> bool:
    """A run of aimv2-train (even one without a complete checkpoint yet: find_checkpoint then says so)."""
    if is_training_run(p):
        return True
    return (p.is_dir() and (p.name == "checkpoints" or (p / "checkpoints").is_dir())
            and not any((p / name).is_file() for name in WEIGHT_FILES))


def init_from(source: str | os.PathLike[str], model: AIMv2, *, decoder: str = "load") -> InitReport:
    """Copy the weights of ``source`` into ``model``, a freshly built, un-sharded AIMv2 of this run.

    Args:
        source: (a) a training run folder of ``aimv2-train``, its ``checkpoints`` folder or one ``step_*``
            checkpoint (the newest is taken), or (b) released weights: anything
            :meth:`aimv2.model.AIMv2Encoder.from_pretrained` reads (a folder with ``config.json`` +
            ``model.safetensors`` in any layout, or a bare weights file).
        model: the new run's :class:`aimv2.model.AIMv2` on any device, before FSDP sharding; its encoder may be
            of another image size or position embedding than the source's, nothing else.
        decoder: ``"load"`` (default) takes a training checkpoint's decoder, which must then have exactly this
            run's shape; ``"fresh"`` keeps this run's initialised decoder (e.g. to change the tokenizer).

    Returns:
        An :class:`InitReport`: what was read, loaded, resized and skipped.

    Raises:
        FileNotFoundError: ``source`` does not exist (or a released-weights folder has no weights file).
        CheckpointError: a training checkpoint is incomplete, unreadable or unsafe (its own messages).
        WeightsError: released weights are unreadable or malformed (a ValueError; its own messages).
        ValueError: the architectures differ (naming the first keys, both shapes and both presets), the
            decoder's vocabulary or context length differ (another ``--tokenizer`` or preset), a source tensor
            is not finite, or ``model`` is sharded or on the meta device.
        TypeError: ``model`` is not an AIMv2, or ``source`` not a path.
    """
    if not isinstance(model, AIMv2):
        raise TypeError(f"model must be an aimv2.model.AIMv2, got {type(model).__name__}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a str or os.PathLike, got {type(source).__name__}")
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}")
    target = model.state_dict(keep_vars=True)  # the Parameters themselves (and persistent buffers)
    for k, t in target.items():
        if hasattr(t, "to_local") or hasattr(t, "full_tensor"):
            raise ValueError(f"init_from needs the un-sharded model: {k} is a DTensor (call it before FSDP "
                             f"sharding)")
        if t.is_meta:
            raise ValueError(f"init_from needs a materialised model: {k} is on the meta device")
    p = Path(source)
    hub = not p.exists() and is_hub_id(source)  # released weights by Hugging Face hub id (aimv2.hub)
    if not p.exists() and not hub:
        raise FileNotFoundError(f"--init-from {str(source)!r} does not exist")

    tcfg = model.cfg
    if not hub and _is_training_source(p):
        ckpt = find_checkpoint(p.parent if p.is_file() else p)  # a step_* folder's state.json: that checkpoint
        src_cfg, src, step = _read_training(ckpt)
        report = InitReport(source=str(ckpt), kind="training-checkpoint", source_config=src_cfg.to_dict(),
                            step=step)
        src_enc, src_name = src_cfg.encoder, src_cfg.name
    else:
        src_enc, enc_sd = read_pretrained(source if hub else p)
        src = {f"encoder.{k}": v for k, v in enc_sd.items()}
        src_cfg, src_name = None, None
        report = InitReport(source=str(source) if hub else str(p), kind="released-weights")
    report.source_encoder = dataclasses.asdict(src_enc)
    where = f"--init-from {report.source}"

    # -- encoder: the architecture, then every tensor's shape but the position table's --------------------------
    enc = tcfg.encoder
    src_e = {k: v for k, v in src.items() if k.startswith("encoder.") and k != POS_EMBED_KEY}
    dst_e = {k: v for k, v in target.items() if k.startswith("encoder.") and k != POS_EMBED_KEY}
    differ = tuple(f for f in _ARCH if getattr(src_enc, f) != getattr(enc, f))
    problems = _key_problems(src_e, dst_e)
    src_pos, dst_pos = src.get(POS_EMBED_KEY), target.get(POS_EMBED_KEY)
    if not problems and src_pos is not None and dst_pos is not None and src_pos.shape[-1] != dst_pos.shape[-1]:
        problems.append(f"shape mismatch for {POS_EMBED_KEY} {_shape(src_pos)} in SOURCE vs {_shape(dst_pos)} "
                        f"in this run")
    if differ or problems:
        shown = tuple(f for f in differ if not (f == "mlp_hidden" and "dim" in differ)) or ("dim",)
        raise ValueError(f"{where}: the presets differ: SOURCE is {_describe(src_name, src_enc, shown)}, this run "
                         f"is {_describe(tcfg.name, enc, shown)}; only the image size and the position embedding "
                         f"may change from SOURCE: " + "; ".join(problems or ["the heads split the width "
                                                                                 "differently"]))
    copies: list[tuple[str, torch.Tensor]] = list(src_e.items())
    pos_value = None
    if dst_pos is not None:  # this run learns its position table
        gh = gw = enc.grid_size
        if dst_pos.shape[1] != gh * gw:
            raise ValueError(f"{POS_EMBED_KEY} of this run has shape {_shape(dst_pos)}, not (1, {gh * gw}, D) "
                             f"for its {gh}x{gw} grid")
        if src_pos is not None:
            sg = src_enc.grid_size
            if src_pos.shape[1] != sg * sg:
                raise ValueError(f"{where}: {POS_EMBED_KEY} has shape {_shape(src_pos)}, not (1, {sg * sg}, D) "
                                 f"for SOURCE's {sg}x{sg} grid (image_size {src_enc.image_size}, patch "
                                 f"{src_enc.patch_size})")
            pos_value = resize_pos_embed(src_pos, (sg, sg), (gh, gw))
            if (sg, sg) != (gh, gw):
                report.resized.append(f"{POS_EMBED_KEY} {_shape(src_pos)} -> {_shape(dst_pos)} "
                                      f"({sg}x{sg} -> {gh}x{gw} grid, bicubic)")
        else:
            pos_value = sincos_pos_embed(gh, gw, enc.dim)[None]
            report.resized.append(f"{POS_EMBED_KEY}: SOURCE has fixed sin-cos positions; this run's learned "
                                  f"{_shape(dst_pos)} starts from them ({gh}x{gw} grid)")
        copies.append((POS_EMBED_KEY, pos_value))
    elif src_pos is not None:
        report.skipped.append(f"{POS_EMBED_KEY} {_shape(src_pos)}: this run uses fixed sin-cos positions "
                              f"(native resolution), so SOURCE's learned table is dropped")

    # -- decoder -------------------------------------------------------------------------------------------------
    src_d = {k: v for k, v in src.items() if k.startswith("decoder.")}
    dst_d = {k: v for k, v in target.items() if k.startswith("decoder.")}
    if not src_d:
        report.skipped.append("decoder: SOURCE has none (released weights are the encoder only); this run's "
                              "decoder keeps its fresh initialisation")
    elif decoder == "fresh":
        report.skipped.append("decoder: not taken (decoder='fresh'); this run's decoder keeps its fresh "
                              "initialisation")
    else:
        assert src_cfg is not None
        sdec, ddec = src_cfg.decoder, tcfg.decoder
        text = [f"{f} {getattr(sdec, f)} in SOURCE vs {getattr(ddec, f)} in this run"
                for f in ("vocab_size", "context_length", "pad_id") if getattr(sdec, f) != getattr(ddec, f)]
        if text:
            raise ValueError(f"{where}: the decoder's text side differs ({'; '.join(text)}): --tokenizer or the "
                             f"preset changed from SOURCE's run; keep them, or start the decoder afresh "
                             f"(init_from(..., decoder='fresh'))")
        dec_differ = [f"{f} {getattr(sdec, f)} in SOURCE vs {getattr(ddec, f)} in this run"
                      for f in ("dim", "depth", "num_heads", "mlp_hidden") if getattr(sdec, f) != getattr(ddec, f)]
        problems = _key_problems(src_d, dst_d)
        if dec_differ or problems:
            raise ValueError(f"{where}: the decoders differ (SOURCE is {src_name}, this run is {tcfg.name}: "
                             f"{'; '.join(dec_differ) or 'same config'}): " + "; ".join(problems or [
                                 "the heads split the width differently"]))
        copies += list(src_d.items())

    for k, v in copies:
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: {k} is not finite (NaN or inf); nothing was loaded")
    with torch.no_grad():
        for k, v in copies:
            target[k].copy_(v)
    report.loaded = ["encoder"] + (["decoder"] if any(k.startswith("decoder.") for k, _ in copies) else [])
    return report
