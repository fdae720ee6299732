"""Released AIMv2 weights: load them into :class:`~aimv2.model.AIMv2Encoder`, and export an encoder back.

The three key layouts in circulation (transformers' ``Aimv2VisionModel``, Apple's original, timm's) are described
and converted in :mod:`aimv2.layouts`; :mod:`aimv2.weights` reads and checks the files. Loading is strict: every
tensor the encoder needs must be there with its shape, and nothing else may be (apart from the other towers of a
LiT checkpoint, which are skipped, and a pooling head, which is dropped only when asked). Any discrepancy raises
:class:`CheckpointMismatchError` (a ``ValueError``) listing the keys.

Not for training runs: the encoder of an ``aimv2-train`` run folder is
:func:`aimv2.checkpoint.load_trained_encoder`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .config import AIMv2Config, EncoderConfig
from .layouts import LAYOUTS, WeightsError, _check_layout, config_json, detect_layout, from_layout, to_layout
from .model import AIMv2Encoder
from .processor import PRESETS, AIMv2ImageProcessor
from .weights import CheckpointMismatchError, ConfigMismatchError, is_training_run, read_pretrained

__all__ = ["LAYOUTS", "CheckpointMismatchError", "ConfigMismatchError", "WeightsError", "load_pretrained_encoder",
           "save_encoder", "detect_layout", "to_layout", "from_layout", "is_training_run", "read_pretrained"]


def load_pretrained_encoder(path: str | os.PathLike[str], *, image_size: int | None = None, backend: str = "auto",
                            config: str | AIMv2Config | EncoderConfig | None = None,
                            drop_head: bool = False) -> AIMv2Encoder:
    """Load released (or exported) AIMv2 weights into an :class:`AIMv2Encoder` (eval mode, fp32, CPU).

    Args:
        path: a folder with ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``, or a sharded
            ``*.index.json``) in any of the three layouts (transformers ``Aimv2VisionModel`` / ``Aimv2Model``,
            Apple's original incl. LiT, timm), or a bare ``.safetensors`` / ``.pth`` / ``.bin`` file whose shape
            is inferred from its tensors (``num_heads`` from ``config`` when given, else ``dim / 128``, AIMv2's
            head_dim; a file without a position embedding is the native-resolution sin-cos model).
        image_size: build the encoder for this square resolution instead of the checkpoint's; a learned
            ``[1, N, D]`` position embedding is resized bicubically on its 2-D grid (``resize_pos_embed``).
        backend: the op backend of the encoder (one of ``aimv2_kernels.BACKENDS``).
        config: an ``EncoderConfig``, an ``AIMv2Config`` or a preset name the checkpoint must match; a mismatch
            is refused naming every differing field. It also supplies what a bare file cannot say
            (num_heads, norm_eps).
        drop_head: drop a pooling / classification head (``head.*`` keys: the LiT attention-pooling head, a
            timm classifier) instead of refusing the checkpoint.

    Returns:
        The encoder: parameters fp32 on the CPU, in eval mode; ``encoder.cfg`` is its ``EncoderConfig``.

    Raises:
        FileNotFoundError: ``path`` (or a weights file in the folder) does not exist.
        TypeError: an argument of the wrong type.
        CheckpointMismatchError: (a WeightsError) missing / unexpected keys or wrong shapes, all listed.
        ConfigMismatchError: (a WeightsError) the weights are not of the shape ``config`` asks for.
        WeightsError: (a ValueError) unreadable files, an unknown layout, biases or a head (without
            ``drop_head``) the encoder does not have; ``path`` is a training run of ``aimv2-train`` (load that
            with :func:`aimv2.checkpoint.load_trained_encoder`).
        ValueError: a bad ``image_size`` or ``backend``.
    """
    return AIMv2Encoder.from_pretrained(path, image_size=image_size, backend=backend, config=config,
                                        drop_head=drop_head)


def save_encoder(encoder: AIMv2Encoder, path: str | os.PathLike[str], layout: str = "hf", *,
                 processor: AIMv2ImageProcessor | str | None = None) -> Path:
    """Write ``encoder`` as ``path/config.json`` + ``path/model.safetensors`` in ``layout``, and its image
    preprocessing as ``path/preprocessor_config.json``.

    ``"hf"`` is loadable by ``transformers.Aimv2VisionModel.from_pretrained(path)`` (``use_head=False``,
    ``is_native`` for a sin-cos encoder); ``"apple"`` is Apple's original keys with an ml-aim style
    ``config.json`` (``model_type: "aimv2"``); ``"timm"`` is timm's keys with a timm ``config.json``
    (``architecture`` + ``model_args``). Tensors keep the encoder's dtype; :func:`load_pretrained_encoder` reads all
    three back exactly. The folder is created if needed; existing files of those names are replaced.

    ``preprocessor_config.json`` (every layout) is transformers' ``CLIPImageProcessor`` format, so
    ``transformers.AutoImageProcessor.from_pretrained(path)`` and
    :meth:`aimv2.processor.AIMv2ImageProcessor.from_pretrained` read it. ``processor``: None (default) writes the
    released checkpoints' preprocessing at the encoder's image size (``AIMv2ImageProcessor.for_encoder``: for a
    sin-cos encoder ``do_resize`` and ``do_center_crop`` false, as the native-resolution checkpoint); a preset
    name (``"released"``, ``"ml-aim"``) that preset for the encoder; an ``AIMv2ImageProcessor`` itself.

    Raises:
        TypeError: ``encoder`` is not an AIMv2Encoder; ``processor`` is not an AIMv2ImageProcessor, a preset
            name or None.
        ValueError: unknown layout or ``processor`` preset; ``path`` is a file; ``"timm"`` for a sin-cos
            encoder (timm has no native-resolution AIMv2, so an export would silently lose the position
            embedding) or a norm_eps other than timm's 1e-5.
    """
    if not isinstance(encoder, AIMv2Encoder):
        raise TypeError(f"encoder must be an aimv2.model.AIMv2Encoder, got {type(encoder).__name__}")
    _check_layout(layout)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    cfg = encoder.cfg
    if isinstance(processor, str) and processor not in PRESETS:
        raise ValueError(f"processor must be a preset name, one of {PRESETS}, or an AIMv2ImageProcessor, got "
                         f"{processor!r}")
    if processor is None or isinstance(processor, str):
        processor = AIMv2ImageProcessor.for_encoder(cfg, "released" if processor is None else processor)
    elif not isinstance(processor, AIMv2ImageProcessor):
        raise TypeError(f"processor must be an aimv2.processor.AIMv2ImageProcessor, a preset name or None, got "
                        f"{type(processor).__name__}")
    if layout == "timm" and cfg.pos_embed == "sincos":
        raise ValueError("layout='timm' cannot hold a sin-cos (native-resolution) encoder: timm's aimv2 models "
                         "only have a learned position embedding; use layout='hf' or 'apple'")
    if layout == "timm" and not math.isclose(cfg.norm_eps, 1e-5, rel_tol=1e-6):
        raise ValueError(f"layout='timm' fixes RmsNorm eps at 1e-5; this encoder has norm_eps {cfg.norm_eps}")
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"path {str(path)!r} is a file; save_encoder writes a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().to("cpu") for k, v in encoder.state_dict().items()}
    # The q/k/v chunks and the squeezed HF position table are views: safetensors needs each tensor to own
    # its memory, so those (and only those: a 3B model is 11 GB) are copied.
    originals = {id(v) for v in state.values()}
    tensors = {k: v.contiguous() if id(v) in originals else v.clone(memory_format=torch.contiguous_format)
               for k, v in to_layout(state, layout).items()}
    dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
    (out_dir / "config.json").write_text(json.dumps(config_json(cfg, layout, dtype), indent=2) + "\n")
    from safetensors.torch import save_file
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(out_dir)
    return out_dir

