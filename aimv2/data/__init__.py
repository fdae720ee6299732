"""Image-caption data for AIMv2 training and evaluation; nothing here downloads anything.

Modules:

- ``bundled``: ``ShapesDataset``, procedural scenes of coloured shapes with exact captions (``build_dataset``),
  and ``ImageTextSource``, the protocol of a source of float image tensors.
- ``decode``: ``RawSample`` (a decoded real sample), ``BadSample`` (the error of an unusable one),
  ``decode_image`` and ``to_rgb``.
- ``paths``: shard lists from directories, globs and brace patterns; folder walks.
- ``tar_index``: the header-only tar member scan and its on-disk index cache (``index_cache_dir``).
- ``sources``: real sources (``TarShards``, ``ImageFolderCaptions``, ``CSVSource``, ``JSONLSource``,
  ``ClassFolder``) and ``open_source``, which picks one from a path.
- ``transforms``: ``TrainTransform``, ``EvalTransform``, ``native_grid`` / ``fit_and_pad`` and ``Normalize``.
- ``loader``: ``TrainLoader``, the world-size-invariant, resumable training loader.
"""

from .bundled import ImageTextSource, Sample, Scene, ShapesDataset, ShapeSpec, build_dataset
from .decode import BadSample, RawSample, decode_image, to_rgb
from .loader import Batch, LoaderBatch, TrainLoader, sample_budget_exponent
from .paths import IMAGE_EXTENSIONS
from .sources import ClassFolder, CSVSource, ImageFolderCaptions, JSONLSource, TarShards, open_source
from .tar_index import INDEX_CACHE_ENV, index_cache_dir
from .transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    EvalTransform,
    Normalize,
    TrainTransform,
    fit_and_pad,
    native_grid,
    random_resized_crop_box,
    to_tensor,
)

__all__ = [
    # bundled
    "Sample",
    "ImageTextSource",
    "ShapeSpec",
    "Scene",
    "ShapesDataset",
    "build_dataset",
    # decode
    "BadSample",
    "RawSample",
    "decode_image",
    "to_rgb",
    # paths, tar_index
    "IMAGE_EXTENSIONS",
    "INDEX_CACHE_ENV",
    "index_cache_dir",
    # sources
    "TarShards",
    "ImageFolderCaptions",
    "CSVSource",
    "JSONLSource",
    "ClassFolder",
    "open_source",
    # transforms
    "to_tensor",
    "random_resized_crop_box",
    "TrainTransform",
    "EvalTransform",
    "native_grid",
    "fit_and_pad",
    "Normalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "NORMALIZATIONS",
    # loader
    "Batch",
    "LoaderBatch",
    "TrainLoader",
    "sample_budget_exponent",
]
