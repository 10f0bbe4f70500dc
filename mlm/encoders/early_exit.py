"""Early exit for images (``model.early_exit``): easy inputs stop after fewer encoder blocks.

After each block but the last an image has an *exit*: the shared hierarchical pooler reads the states so far (a
level whose last block has run gives that block's output, as always; a level still to come gives the current
block's output), so every exit is an embedding in the same space with no new projection. A light halting gate per
exit (one linear layer on the exit's pooled vector, its input detached so it never changes the encoder) predicts
how well that exit agrees with the full-depth embedding: it is trained to the cosine of the two, clamped to [0, 1]
(``train.exit_weight`` also trains every exit's embedding with the contrastive loss, as deep supervision does).

With ``model.exit_lens`` each exit also has a *lens*, as the tuned lens (Belrose et al., 2023) reads a language
model's middle layers: an affine map per exit (a zero-initialised residual, so it starts as the identity) from the
exit's states to the final states, trained on detached states to the detached final states (relative squared
error). The exit's pooler input and the states the decoder reads are the lensed ones, so an early exit reads like
the full depth, and neither the encoder nor the full-depth outputs change (``train.exit_weight: 0``).

At inference ``model.exit_threshold`` (``--exit-threshold``) picks the point per sample: an image stops at the first
exit whose gate predicts agreement >= the threshold, and its states there are what the pooler and the decoder read;
images that do not stop go on, so one batch mixes depths. The outputs have the same form whatever the depth;
``blocks_used`` counts the blocks each image ran. Text always runs every block (its states feed the decoder).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EarlyExit(nn.Module):
    """Halting gates after blocks 0 .. n_layers - 2 and the per-sample adaptive image pass."""

    def __init__(self, dim: int, n_layers: int, lens: bool = False):
        super().__init__()
        self.gates = nn.ModuleList([nn.Linear(dim, 1) for _ in range(max(0, n_layers - 1))])
        self.lenses = nn.ModuleList([nn.Linear(dim, dim) for _ in self.gates]) if lens else None
        for layer in self.lenses or ():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.blocks_used = torch.zeros(0, dtype=torch.long)  # per image of the last adaptive pass
        self.images_seen, self.blocks_run = 0, 0  # totals over adaptive passes (reset_counts)

    def reset_counts(self) -> None:
        """Start counting blocks per image anew."""
        self.images_seen, self.blocks_run = 0, 0

    def mean_blocks(self) -> float:
        """Mean encoder blocks per image over the adaptive passes since the last reset (0 before any)."""
        return self.blocks_run / max(1, self.images_seen)

    def lensed(self, states: Tensor, block: int) -> Tensor:
        """The states an exit after ``block`` hands on: its lens's estimate of the final states (or as they are)."""
        if self.lenses is None:
            return states
        return states + self.lenses[block](states)

    def exit_levels(self, encoder, normed: dict[int, Tensor], current: Tensor, block: int) -> dict[str, Tensor]:
        """The pooler's states at an exit after ``block``: levels done so far, the current states for the rest."""
        return {level: normed[i] if i <= block else current for level, i in encoder.level_outputs.items()}

    def training_pass(self, encoder, pooler, images: Tensor):
        """(full-depth encoder output, exit embeddings (E, B, D), gate logits (E, B), the lenses' loss or None); the
        gates' targets, each exit's agreement with the full-depth embedding, are computed by the loss from the
        model's output."""
        from mlm.encoders.shared import EncoderOutput

        x, rope, masks = encoder.embed_image(images)
        normed, exits, logits, lensed = {}, [], [], []
        for i, out in encoder.block_outputs(x, "image", rope=rope, masks=masks):
            normed[i] = states = encoder.norm(out, "image")
            if i < len(self.gates):
                if self.lenses is not None:  # trained on its own: no gradient reaches the encoder through it
                    states = self.lensed(states.detach(), i)
                    lensed.append(states)
                pooled = pooler(self.exit_levels(encoder, normed, states, i))
                exits.append(pooled.embeds)
                logits.append(self.gates[i](pooled.pooled.detach()).squeeze(-1))
        last = len(encoder.blocks) - 1
        out = EncoderOutput(normed[last], {level: normed[i] for level, i in encoder.level_outputs.items()})
        if not exits:
            return out, None, None, None
        lens_loss = None
        if lensed:  # relative squared error to the final states, mean over exits
            target = normed[last].detach().float()
            scale = target.square().sum()
            lens_loss = torch.stack([(s.float() - target).square().sum() / scale for s in lensed]).mean()
        return out, torch.stack(exits), torch.stack(logits), lens_loss

    @torch.no_grad()
    def adaptive_pass(self, encoder, pooler, images: Tensor, threshold: float):
        """Encoder output where each image stops at its first exit with agreement >= threshold."""
        from mlm.encoders.shared import EncoderOutput

        b = images.shape[0]
        x, rope, masks = encoder.embed_image(images)
        active = torch.arange(b, device=images.device)  # rows still running
        tokens = x.new_zeros(x.shape)
        levels = {level: x.new_zeros(x.shape) for level in encoder.level_outputs}
        used = torch.full((b,), len(encoder.blocks), dtype=torch.long)
        normed: dict[int, Tensor] = {}
        for i, block in enumerate(encoder.blocks):
            x = block(x, "image", rope=rope, mask=masks[block.level])
            normed[i] = encoder.norm(x, "image")
            last = i == len(encoder.blocks) - 1
            states = normed[i] if last else self.lensed(normed[i], i)
            exit_states = self.exit_levels(encoder, normed, states, i)  # after the last block: the full levels
            stop = torch.ones(len(active), dtype=torch.bool, device=x.device)
            if not last:
                agreement = torch.sigmoid(self.gates[i](pooler(exit_states).pooled)).squeeze(-1)
                stop = agreement >= threshold
            if bool(stop.any()):
                rows = active[stop]
                tokens[rows] = states[stop]
                for level, state in exit_states.items():
                    levels[level][rows] = state[stop]
                used[rows.cpu()] = i + 1
                keep = ~stop
                active, x = active[keep], x[keep]
                normed = {k: v[keep] for k, v in normed.items()}
            if len(active) == 0:
                break
        self.blocks_used = used
        self.images_seen, self.blocks_run = self.images_seen + b, self.blocks_run + int(used.sum())
        return EncoderOutput(tokens, levels)
