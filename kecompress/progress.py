"""How far a run has got: the one object a resumed run restores its position from.

In the spirit of Lightning's ``loops/progress.py``: plain dataclasses with ``state_dict`` and
``load_state_dict``, saved in every checkpoint under the keys earlier versions wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .records import FinetuneRecord, GenerationRecord


@dataclass
class EpochProgress:
    """How far into an epoch a run stopped by Ctrl-C got: the steps it trained, their summed loss
    and images, and the random state after its last step (``ranks_rng``: every rank's, under
    torchrun), so that the resumed epoch replays the same draws and continues after them.

    Example:
        >>> EpochProgress(steps=3, loss_sum=2.5, samples=24).mean_loss()
        0.10416666666666667
    """

    steps: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    rng: torch.Tensor | None = None
    ranks_rng: list[torch.Tensor] | None = None

    def add(self, loss_sum: float, samples: int) -> None:
        """Count one finished step."""
        self.steps += 1
        self.loss_sum += loss_sum
        self.samples += samples

    def mean_loss(self) -> float:
        """The mean training loss of the steps so far."""
        return self.loss_sum / max(self.samples, 1)

    def state_dict(self) -> dict:
        state = {"steps": self.steps, "loss_sum": self.loss_sum, "samples": self.samples, "rng": self.rng}
        if self.ranks_rng is not None:
            state["ranks_rng"] = self.ranks_rng
        return state

    @classmethod
    def from_state_dict(cls, state: dict | None, rank: int = 0) -> "EpochProgress | None":
        """The progress of a checkpoint's epoch, with the random state of process ``rank``."""
        if not state:
            return None
        progress = cls(state["steps"], state["loss_sum"], state["samples"], state.get("rng"), state.get("ranks_rng"))
        if progress.ranks_rng is not None:  # each rank continues its own random numbers
            progress.rng = progress.ranks_rng[rank]
        return progress


@dataclass
class Progress:
    """The position of a run: the generation it is in, the epochs of it already trained, how far
    into the next epoch a Ctrl-C got, and the records of the finished generations; after them,
    the same for the fit network's fine-tuning, if any.

    Example:
        >>> progress = Progress()
        >>> progress.generation, progress.epochs_done, progress.inside_generation()
        (1, 0, False)
        >>> Progress.from_state_dict(progress.state_dict(), "accuracy") == progress
        True
    """

    generation: int = 1
    epochs_done: int = 0
    epoch: EpochProgress | None = None
    history: list[GenerationRecord] = field(default_factory=list)
    phase: str = "generations"  # then "finetune": epochs_done and epoch count the fit's fine-tuning
    finetune: FinetuneRecord | None = None  # the fine-tuned fit's record, once done

    def inside_generation(self) -> bool:
        """Whether the run stopped inside the current generation (its optimizer state carries on)."""
        return self.epochs_done > 0 or self.epoch is not None

    def finish_epoch(self) -> None:
        self.epochs_done += 1
        self.epoch = None

    def finish_generation(self, record: GenerationRecord) -> None:
        self.history.append(record)

    def next_generation(self) -> None:
        self.generation, self.epochs_done, self.epoch = self.generation + 1, 0, None

    def start_finetune(self) -> None:
        self.phase, self.epochs_done, self.epoch = "finetune", 0, None

    def state_dict(self) -> dict:
        """The checkpoint entries of the position (the keys earlier versions wrote)."""
        return {"generation": self.generation, "epochs_done": self.epochs_done,
                "epoch_progress": self.epoch.state_dict() if self.epoch else None,
                "history": [record.to_json() for record in self.history], "phase": self.phase,
                "finetune": self.finetune.to_json() if self.finetune else None}

    @classmethod
    def from_state_dict(cls, state: dict, metric: str, rank: int = 0) -> "Progress":
        """The position a checkpoint holds, for process ``rank``."""
        history = [GenerationRecord.from_json(record, metric) for record in state["history"]]
        finetune = state.get("finetune")
        return cls(state["generation"], state["epochs_done"],
                   EpochProgress.from_state_dict(state.get("epoch_progress"), rank), history,
                   state.get("phase", "generations"), finetune and FinetuneRecord.from_json(finetune, metric))
