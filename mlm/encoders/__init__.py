"""The shared-weight encoder: patch and token embeddings, modality embedding, and blocks shared by both modalities."""

from mlm.encoders.block import EncoderBlock
from mlm.encoders.shared import EncoderOutput, SharedEncoder
from mlm.encoders.sharing import MODALITIES, ModalityEmbedding, PerModality

__all__ = ["MODALITIES", "EncoderBlock", "EncoderOutput", "ModalityEmbedding", "PerModality", "SharedEncoder"]
