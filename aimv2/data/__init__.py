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

from . import bundled, decode, loader, paths, sources, tar_index, transforms
from .bundled import *  # noqa: F403  (each module's __all__ is the package's public names)
from .decode import *  # noqa: F403
from .loader import *  # noqa: F403
from .paths import *  # noqa: F403
from .sources import *  # noqa: F403
from .tar_index import *  # noqa: F403
from .transforms import *  # noqa: F403

__all__ = [name for module in (bundled, decode, paths, tar_index, sources, transforms, loader)
           for name in module.__all__]
