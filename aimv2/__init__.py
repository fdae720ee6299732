"""aimv2: a thin, faithful PyTorch model of AIMv2 (encoder + causal multimodal decoder) built on aimv2_kernels."""
from .config import PRESETS, AIMv2Config, DecoderConfig, EncoderConfig
from .model import AIMv2, AIMv2Decoder, AIMv2Encoder, AIMv2Output, count_parameters
from .processor import AIMv2ImageProcessor

__all__ = ["AIMv2Config", "EncoderConfig", "DecoderConfig", "PRESETS", "AIMv2", "AIMv2Encoder",
           "AIMv2Decoder", "AIMv2Output", "count_parameters", "AIMv2ImageProcessor"]
