"""The peer in our benchmarks: open_clip's own ``CoCa`` class (Yu et al., 2022) built at our model's widths.

Same width, heads, depth (vision and text towers as deep as our shared encoder, the multimodal decoder as deep as
ours), patch size, image size, text length, vocabulary and pad id; trained with open_clip's ``CoCaLoss`` on the same
batches (a VQA record is a caption ``question: … answer: …`` to it). :class:`CoCaAdapter` gives it the few methods
our evaluation code calls (``encode_image``, ``encode_text``, ``generate``), so both models are scored by one code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlm.config import ModelConfig


def build_coca(cfg: ModelConfig, vocab_size: int, pad_id: int) -> nn.Module:
    """open_clip ``CoCa`` with the widths of our model config (attentional pooling as in open_clip's CoCa configs)."""
    from open_clip.coca_model import CoCa

    heads = cfg.mla.n_heads
    text = {"context_length": cfg.max_text_len, "vocab_size": vocab_size, "width": cfg.dim, "heads": heads,
            "layers": cfg.n_layers, "mlp_ratio": cfg.mlp_ratio, "embed_cls": True, "output_tokens": True,
            "pad_id": pad_id}  # fmt: skip
    vision = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.dim, "layers": cfg.n_layers,
              "head_width": cfg.dim // heads, "mlp_ratio": cfg.mlp_ratio, "attentional_pool": True,
              "attn_pooler_heads": heads, "output_tokens": True}  # fmt: skip
    multimodal = {"context_length": cfg.max_text_len, "vocab_size": vocab_size, "width": cfg.dim, "heads": heads,
                  "layers": cfg.decoder_layers, "mlp_ratio": cfg.mlp_ratio, "attn_pooler_heads": heads}  # fmt: skip
    coca = CoCa(cfg.embed_dim, multimodal, text, vision, pad_id=pad_id)
    # open_clip creates the decoder's output projection with torch.empty and never runs the init that would fill it
    # (MultimodalTransformer.init_parameters is not called), so it holds whatever memory held: NaN at times.
    nn.init.normal_(coca.text_decoder.text_projection, std=cfg.dim**-0.5)
    return coca


class CoCaTrainer:
    """One optimizer step of CoCa on one of our batches: open_clip's CoCaLoss (contrastive + 2 x caption CE)."""

    def __init__(self, model: nn.Module, pad_id: int, lr: float, weight_decay: float = 0.05):
        from open_clip.loss import CoCaLoss

        self.model, self.pad_id = model, pad_id
        self.loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=pad_id)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self, batch: dict) -> float:
        """Forward, backward and AdamW on one batch; returns the total loss."""
        self.model.train()
        out = self.model(batch["images"], batch["text_ids"])
        contrastive, caption = self.loss(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
        )
        total = contrastive + caption
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return float(total.detach())


class CoCaAdapter(nn.Module):
    """Our evaluation interface on a CoCa: embeddings from its towers, greedy captions from its decoder."""

    def __init__(self, coca: nn.Module, config: ModelConfig, tokenizer, generation_config):
        super().__init__()
        self.coca, self.config, self.tokenizer = coca, config, tokenizer
        self.generation_config = generation_config

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.coca.parameters()).device

    @torch.no_grad()
    def encode_image(self, pixels: Tensor, normalize: bool = False) -> Tensor:
        """Image embeddings (B, E), L2-normalised when ``normalize`` (our model's signature)."""
        return self.coca.encode_image(pixels.to(self.device), normalize=normalize)

    @torch.no_grad()
    def encode_text(self, ids: Tensor, normalize: bool = False, text_mask: Tensor | None = None) -> Tensor:
        """Text embeddings (B, E) of right-padded ids (pads are CoCa's pad_id already), as our model's signature."""
        return self.coca.encode_text(ids.to(self.device), normalize=normalize)

    @torch.no_grad()
    def generate(self, pixels: Tensor, max_new_tokens: int | None = None, **_: object) -> list[str]:
        """Greedy captions, decoded with our tokenizer: a full forward per step through CoCa's own towers
        (open_clip's ``CoCa.generate`` imports transformers' ``BeamSearchScorer``, which transformers 5 removed)."""
        tok = self.tokenizer
        steps = max_new_tokens or self.generation_config.max_new_tokens
        steps = min(steps, self.config.max_text_len - 1)
        _, image_embs = self.coca._encode_image(pixels.to(self.device))
        ids = torch.full((pixels.shape[0], 1), tok.bos_id, dtype=torch.long, device=self.device)  # (B, 1)
        done = torch.zeros(pixels.shape[0], dtype=torch.bool, device=self.device)
        for _ in range(steps):
            _, token_embs = self.coca._encode_text(ids)
            logits = self.coca.text_decoder(image_embs, token_embs[:, : ids.shape[1]])[:, -1]  # (B, V)
            nxt = logits.argmax(-1).masked_fill(done, tok.pad_id)  # (B,)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == tok.eos_id
            if bool(done.all()):
                break
        return [tok.decode(row[1:]) for row in ids.cpu()]
