"""Text generation for :class:`mlm.model.MLMModel`: greedy decoding, nucleus sampling and beam search.

Decoding runs through a *session* that turns the newest tokens into next-token logits. :class:`CachedSession` keeps
per-layer KV caches of the encoder's text blocks and of the decoder (the latent cache for MLA, DeepSeek-V2 §2.1)
plus each decoder layer's image latent, computed once; it runs the absorbed MLA path. :class:`RecomputeSession`
recomputes one full forward per step and exists as the reference that cached decoding must match. Beam search keeps
the best ``num_beams`` hypotheses per image and ranks finished ones by length-normalised log-probability (Wu et al.,
2016, with alpha = 1); nucleus sampling keeps the smallest top set of tokens whose probability reaches ``top_p``
(Holtzman et al., 2020). ``min_new_tokens`` forbids EOS for the first tokens of every sequence (as transformers'
``MinLengthLogitsProcessor``), so a barely trained model still says something.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor

# Upper bounds on decoding settings: caches and masks are sized by them before the first step.
MAX_NEW_TOKENS = 512
MAX_BEAMS = 32


@dataclass(frozen=True)
class DecodingConfig:
    """How ``generate()`` / ``answer()`` decode (transformers' GenerationConfig in small); a checkpoint saves its
    defaults as generation_config.json beside the weights."""

    max_new_tokens: int = 20
    num_beams: int = 1  # > 1: beam search
    top_p: float = 0.0  # > 0: nucleus sampling
    min_new_tokens: int = 0  # EOS is forbidden before this many new tokens

    def __post_init__(self):
        numbers = {f.name: getattr(self, f.name) for f in fields(self)}
        integers = ("max_new_tokens", "num_beams", "min_new_tokens")
        if any(
            isinstance(v, bool) or not isinstance(v, int if k in integers else (int, float)) for k, v in numbers.items()
        ):
            raise ValueError(f"decoding settings must be numbers (integers but top_p), got {numbers}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS or not 1 <= self.num_beams <= MAX_BEAMS:
            raise ValueError(f"need 1 <= max_new_tokens <= {MAX_NEW_TOKENS} and 1 <= num_beams <= {MAX_BEAMS}; "
                             f"got {self.max_new_tokens}, {self.num_beams}")  # fmt: skip
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must lie in [0, 1]")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} must lie in [0, max_new_tokens={self.max_new_tokens}]"
            )
        if self.num_beams > 1 and self.top_p > 0:
            raise ValueError(f"choose beam search (num_beams={self.num_beams}) or nucleus sampling "
                             f"(top_p={self.top_p}), not both")  # fmt: skip

    def update(self, **settings) -> DecodingConfig:
        """A copy with the given settings that are not None replaced (checked again)."""
        return replace(self, **{k: v for k, v in settings.items() if v is not None})

    def to_dict(self) -> dict:
        """The settings as a plain dict (what generation_config.json holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "generation config") -> DecodingConfig:
        """Settings from a dict; an unknown key or a bad value is named with ``where``."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown decoding setting(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass
class DecodingCache:
    """Everything incremental decoding keeps between steps for a batch of sequences."""

    encoder: list  # one self-attention cache per encoder block
    decoder: list  # one self-attention cache per decoder layer (then the short convolution's history, if any)
    contexts: list  # one cross-attention cache (image latent) per decoder layer
    total_len: int  # the longest sequence this cache will hold (sizes the masks)
    length: int = 0  # tokens cached so far

    def caches(self) -> list:
        """Return every cache object, for batch reordering."""
        return [*self.encoder, *self.decoder, *self.contexts]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows index (B',) in that order (beam search, dropping finished rows)."""
        for cache in self.caches():
            cache.reorder(index)

    def expand(self, n: int) -> None:
        """Repeat every batch row n times (one copy per beam)."""
        for cache in self.caches():
            cache.expand(n)


class CachedSession:
    """Incremental decoding over KV caches; the image latent is computed once and reused every step."""

    def __init__(self, model, image_tokens: Tensor, total_len: int):
        self.model = model
        self.cache = model.start_decoding(image_tokens, total_len)

    def step(self, ids: Tensor) -> Tensor:
        """Feed new tokens (B, t) and return the next-token logits (B, V)."""
        return self.model.decode_step(ids, self.cache)[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows index in that order."""
        self.cache.reorder(index)

    def expand(self, n: int) -> None:
        """Repeat every batch row n times."""
        self.cache.expand(n)


class RecomputeSession:
    """Reference decoding: every step runs the full naive forward over all tokens so far (no cache)."""

    def __init__(self, model, image_tokens: Tensor, total_len: int):
        self.model = model
        self.image_tokens = image_tokens  # (B, N, C)
        self.tokens: Tensor | None = None  # (B, L)

    def step(self, ids: Tensor) -> Tensor:
        """Append new tokens (B, t) and return the next-token logits (B, V) from a full forward."""
        self.tokens = ids if self.tokens is None else torch.cat((self.tokens, ids), dim=1)
        return self.model.text_logits(self.image_tokens, self.tokens)[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows index in that order."""
        self.image_tokens = self.image_tokens.index_select(0, index)
        self.tokens = self.tokens.index_select(0, index)

    def expand(self, n: int) -> None:
        """Repeat every batch row n times."""
        self.image_tokens = self.image_tokens.repeat_interleave(n, dim=0)
        self.tokens = self.tokens.repeat_interleave(n, dim=0)


class MinLengthSession:
    """Wraps a session and sets the EOS logit to -inf for the first ``min_new_tokens`` generated tokens."""

    def __init__(self, session, eos_id: int, min_new_tokens: int):
        self.session, self.eos_id, self.remaining = session, eos_id, min_new_tokens

    def step(self, ids: Tensor) -> Tensor:
        """Next-token logits (B, V) of the wrapped session, EOS masked while the minimum length is not reached."""
        logits = self.session.step(ids)
        if self.remaining > 0:
            self.remaining -= 1
            logits = logits.clone()
            logits[:, self.eos_id] = float("-inf")
        return logits

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows index in that order."""
        self.session.reorder(index)

    def expand(self, n: int) -> None:
        """Repeat every batch row n times."""
        self.session.expand(n)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Return logits (B, V) with -inf outside each row's nucleus: the fewest top tokens whose probability >= top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability of the tokens ranked above each one
    drop_sorted = mass_before >= top_p  # the top token always stays (mass_before = 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: Tensor, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Pick one token per row (B,): argmax when top_p == 0, else a sample from the top_p nucleus."""
    if top_p <= 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits, top_p).float().softmax(dim=-1)  # (B, V)
    if generator is not None and probs.device != generator.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_search(
    session, logits: Tensor, *, max_new_tokens: int, eos_id: int, top_p: float, generator: torch.Generator | None
) -> list[list[int]]:
    """Greedy (top_p = 0) or nucleus decoding from first logits (B, V); finished rows leave the batch."""
    outputs: list[list[int]] = [[] for _ in range(logits.shape[0])]
    active = torch.arange(logits.shape[0], device=logits.device)  # session row -> output row
    for step in range(max_new_tokens):
        ids = next_tokens(logits, top_p, generator)  # (b,)
        running = ids != eos_id
        for row, token, alive in zip(active.tolist(), ids.tolist(), running.tolist(), strict=True):
            if alive:
                outputs[row].append(token)
        keep = running.nonzero().squeeze(1)
        if keep.numel() == 0 or step == max_new_tokens - 1:
            break
        if keep.numel() < active.numel():
            session.reorder(keep)
            active, ids = active[keep], ids[keep]
        logits = session.step(ids[:, None])
    return outputs


def _select_beams(
    top_scores: list[float], top_index: list[int], vocab: int, num_beams: int, eos_id: int
) -> tuple[list[tuple[float, int, int]], list[tuple[float, int]]]:
    """Split one image's best candidates into running beams and finished ones (EOS).

    Returns ([(score, source_beam, token)] * num_beams, [(score, source_beam)] for each EOS among the candidates
    ranked above the last running beam).
    """
    running, finished = [], []
    for score, index in zip(top_scores, top_index, strict=True):
        if score == float("-inf"):
            break
        source, token = divmod(index, vocab)
        if token == eos_id:
            finished.append((score, source))
        else:
            running.append((score, source, token))
            if len(running) == num_beams:
                break
    return running, finished


def beam_search(session, logits: Tensor, *, num_beams: int, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Beam search from first logits (B, V); returns the best hypothesis per row by mean token log-probability.

    A row stops once ``num_beams`` hypotheses have finished and its best running beam can no longer beat them
    (see :func:`_row_done`); rows still running at ``max_new_tokens`` finish with their running beams.
    """
    batch, vocab = logits.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if 2 * num_beams > vocab:
        raise ValueError(f"num_beams={num_beams} needs a vocabulary of at least {2 * num_beams} tokens, got {vocab}")
    session.expand(num_beams)
    logprobs = logits.float().log_softmax(dim=-1).repeat_interleave(num_beams, dim=0)  # (B*K, V)
    scores = torch.full((batch, num_beams), float("-inf"), device=logits.device)
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step one
    beams: list[list[int]] = [[] for _ in range(batch * num_beams)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        total = (scores[:, :, None] + logprobs.view(batch, num_beams, vocab)).view(batch, -1)  # (B, K*V)
        top_scores, top_index = total.topk(2 * num_beams, dim=-1)  # (B, 2K)
        new_scores, sources, tokens = [], [], []
        for b, (row_scores, row_index) in enumerate(zip(top_scores.tolist(), top_index.tolist(), strict=True)):
            running, ended = ([], []) if done[b] else _select_beams(row_scores, row_index, vocab, num_beams, eos_id)
            for score, source in ended:
                finished[b].append((score / (step + 1), beams[b * num_beams + source]))
            done[b] = done[b] or not running or _row_done(finished[b], running[0][0] / (step + 1), num_beams)
            running += [(float("-inf"), 0, eos_id)] * (num_beams - len(running))  # placeholders for stopped rows
            for score, source, token in running:
                new_scores.append(score)
                sources.append(b * num_beams + source)
                tokens.append(token)
        beams = [beams[s] + [t] for s, t in zip(sources, tokens, strict=True)]
        if all(done) or step == max_new_tokens - 1:
            break
        index = torch.tensor(sources, device=logits.device)
        session.reorder(index)
        scores = torch.tensor(new_scores, device=logits.device).view(batch, num_beams)
        logprobs = session.step(torch.tensor(tokens, device=logits.device)[:, None]).float().log_softmax(dim=-1)
    return _best_hypotheses(finished, beams, new_scores, done, num_beams, max_new_tokens)


def _row_done(finished: list[tuple[float, list[int]]], best_running: float, num_beams: int) -> bool:
    """True once num_beams hypotheses have finished and none is worse than the best running beam's mean so far.

    This is the stopping rule of transformers' beam search without early stopping: a longer hypothesis can still
    win under length normalisation, so a row keeps going while its best running beam beats a finished one.
    """
    if len(finished) < num_beams:
        return False
    kth_best = sorted((score for score, _ in finished), reverse=True)[num_beams - 1]
    return kth_best >= best_running


def _best_hypotheses(finished, beams, last_scores, done, num_beams: int, length: int) -> list[list[int]]:
    """Add the running beams of unfinished rows to their finished list and return the best of each row."""
    best = []
    for b, row in enumerate(finished):
        if not done[b]:
            for k in range(num_beams):
                score = last_scores[b * num_beams + k]
                if score > float("-inf"):
                    row.append((score / length, beams[b * num_beams + k]))
        best.append(max(row, key=lambda item: item[0])[1] if row else [])
    return best


def generate_from_prompts(
    model,
    image_tokens: Tensor,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    num_beams: int,
    top_p: float,
    eos_id: int,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    min_new_tokens: int = 0,
    session_factory=None,
) -> list[list[int]]:
    """Continue each prompt (token ids, BOS first) for its image tokens (B, N, C); return the new ids, EOS dropped.

    Prompts of equal length decode together, so no sequence ever holds padding. EOS cannot end a sequence before
    ``min_new_tokens`` new tokens. ``session_factory(rows, total_len)``, when given, makes the session of a group of
    rows (another runtime, e.g. ONNX) instead of the model's cached or recomputing one.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for row, ids in enumerate(prompts):
        groups[len(ids)].append(row)
    session_type = CachedSession if use_cache else RecomputeSession
    results: list[list[int]] = [[] for _ in prompts]
    for length, rows in groups.items():
        index = torch.tensor(rows, device=image_tokens.device)
        if session_factory is not None:
            session = session_factory(index, length + max_new_tokens)
        else:
            session = session_type(model, image_tokens.index_select(0, index), length + max_new_tokens)
        if min_new_tokens > 0:
            session = MinLengthSession(session, eos_id, min_new_tokens)
        logits = session.step(torch.tensor([prompts[r] for r in rows], device=image_tokens.device))  # (b, V)
        if num_beams > 1:
            outputs = beam_search(session, logits, num_beams=num_beams, max_new_tokens=max_new_tokens, eos_id=eos_id)
        else:
            outputs = sample_search(
                session, logits, max_new_tokens=max_new_tokens, eos_id=eos_id, top_p=top_p, generator=generator
            )
        for row, output in zip(rows, outputs, strict=True):
            results[row] = output
    return results


@torch.no_grad()
def cache_bytes(model) -> dict[str, int]:
    """Measure decoding cache sizes in the model's dtype: bytes per generated token and per image.

    Keys: ``encoder`` and ``decoder`` (self-attention caches, per token, all layers), ``per_token`` (their sum)
    and ``per_image`` (the cross-attention image latents, computed once per image).
    """
    n_patches = model.encoder.grid[0] * model.encoder.grid[1]
    dtype = model.logit_scale.dtype
    image_tokens = torch.zeros(1, n_patches, model.config.dim, device=model.device, dtype=dtype)
    cache = model.start_decoding(image_tokens, total_len=1)
    model.decode_step(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache)
    encoder = sum(c.bytes_per_token() for c in cache.encoder)
    decoder = sum(c.bytes_per_token() for c in cache.decoder)
    per_image = sum(c.bytes_per_token() * c.length for c in cache.contexts)
    return {"encoder": encoder, "decoder": decoder, "per_token": encoder + decoder, "per_image": per_image}
