"""What a checkpoint holds of the trainer beyond model, optimizer and RNG: progress, counters and sampler tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainerState:
    """Checkpointed beyond model/optimizer/RNG: progress and counters (JSON), sampler embeddings (safetensors)."""

    step: int = 0  # optimizer steps taken, skipped ones included (each consumes grad_accum_steps micro-batches)
    elapsed_s: float = 0.0  # training time of earlier sessions of this run
    max_steps: int = 0  # the schedule's end when train.fit_steps_to_time moved it; 0 = train.max_steps
    nonfinite: dict = field(default_factory=lambda: {"skipped": 0, "consecutive": 0})
    grouping: torch.Tensor | None = None  # (N, E) text embeddings the hard-negative sampler groups this epoch by

    def progress(self) -> dict:
        """The JSON part."""
        return {
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "max_steps": self.max_steps,
            "nonfinite": dict(self.nonfinite),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors part."""
        return {} if self.grouping is None else {"grouping": self.grouping}

    def restore(self, progress: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from a checkpoint's trainer state and tensors."""
        self.step, self.elapsed_s = int(progress["step"]), float(progress.get("elapsed_s", 0.0))
        self.max_steps = int(progress.get("max_steps", 0))
        self.nonfinite = {"skipped": 0, "consecutive": 0, **progress.get("nonfinite", {})}
        self.grouping = tensors.get("grouping")
