"""kecompress: Knowledge Evolution for PyTorch, and the slim network it leaves behind.

The pieces, each usable from your own code:

* :func:`split` divides a model into a fit and a reset hypothesis (KELS or WELS);
* :func:`reset_` re-draws the reset hypothesis between generations;
* :func:`evolve` / :class:`Evolution` run the generation loop;
* :func:`slice_fit` cuts the KELS fit hypothesis out as a slim network;
* :mod:`kecompress.prune` registers the splits with ``torch.nn.utils.prune``.
"""

from .errors import KecompressError
from .evolution import Evolution, TrainingConfig, evolve
from .reset import reset_
from .slim import slice_fit
from .split import Split, split

__all__ = ["KecompressError", "Split", "split", "reset_", "evolve", "Evolution", "TrainingConfig", "slice_fit"]
__version__ = "0.1.0"
