"""MLMModel: shared-weight MLA encoder, hierarchical pooling, multimodal decoder, generation and save/load.

One forward pass gives everything CoCa-style training (Yu et al., 2022) needs: L2-normalised image and text
embeddings with a learned logit scale (CLIP, Radford et al., 2021) and logit bias (SigLIP, Zhai et al., 2023) for
the contrastive loss, and LM logits for the caption / answer loss. The model takes its own settings only (a
:class:`~mlm.config.ModelConfig`, as nanoGPT's ``GPT(GPTConfig)``); decoding settings are a
:class:`~mlm.generation.DecodingConfig` (transformers' ``GenerationConfig`` in small). A checkpoint is a folder with
config.json (the model settings), generation_config.json (the decoding defaults), model.safetensors and, when a
tokenizer is attached, tokenizer.json, written and read through huggingface_hub's ``PyTorchModelHubMixin``; the
run's own config stays in the run folder, and nothing is ever unpickled. Checkpoints whose config.json holds a whole
run config (written before) load as well.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, constants
from safetensors.torch import save_file, save_model
from torch import Tensor, nn

from mlm import model_files
from mlm.compress import int8
from mlm.config import Config, ModelConfig
from mlm.data.tokenizer import MLMTokenizer, vqa_prompt
from mlm.encoders.early_exit import EarlyExit
from mlm.encoders.pooling import POOLING, WordHead
from mlm.encoders.shared import EncoderOutput, SharedEncoder
from mlm.fusion.decoder import MultimodalDecoder
from mlm.fusion.length_groups import length_groups, merge_rows
from mlm.fusion.matching import MatchHead, match_logits
from mlm.generation import DecodingCache, DecodingConfig, cache_bytes, generate_from_prompts
from mlm.layers.init import init_linears
from mlm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_state_dict, has_lora, load_adapter, save_adapter
from mlm.model_files import config_json, model_config, read_config, read_decoding, resolve_file
from mlm.model_outputs import Features, MLMOutput, check_text_mask, unique_images

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"


class MLMModel(nn.Module, PyTorchModelHubMixin, library_name="mlm", tags=["vision-language", "mla", "coca"]):
    """Shared-weight vision-language model: contrastive embeddings, captioning and VQA from one encoder."""

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: MLMTokenizer | None = None,
        generation_config: DecodingConfig | None = None,
    ):
        super().__init__()
        if isinstance(config, Config):
            raise TypeError("MLMModel takes the model's own settings: pass config.model (a ModelConfig)")
        if not isinstance(config, ModelConfig):
            raise TypeError(f"MLMModel needs a mlm.config.ModelConfig, got {type(config).__name__}")
        self.config = config
        self.generation_config = generation_config or DecodingConfig()
        m = config
        self.encoder = SharedEncoder(m)
        self.pooler = POOLING[m.pooling](m.dim, m.levels, m.pool_hidden_dim, m.embed_dim, m.level_weight_init)
        self.decoder = MultimodalDecoder(m, self.encoder.token_embed)
        # SuperClass (Huang et al., 2024): the pooled image classifies the words of its caption
        self.word_head = WordHead(m.embed_dim, m.vocab_size, m.word_head_patches) if m.word_head else None
        self.match_head = MatchHead(m.dim) if m.match_head else None  # ALBEF/BLIP's image-text matching
        self.early_exit = EarlyExit(m.dim, m.n_layers, m.exit_lens) if m.early_exit else None  # halting gates (images)
        self.exit_threshold: float | None = None  # set_exit_threshold: images stop at a confident exit
        # one-element vectors, not scalars: FSDP2 cannot shard a 0-d parameter; forward returns them as scalars
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))
        if m.init_std:
            init_linears(self, m.init_std)
        self._register_load_state_dict_pre_hook(model_files.scalar_logits_as_vectors)
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: MLMTokenizer) -> None:
        """Attach the tokenizer used by generate() and saved beside the weights."""
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={self.config.vocab_size}"
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

    def set_exit_threshold(self, threshold: float | None) -> None:
        """Let each image stop at its first exit whose predicted agreement is >= threshold (None: every block)."""
        if threshold is not None and self.early_exit is None:
            raise ValueError("--exit-threshold: this model has no exits (train it with model.early_exit: true)")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--exit-threshold {threshold}: an agreement threshold is in [0, 1]")
        self.exit_threshold = threshold

    def image_features(self, images: Tensor) -> Features:
        """Encode images (B, 3, H, W) into embeddings, the patch states the decoder reads and pooling weights."""
        exits = None
        if self.early_exit is not None and self.training:  # every exit, for the exit objectives
            out, *exits = self.early_exit.training_pass(self.encoder, self.pooler, images)
        elif self.early_exit is not None and self.exit_threshold is not None:
            out = self.early_exit.adaptive_pass(self.encoder, self.pooler, images, self.exit_threshold)
        else:
            out = self.encoder.encode_image(images)
        pooled = self.pooler(out.levels)
        tokens = out.levels[self.config.cross_level] if self.config.cross_level else out.tokens  # model.cross_level
        return Features(pooled.embeds, tokens, pooled.weights, pooled.projected, exits=exits)

    def text_features(self, text_ids: Tensor, text_mask: Tensor | None = None) -> Features:
        """Encode right-padded token ids (B, T) into embeddings, causal token states and pooling weights."""
        mask = check_text_mask(text_ids, text_mask)
        out = self.encoder.encode_text(text_ids)
        pooled = self.pooler(out.levels, mask)
        return Features(pooled.embeds, out.tokens, pooled.weights, pooled.projected, mask)

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

    def word_maps(self, image_tokens: Tensor) -> Tensor | None:
        """log p(word | patch) (B, N, V) of image tokens from the per-patch word head, for the decoder's word
        grounding (``model.decoder_grounding``; None without it). No gradient: the word objective trains them."""
        if self.decoder.grounding is None:
            return None
        with torch.no_grad():
            return self.word_head(self.pooler.proj(image_tokens)).float().log_softmax(dim=-1)

    def text_logits(self, image_tokens: Tensor, text_ids: Tensor) -> Tensor:
        """Return LM logits (B, T, V) for token ids (B, T) given image tokens (B, N, C); full forward, no cache."""
        states = self.encoder.encode_text(text_ids).tokens  # (B, T, C)
        return self._decode(
            states, start=0, total_len=text_ids.shape[1], context=image_tokens, ids=text_ids,
            word_logprobs=self.word_maps(image_tokens),
        )  # fmt: skip

    def _text_pass(self, text_ids: Tensor, mask: Tensor, image_tokens: Tensor) -> tuple[EncoderOutput, Tensor, Tensor]:
        """(text encoder output, decoder states (B, T, C), LM logits (B, T, V)) of a batch: one causal pass feeds
        pooling and the decoder. In training, rows of very different lengths run as two groups, each cut to its
        longest row (:mod:`mlm.fusion.length_groups`); states past a row's end are then zeros, which pooling and
        losses skip."""
        T = text_ids.shape[1]
        groups = length_groups(mask) if self.training else None  # inference keeps every position's logits
        maps = self.word_maps(image_tokens)
        if groups is None:
            out = self.encoder.encode_text(text_ids)
            states = self._decode(
                out.tokens, start=0, total_len=T, context=image_tokens, hidden=True, ids=text_ids, word_logprobs=maps
            )
            return out, states, self.decoder.lm_head(states)
        outs, states, logits = [], [], []
        for rows, length in groups:
            ids = text_ids[rows, :length]
            out = self.encoder.encode_text(ids)
            hidden = self._decode(
                out.tokens, start=0, total_len=length, context=image_tokens[rows], hidden=True, ids=ids,
                word_logprobs=None if maps is None else maps[rows],
            )  # fmt: skip
            outs.append(out)
            states.append(hidden)
            logits.append(self.decoder.lm_head(hidden))
        levels = {name: merge_rows([o.levels[name] for o in outs], groups, T) for name in outs[0].levels}
        text_out = EncoderOutput(tokens=merge_rows([o.tokens for o in outs], groups, T), levels=levels)
        return text_out, merge_rows(states, groups, T), merge_rows(logits, groups, T)

    def forward(
        self,
        images: Tensor,
        text_ids: Tensor,
        text_mask: Tensor | None = None,
        negative_ids: Tensor | None = None,
        negative_mask: Tensor | None = None,
        match: dict | None = None,
    ) -> MLMOutput:
        """Return image/text embeddings, logit scale and bias, and LM logits for a batch of image-text pairs;
        negative_ids (M, T') are extra captions for the contrastive loss; with ``model.match_head``, ``match``
        (``rows``, ``groups``, ``negative_owner``; :func:`mlm.fusion.matching.match_logits`) adds matching logits."""
        distinct, rows = unique_images(images)  # an image in two rows (caption and VQA) is encoded once
        image = self.image_features(distinct)
        word_logits = None if self.word_head is None else self.word_head.logits(image, self.pooler.proj)
        if rows is not None:
            image = image.take(rows)
            word_logits = None if word_logits is None else word_logits[rows]
        mask = check_text_mask(text_ids, text_mask)
        text_out, states, logits = self._text_pass(text_ids, mask, image.tokens)
        text = self.pooler(text_out.levels, mask)
        negatives = None if negative_ids is None else self.text_features(negative_ids, negative_mask)
        matched = (None, None)
        if self.match_head is not None and match is not None:
            matched = match_logits(self, image, text, text_out.tokens, states, mask, negatives, **match)
        return MLMOutput(
            image_embeds=image.embeds,
            text_embeds=text.embeds,
            logit_scale=self.logit_scale.exp().clamp(max=100.0).squeeze(0),
            logit_bias=self.logit_bias.squeeze(0),
            logits=logits,
            image_tokens=image.tokens,
            word_logits=word_logits,
            negative_embeds=None if negatives is None else negatives.embeds,
            match_logits=matched[0],
            match_labels=matched[1],
            **dict(zip(("exit_embeds", "exit_logits", "exit_lens"), image.exits or (), strict=False)),
        )

    def start_decoding(self, image_tokens: Tensor, total_len: int) -> DecodingCache:
        """Return empty KV caches plus each decoder layer's image latent for up to total_len text tokens."""
        return DecodingCache(
            encoder=self.encoder.new_caches(),
            decoder=self.decoder.new_caches(image_tokens, self.word_maps(image_tokens)),
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
            states, start=start, total_len=cache.total_len, contexts=cache.contexts, caches=cache.decoder,
            absorbed=True, ids=ids,
        )  # fmt: skip
        cache.length += ids.shape[1]
        return logits

    def _special_id(self, name: str, value: int | None) -> int:
        """Return value, or the tokenizer's id of that name when value is None."""
        if value is not None:
            return value
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer attached: pass {name}= or set model.tokenizer")
        return getattr(self.tokenizer, name)

    @torch.no_grad()
    def generate_ids(
        self,
        images: Tensor,
        prompt_ids: list[list[int]] | None = None,
        *,
        decoding: DecodingConfig | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        top_p: float | None = None,
        min_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Return generated token ids per image (EOS dropped), continuing prompt_ids (default: [BOS]).

        Settings come from ``decoding`` (default: ``self.generation_config``, the checkpoint's saved defaults), each
        keyword that is not None replacing its value: greedy by default, ``num_beams > 1`` beam search, ``top_p > 0``
        nucleus sampling (seeded by ``generator``), ``min_new_tokens`` forbids EOS before that many new tokens.
        ``use_cache=False`` recomputes a full forward per step (the reference the cached path must match).
        """
        settings = (decoding or self.generation_config).update(
            max_new_tokens=max_new_tokens, num_beams=num_beams, top_p=top_p, min_new_tokens=min_new_tokens
        )
        if prompt_ids is None:
            prompt_ids = [[self._special_id("bos_id", None)]] * images.shape[0]
        if len(prompt_ids) != images.shape[0] or any(len(p) == 0 for p in prompt_ids):
            raise ValueError(
                f"need one non-empty prompt per image: {images.shape[0]} images, {len(prompt_ids)} prompts"
            )
        image_tokens = self.image_features(images.to(self.device)).tokens  # (B, N, C); early exit applies
        return generate_from_prompts(
            self,
            image_tokens,
            [list(p) for p in prompt_ids],
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            top_p=settings.top_p,
            eos_id=self._special_id("eos_id", eos_id),
            generator=generator,
            use_cache=use_cache,
            min_new_tokens=settings.min_new_tokens,
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
        decoding: DecodingConfig | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        top_p: float | None = None,
        min_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Caption images (B, 3, H, W), or continue text prompts; returns the decoded new text per image (settings as
        in :meth:`generate_ids`)."""
        prompt_ids = self._prompt_ids(prompt, images.shape[0])
        ids = self.generate_ids(
            images,
            prompt_ids,
            decoding=decoding,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            top_p=top_p,
            min_new_tokens=min_new_tokens,
            generator=generator,
        )
        return [self.tokenizer.decode(seq).strip() for seq in ids]

    def answer(self, images: Tensor, questions: list[str], **generate_kwargs) -> list[str]:
        """Answer one question per image (VQA) by continuing the prompt (``model.vqa_prompt``)."""
        if len(questions) != images.shape[0]:
            raise ValueError(f"got {len(questions)} questions for {images.shape[0]} images")
        prompts = [vqa_prompt(q.strip(), self.config.vqa_prompt) for q in questions]
        return self.generate(images, prompts, **generate_kwargs)

    def kv_cache_bytes(self) -> dict[str, int]:
        """Decoding cache sizes in the model's dtype (see :func:`mlm.generation.cache_bytes`)."""
        return cache_bytes(self)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write model.safetensors (tied weights stored once), config.json, generation_config.json, tokenizer.json
        when set, and LoRA adapters in PEFT's files (the base weights keep their names)."""
        weights = str(save_directory / constants.SAFETENSORS_SINGLE_FILE)
        if int8.is_quantized(self):
            int8.save_int8(self, save_directory, weights)
        elif has_lora(self):
            save_file(base_state_dict(self), weights, metadata={"format": "pt"})
            save_adapter(self, save_directory)
        else:
            save_model(self, weights, metadata={"format": "pt"})
        (save_directory / constants.CONFIG_NAME).write_text(json.dumps(config_json(self.config), indent=2))
        (save_directory / GENERATION_FILE).write_text(json.dumps(self.generation_config.to_dict(), indent=2))
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
        config: ModelConfig | dict | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> MLMModel:
        """Build the model from config.json (or ``config``), load model.safetensors and, when present,
        generation_config.json and tokenizer.json."""
        hub_kwargs = dict(
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        config_file = resolve_file(model_id, constants.CONFIG_NAME, hub_kwargs, required=config is None)
        if config is None:
            config = read_config(config_file)
        else:
            where = Path(model_id) / constants.CONFIG_NAME if os.path.isdir(model_id) else f"{model_id} config"
            config = model_config(config.model if isinstance(config, Config) else config, str(where))
        generation_file = resolve_file(model_id, GENERATION_FILE, hub_kwargs, required=False)
        if "generation_config" not in model_kwargs and (config_file or generation_file):
            model_kwargs["generation_config"] = read_decoding(config_file, generation_file)
        tokenizer = model_kwargs.pop("tokenizer", None)
        tokenizer_file = resolve_file(model_id, TOKENIZER_FILE, hub_kwargs, required=False)
        if tokenizer is None and tokenizer_file is not None:
            tokenizer = MLMTokenizer.from_file(tokenizer_file)
        model = cls(config, tokenizer=tokenizer, **model_kwargs)
        model_files.load_model_weights(model, model_id, hub_kwargs, strict, str(map_location))
        adapter = resolve_file(model_id, ADAPTER_CONFIG, hub_kwargs, required=False)
        if adapter is not None:
            load_adapter(model, adapter, resolve_file(model_id, ADAPTER_WEIGHTS, hub_kwargs))
        model.eval()
        logger.debug("loaded %s from %s", cls.__name__, model_id)
        return model
