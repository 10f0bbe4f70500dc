"""Word grounding at the decoder's input (``model.decoder_grounding``): each text position reads the patches where
the words it has just read are seen.

The per-patch word head (``model.word_head_patches``) learns, from captions alone, which words each patch shows:
log p(word | patch). Its maps already find "the green triangle" (the sum of the two words' maps peaks on that
object's patches in ~9 of 10 cases) in runs whose decoder never learns to search for it, so this module hands the
decoder that search instead of leaving it to be discovered. For the tokens read so far, with a decay per head,

    S_t(n) = sum_{s <= t} gamma^(t - s) * w(x_s) * log p(x_s | patch n)

is a conjunction of the recent words' maps (a sum of log-probabilities); each head reads the image through
softmax_n(beta * S_t(n)) — values carry each patch's content and place — and gets two presence scores: the peak
max_n S_t(n), high when some patch shows the recent words ("is there a red shape?" with one shape: its own
evidence for "red"), and the match: that peak less sum_s gamma^(t - s) max_n w(x_s) log p(x_s | n), zero when one
patch shows all the recent words and negative when no patch does ("is there a red circle?" among several objects).
A zero-initialised projection adds the reads and scores to the text states, so a new model starts as the plain
decoder. The word maps are detached: the word objective alone trains them. A word the objective never learns has
a map that means nothing, so training starts w at 1 for the words the objective learns (IDF > 0) and at 0 for the
rest (:meth:`WordGrounding.start_words`; a word like "is" would otherwise drown the evidence for "red" until w had
learned to ignore it). Cached decoding keeps S and its normaliser per sequence (:class:`GroundingState`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GroundingState:
    """The image's word maps and values, and the running sums S and normaliser of every sequence being decoded."""

    def __init__(self, word_logprobs: Tensor, values: Tensor):
        self.word_logprobs, self.values = word_logprobs, values  # (B, N, V), (B, N, C)
        self.sums: Tensor | None = None  # (B, H, N)
        self.norm: Tensor | None = None  # (B, H)

    def _tensors(self) -> list[str]:
        return [name for name in ("word_logprobs", "values", "sums", "norm") if getattr(self, name) is not None]

    def reorder(self, index: Tensor):
        """Select batch rows by index in place (beam search) and return self."""
        for name in self._tensors():
            value = getattr(self, name)
            setattr(self, name, value.index_select(0, index.to(value.device)))
        return self

    def expand(self, n: int):
        """Repeat each batch row n times in place (one copy per beam) and return self."""
        for name in self._tensors():
            setattr(self, name, getattr(self, name).repeat_interleave(n, dim=0))
        return self


def _refuse_one_score_weights(module, state_dict, prefix, *_args) -> None:
    """Weights saved with one presence score per head (before 2026-12-08) do not fit: say so in one line."""
    weight = state_dict.get(prefix + "out.weight")
    if weight is not None and weight.dim() == 2 and weight.shape[1] == module.heads * (weight.shape[0] + 1):
        raise ValueError(
            f"{prefix}out.weight: saved by word grounding with one presence score per head; it now has two "
            "(the peak), so these weights need retraining"
        )


class WordGrounding(nn.Module):
    """x + out([each head's read of the image through its word map, its two presence scores]) for text states x."""

    def __init__(self, dim: int, vocab_size: int, heads: int, patch_pos: Tensor):
        super().__init__()
        self.heads = heads
        decays = torch.linspace(0.5, 0.9, heads) if heads > 1 else torch.tensor([0.7])
        self.decay_logit = nn.Parameter(torch.logit(decays))  # per head: how far back the words still count
        self.log_sharpness = nn.Parameter(torch.zeros(heads))  # beta per head, starting at 1
        self.word_weight = nn.Parameter(torch.ones(vocab_size))  # w: how much each word steers the search
        self.value = nn.Linear(dim, dim, bias=False)
        self.pos_value = nn.Linear(dim, dim, bias=False)
        self.register_buffer("patch_pos", patch_pos, persistent=False)  # (1, N, C) sin-cos, rebuilt from config
        self.out = nn.Linear(heads * (dim + 2), dim, bias=False)  # per head: its read and two presence scores
        nn.init.zeros_(self.out.weight)  # starts as the plain decoder
        self.register_load_state_dict_pre_hook(_refuse_one_score_weights)

    @torch.no_grad()
    def start_words(self, learned: Tensor) -> None:
        """Set w to 1 for the words the word objective learns (``learned``, (V,) bool) and 0 for the others."""
        if learned.shape != self.word_weight.shape:
            raise ValueError(
                f"word grounding: {learned.numel()} word flags for a vocabulary of {self.word_weight.numel()}"
            )
        self.word_weight.copy_(learned.to(self.word_weight))

    def start(self, image_tokens: Tensor, word_logprobs: Tensor) -> GroundingState:
        """Return a decoding state for image tokens (B, N, C) and their patches' word log-probs (B, N, V)."""
        pos = self.patch_pos.to(image_tokens.dtype)
        if pos.shape[1] != image_tokens.shape[1]:
            raise ValueError(f"word grounding: {image_tokens.shape[1]} image tokens, the patch grid has {pos.shape[1]}")
        values = self.value(image_tokens) + self.pos_value(pos)
        return GroundingState(word_logprobs.detach(), values)

    def _decays(self, t: int, device) -> tuple[Tensor, Tensor]:
        """(H, t, t) weights gamma^(i - j) for j <= i, and (H, t) gamma^(i + 1) that carries the past state."""
        log_gamma = nn.functional.logsigmoid(self.decay_logit)[:, None, None]  # (H, 1, 1)
        i = torch.arange(t, device=device)
        lag = (i[:, None] - i[None, :]).float()  # (t, t)
        weights = torch.where(lag >= 0, (log_gamma * lag.clamp(min=0)).exp(), torch.zeros((), device=device))
        carry = (log_gamma[:, :, 0] * (i + 1).float()).exp()  # (H, t)
        return weights, carry

    def search(self, ids: Tensor, state: GroundingState, cached: bool = False) -> tuple[Tensor, Tensor]:
        """Each head's weights over the patches (B, H, t, N) and presence scores (B, H, t, 2) for tokens ids (B, t):
        the peak less the normaliser, and the peak.

        ``cached``: the tokens continue the sequences ``state`` has seen (decoding), whose running sums they update.
        """
        b, t = ids.shape
        lp = state.word_logprobs  # (B, N, V)
        maps = lp.gather(2, ids[:, None, :].expand(b, lp.shape[1], t)).transpose(1, 2)  # (B, t, N)
        maps = maps.float() * self.word_weight[ids].float()[..., None]
        weights, carry = self._decays(t, ids.device)
        sums = torch.einsum("hij,bjn->bhin", weights, maps)  # (B, H, t, N)
        norm = torch.einsum("hij,bj->bhi", weights, maps.amax(dim=-1))  # (B, H, t)
        if cached and state.sums is not None:
            sums = sums + carry[None, :, :, None] * state.sums[:, :, None]
            norm = norm + carry[None] * state.norm[:, :, None]
        if cached:
            state.sums, state.norm = sums[:, :, -1], norm[:, :, -1]
        peak = sums.amax(dim=-1)
        # (B, H, t, 2): the match (0 when one patch shows every recent word) and the peak (the evidence)
        score = torch.stack((peak - norm, peak), dim=-1)
        return (sums * self.log_sharpness.exp()[:, None, None]).softmax(dim=-1), score

    def forward(self, x: Tensor, ids: Tensor, state: GroundingState, cached: bool = False) -> Tensor:
        """Return text states x (B, t, C) plus what each position reads; ``ids`` (B, t) are the tokens of x
        (``cached`` as in :meth:`search`)."""
        b, t = ids.shape
        attn, score = self.search(ids, state, cached)
        read = attn.to(x.dtype) @ state.values[:, None]  # (B, H, t, C)
        scores = score.transpose(1, 2).reshape(b, t, -1).to(x.dtype)  # (B, t, 2H)
        features = torch.cat((read.permute(0, 2, 1, 3).reshape(b, t, -1), scores), dim=-1)
        return x + self.out(features)
