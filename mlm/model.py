"""MLMModel: shared-weight MLA encoder, hierarchical pooling, multimodal decoder, generation and save/load.

One forward pass gives everything CoCa-style training (Yu et al., 2022) needs: L2-normalised image and text
embeddings with a learned logit scale (CLIP, Radford et al., 2021) and logit bias (SigLIP, Zhai et al., 2023) for
the contrastive loss, and LM logits for the caption / answer loss. A checkpoint is a folder with config.json (the
whole :class:`~mlm.config.Config`), model.safetensors and, when a tokenizer is attached, tokenizer.json, written and
read through huggingface_hub's ``PyTorchModelHubMixin``; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, constants
from safetensors.torch import save_model
from torch import Tensor, nn

from mlm.config import Config, ConfigError, config_from_dict
from mlm.data.tokenizer import MLMTokenizer, vqa_prompt
from mlm.encoders.shared import SharedEncoder
from mlm.fusion.decoder import MultimodalDecoder
from mlm.fusion.hierarchical import POOLING
from mlm.generation import MAX_BEAMS, MAX_NEW_TOKENS, DecodingCache, generate_from_prompts
from mlm.model_files import load_weights, read_config, resolve_file

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class MLMOutput:
    """What :meth:`MLMModel.forward` returns; the training loop fills ``loss`` and ``losses``."""

    loss: Tensor | None = None
    losses: dict[str, Tensor] | None = None
    image_embeds: Tensor | None = None  # (B, E) L2-normalised
    text_embeds: Tensor | None = None  # (B, E) L2-normalised
    logit_scale: Tensor | None = None  # scalar, exp'ed and clamped to <= 100
    logit_bias: Tensor | None = None  # scalar, for the SigLIP loss
    logits: Tensor | None = None  # (B, T, V): position t predicts token t + 1
    image_tokens: Tensor | None = None  # (B, N, C) final image states read by the decoder
    negative_embeds: Tensor | None = None  # (M, E) L2-normalised swapped-word negative captions, when given


@dataclass
class Features:
    """One modality after the encoder and pooling."""

    embeds: Tensor  # (B, E) L2-normalised embeddings in the shared space
    tokens: Tensor  # (B, T, C) final encoder states
    pool_weights: dict[str, Tensor]  # level -> (B, T) softmax pooling weights over positions
    projected: Tensor | None = None  # (B, E) the embeddings before L2 normalisation


def check_text_mask(text_ids: Tensor, text_mask: Tensor | None) -> Tensor:
    """Return a boolean (B, T) mask (all True when None); raise ValueError unless text is right-padded."""
    if text_mask is None:
        return torch.ones_like(text_ids, dtype=torch.bool)
    if text_mask.shape != text_ids.shape:
        raise ValueError(f"text_mask has shape {tuple(text_mask.shape)} but text_ids {tuple(text_ids.shape)}")
    text_mask = text_mask.bool()
    if bool((text_mask[:, 1:] & ~text_mask[:, :-1]).any()):
        raise ValueError("text must be right-padded: text_mask has a real token after a pad in some row")
    return text_mask


class MLMModel(nn.Module, PyTorchModelHubMixin, library_name="mlm", tags=["vision-language", "mla", "coca"]):
    """Shared-weight vision-language model: contrastive embeddings, captioning and VQA from one encoder."""

    def __init__(self, config: Config, tokenizer: MLMTokenizer | None = None):
        super().__init__()
        if not isinstance(config, Config):
            raise ValueError(f"MLMModel needs a mlm.config.Config, got {type(config).__name__}")
        self.config = config
        m = config.model
        self.encoder = SharedEncoder(m)
        self.pooler = POOLING[m.pooling](m.dim, m.levels, m.pool_hidden_dim, m.embed_dim, m.level_weight_init)
        self.decoder = MultimodalDecoder(m, self.encoder.token_embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: MLMTokenizer) -> None:
        """Attach the tokenizer used by generate() and saved beside the weights."""
        if tokenizer.vocab_size > self.config.model.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={self.config.model.vocab_size}"
            )
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.logit_scale.device

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder blocks and decoder layers in the backward pass to save activation memory."""
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def image_features(self, images: Tensor) -> Features:
        """Encode images (B, 3, H, W) into embeddings, final patch states and pooling weights."""
        out = self.encoder.encode_image(images)
        pooled = self.pooler(out.levels)
        return Features(pooled.embeds, out.tokens, pooled.weights, pooled.projected)

    def text_features(self, text_ids: Tensor, text_mask: Tensor | None = None) -> Features:
        """Encode right-padded token ids (B, T) into embeddings, causal token states and pooling weights."""
        mask = check_text_mask(text_ids, text_mask)
        out = self.encoder.encode_text(text_ids)
        pooled = self.pooler(out.levels, mask)
        return Features(pooled.embeds, out.tokens, pooled.weights, pooled.projected)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Return image embeddings (B, E), L2-normalised when ``normalize`` (open_clip's signature)."""
        features = self.image_features(images)
        return features.embeds if normalize else features.projected

    def encode_text(self, text_ids: Tensor, normalize: bool = False, text_mask: Tensor | None = None) -> Tensor:
        """Return text embeddings (B, E) of right-padded ids, L2-normalised when ``normalize`` (open_clip's signature).

        Without ``text_mask`` the real tokens are those that are not the tokenizer's pad id (all, with no tokenizer).
        """
        if isinstance(normalize, Tensor):
            raise TypeError("encode_text(ids, normalize=False, text_mask=None): pass a mask as text_mask=")
        if text_mask is None and self.tokenizer is not None:
            text_mask = text_ids != self.tokenizer.pad_id
        features = self.text_features(text_ids, text_mask)
        return features.embeds if normalize else features.projected

    def _decode(self, text_states: Tensor, *, start: int, total_len: int, **decoder_kwargs) -> Tensor:
        """Run the multimodal decoder on text states (B, t, C) at positions start..start+t-1; returns (B, t, V)."""
        end = start + text_states.shape[1]
        rope = self.encoder.text_rope(start, end, text_states.device)
        mask = self.encoder.text_mask("global", total_len, start, end, text_states.device)
        return self.decoder(text_states, rope=rope, mask=mask, **decoder_kwargs)

    def text_logits(self, image_tokens: Tensor, text_ids: Tensor) -> Tensor:
        """Return LM logits (B, T, V) for token ids (B, T) given image tokens (B, N, C); full forward, no cache."""
        states = self.encoder.encode_text(text_ids).tokens  # (B, T, C)
        return self._decode(states, start=0, total_len=text_ids.shape[1], context=image_tokens)

    def forward(
        self,
        images: Tensor,
        text_ids: Tensor,
        text_mask: Tensor | None = None,
        negative_ids: Tensor | None = None,
        negative_mask: Tensor | None = None,
    ) -> MLMOutput:
        """Return image/text embeddings, logit scale and bias, and LM logits for a batch of image-text pairs;
        negative_ids (M, T') are extra captions embedded for the contrastive loss only."""
        image = self.image_features(images)
        mask = check_text_mask(text_ids, text_mask)
        text_out = self.encoder.encode_text(text_ids)  # one causal pass feeds pooling and the decoder
        text = self.pooler(text_out.levels, mask)
        logits = self._decode(text_out.tokens, start=0, total_len=text_ids.shape[1], context=image.tokens)
        return MLMOutput(
            image_embeds=image.embeds,
            text_embeds=text.embeds,
            logit_scale=self.logit_scale.exp().clamp(max=100.0),
            logit_bias=self.logit_bias,
            logits=logits,
            image_tokens=image.tokens,
            negative_embeds=(
                self.encode_text(negative_ids, normalize=True, text_mask=negative_mask)
                if negative_ids is not None
                else None
            ),
        )

    def start_decoding(self, image_tokens: Tensor, total_len: int) -> DecodingCache:
        """Return empty KV caches plus each decoder layer's image latent for up to total_len text tokens."""
        return DecodingCache(
            encoder=self.encoder.new_caches(),
            decoder=self.decoder.new_caches(),
            contexts=self.decoder.encode_contexts(image_tokens),
            total_len=total_len,
        )

    def decode_step(self, ids: Tensor, cache: DecodingCache) -> Tensor:
        """Feed new tokens (B, t) through the cached encoder text blocks and decoder; return logits (B, t, V)."""
        start = cache.length
        if start + ids.shape[1] > cache.total_len:
            raise ValueError(f"decoding past total_len={cache.total_len}: {start} cached + {ids.shape[1]} new tokens")
        states = self.encoder.encode_text(
            ids, start=start, total_len=cache.total_len, caches=cache.encoder, absorbed=True
        ).tokens  # (B, t, C)
        logits = self._decode(
            states, start=start, total_len=cache.total_len, contexts=cache.contexts, caches=cache.decoder, absorbed=True
        )
        cache.length += ids.shape[1]
        return logits

    def _special_id(self, name: str, value: int | None) -> int:
        """Return value, or the tokenizer's id of that name when value is None."""
        if value is not None:
            return value
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer attached: pass {name}= or set model.tokenizer")
        return getattr(self.tokenizer, name)

    def _decoding_settings(self, max_new_tokens: int | None, num_beams: int | None, top_p: float | None):
        """Fill unset decoding settings from config.eval and check them."""
        ev = self.config.eval
        max_new_tokens = ev.max_new_tokens if max_new_tokens is None else max_new_tokens
        num_beams = ev.num_beams if num_beams is None else num_beams
        top_p = ev.top_p if top_p is None else top_p
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS or not 1 <= num_beams <= MAX_BEAMS or not 0.0 <= top_p <= 1.0:
            raise ValueError(
                f"need 1 <= max_new_tokens <= {MAX_NEW_TOKENS}, 1 <= num_beams <= {MAX_BEAMS}, 0 <= top_p <= 1; "
                f"got {max_new_tokens}, {num_beams}, {top_p}"
            )
        if num_beams > 1 and top_p > 0:
            raise ValueError(
                f"choose beam search (num_beams={num_beams}) or nucleus sampling (top_p={top_p}), not both"
            )
        return max_new_tokens, num_beams, top_p

    @torch.no_grad()
    def generate_ids(
        self,
        images: Tensor,
        prompt_ids: list[list[int]] | None = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """Return generated token ids per image (EOS dropped), continuing prompt_ids (default: [BOS]).

        Greedy by default; ``num_beams > 1`` runs beam search and ``top_p > 0`` nucleus sampling (seeded by
        ``generator``). Unset settings come from ``config.eval``. ``use_cache=False`` recomputes a full forward per
        step (the reference the cached path must match). ``min_new_tokens`` forbids EOS before that many new tokens.
        """
        max_new_tokens, num_beams, top_p = self._decoding_settings(max_new_tokens, num_beams, top_p)
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens={min_new_tokens} must lie in [0, max_new_tokens={max_new_tokens}]")
        if prompt_ids is None:
            prompt_ids = [[self._special_id("bos_id", None)]] * images.shape[0]
        if len(prompt_ids) != images.shape[0] or any(len(p) == 0 for p in prompt_ids):
            raise ValueError(
                f"need one non-empty prompt per image: {images.shape[0]} images, {len(prompt_ids)} prompts"
            )
        image_tokens = self.encoder.encode_image(images.to(self.device)).tokens  # (B, N, C)
        return generate_from_prompts(
            self,
            image_tokens,
            [list(p) for p in prompt_ids],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            top_p=top_p,
            eos_id=self._special_id("eos_id", eos_id),
            generator=generator,
            use_cache=use_cache,
            min_new_tokens=min_new_tokens,
        )

    def _prompt_ids(self, prompt: str | list[str] | None, batch: int) -> list[list[int]]:
        """Tokenise text prompts as BOS + tokens (no EOS, so decoding continues them)."""
        if self.tokenizer is None:
            raise ValueError("generate() needs model.tokenizer; set it or call generate_ids() with token ids")
        if prompt is None:
            return [[self.tokenizer.bos_id]] * batch
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images")
        return [self.tokenizer.encode(text, eos=False) for text in prompts]

    def generate(
        self,
        images: Tensor,
        prompt: str | list[str] | None = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        min_new_tokens: int = 0,
    ) -> list[str]:
        """Caption images (B, 3, H, W), or continue text prompts; returns the decoded new text per image."""
        prompt_ids = self._prompt_ids(prompt, images.shape[0])
        ids = self.generate_ids(
            images,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            top_p=top_p,
            generator=generator,
            min_new_tokens=min_new_tokens,
        )
        return [self.tokenizer.decode(seq).strip() for seq in ids]

    def answer(self, images: Tensor, questions: list[str], **generate_kwargs) -> list[str]:
        """Answer one question per image (VQA) by continuing the prompt ``question: <q> answer:``."""
        if len(questions) != images.shape[0]:
            raise ValueError(f"got {len(questions)} questions for {images.shape[0]} images")
        prompts = [vqa_prompt(q.strip()) for q in questions]
        return self.generate(images, prompts, **generate_kwargs)

    @torch.no_grad()
    def kv_cache_bytes(self) -> dict[str, int]:
        """Measure decoding cache sizes in the model's dtype: bytes per generated token and per image.

        Keys: ``encoder`` and ``decoder`` (self-attention caches, per token, all layers), ``per_token`` (their sum)
        and ``per_image`` (the cross-attention image latents, computed once per image).
        """
        n_patches = self.encoder.grid[0] * self.encoder.grid[1]
        dtype = self.logit_scale.dtype
        image_tokens = torch.zeros(1, n_patches, self.config.model.dim, device=self.device, dtype=dtype)
        cache = self.start_decoding(image_tokens, total_len=1)
        self.decode_step(torch.zeros(1, 1, dtype=torch.long, device=self.device), cache)
        encoder = sum(c.bytes_per_token() for c in cache.encoder)
        decoder = sum(c.bytes_per_token() for c in cache.decoder)
        per_image = sum(c.bytes_per_token() * c.length for c in cache.contexts)
        return {"encoder": encoder, "decoder": decoder, "per_token": encoder + decoder, "per_image": per_image}

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write model.safetensors (tied weights stored once), config.json and tokenizer.json when set."""
        save_model(self, str(save_directory / constants.SAFETENSORS_SINGLE_FILE), metadata={"format": "pt"})
        (save_directory / constants.CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save(save_directory / TOKENIZER_FILE)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: Config | dict | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> MLMModel:
        """Build the model from config.json, load model.safetensors and, when present, tokenizer.json."""
        hub_kwargs = dict(
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        if config is None:
            config = read_config(Path(resolve_file(model_id, constants.CONFIG_NAME, hub_kwargs)))
        elif not isinstance(config, Config):
            where = Path(model_id) / constants.CONFIG_NAME if os.path.isdir(model_id) else f"{model_id} config"
            try:
                config = config_from_dict(config)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        tokenizer = model_kwargs.pop("tokenizer", None)
        tokenizer_file = resolve_file(model_id, TOKENIZER_FILE, hub_kwargs, required=False)
        if tokenizer is None and tokenizer_file is not None:
            tokenizer = MLMTokenizer.from_file(tokenizer_file)
        model = cls(config, tokenizer=tokenizer, **model_kwargs)
        weights = resolve_file(model_id, constants.SAFETENSORS_SINGLE_FILE, hub_kwargs)
        load_weights(model, weights, strict=strict, device=str(map_location))
        model.eval()
        logger.debug("loaded %s from %s", cls.__name__, model_id)
        return model
