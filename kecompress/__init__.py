"""kecompress: Knowledge Evolution for PyTorch, and the slim network it leaves behind.

The pieces, each usable from your own code:

* :func:`split` divides a model into a fit and a reset hypothesis (KELS or WELS);
* :func:`reset_` re-draws the reset hypothesis between generations;
* :mod:`kecompress.forgetting` holds what else can happen between generations (later-layer
  forgetting, shrink and perturb, nothing) and how to write your own;
* :func:`evolve` / :class:`Evolution` run the generation loop, calling your :class:`Callback`\\ s;
* :func:`slice_fit` cuts the KELS fit hypothesis out as a slim network, :func:`fit_network`
  gives the fit network as a run measures it;
* :mod:`kecompress.prune` registers the splits with ``torch.nn.utils.prune``;
* :class:`EdgePopup` (:mod:`kecompress.edge_popup`) finds a sub-network in frozen random weights by
  learning scores, a pruning method of the same API.
"""

from .callbacks import Callback
from .config import RunConfig, TrainingConfig
from .edge_popup import EdgePopup
from .errors import KecompressError
from .evolution import Evolution, evolve
from .records import GenerationRecord
from .reset import reset_
from .slim import fit_network, slice_fit
from .split import Split, split

__all__ = ["KecompressError", "Split", "split", "reset_", "evolve", "Evolution", "TrainingConfig", "RunConfig",
           "Callback", "GenerationRecord", "slice_fit", "fit_network", "EdgePopup"]
__version__ = "0.1.0"
