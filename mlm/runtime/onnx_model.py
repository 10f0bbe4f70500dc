"""An exported model run by ONNX Runtime (``mlm caption --runtime onnx``): embeddings and generation, no PyTorch
weights.

Decoding reuses :func:`mlm.generation.generate_from_prompts` (greedy, beam search, nucleus sampling, minimum length)
through an :class:`OnnxSession`, which holds the fixed-length caches of the step graph as arrays and feeds prompts one
token at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mlm.generation import DecodingConfig, generate_from_prompts
from mlm.runtime.onnx_export import FORMAT, MANIFEST, batch_axis, cache_inputs, graph_names


def is_onnx_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``mlm export onnx``."""
    return (Path(path) / MANIFEST).is_file()


class OnnxSession:
    """Incremental decoding over the step graph for a batch of rows (the generation session protocol)."""

    def __init__(self, model: OnnxModel, contexts: dict[str, np.ndarray], total_len: int):
        if total_len > model.total_len:
            raise ValueError(
                f"this decoding needs {total_len} tokens but the graphs were exported for {model.total_len} "
                "(mlm export onnx --max-len)"
            )
        self.model, self.contexts, self.position = model, dict(contexts), 0
        self.caches = model.empty_caches(contexts["context_0"].shape[1])

    def step(self, ids: Tensor) -> Tensor:
        """Feed new tokens (B, t) one at a time; return the next-token logits (B, V)."""
        names = self.model.names["decoder_step"][0]
        for j in range(ids.shape[1]):
            feed = {"ids": ids[:, j : j + 1].numpy().astype(np.int64), "position": np.array(self.position, np.int64)}
            feed.update(self.caches)
            feed.update(self.contexts)
            logits, *updated = self.model.sessions["decoder_step"].run(None, {n: feed[n] for n in names})
            self.caches = dict(zip(self.caches, updated, strict=True))
            self.position += 1
        return torch.from_numpy(logits)

    def _rows(self, pick) -> None:
        self.caches = {name: pick(array, batch_axis(name)) for name, array in self.caches.items()}
        self.contexts = {name: pick(array, batch_axis(name)) for name, array in self.contexts.items()}

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows index in that order."""
        self._rows(lambda a, axis: np.take(a, index.numpy(), axis=axis))

    def expand(self, n: int) -> None:
        """Repeat every batch row n times."""
        self._rows(lambda a, axis: np.repeat(a, n, axis=axis))


class OnnxModel:
    """The three graphs of an exported folder with the model's config, decoding defaults and tokenizer."""

    device = torch.device("cpu")
    training = False  # evaluation code switches models to eval mode and back

    def eval(self) -> OnnxModel:
        """No-op (graphs have no training mode); returns self."""
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        """Graphs only run inference: refuses ``mode=True``; returns self."""
        if mode:
            raise ValueError("an ONNX export runs inference only")
        return self

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime

        from mlm.data.tokenizer import MLMTokenizer
        from mlm.model_files import read_config, read_decoding, read_json_object

        folder = Path(folder)
        manifest = read_json_object(folder / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{folder / MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        self.total_len, self.fingerprint = int(manifest["total_len"]), manifest["fingerprint"]
        self.config = read_config(folder / "config.json")
        self.generation_config = read_decoding(folder / "config.json", folder / "generation_config.json")
        tokenizer = folder / "tokenizer.json"
        self.tokenizer = MLMTokenizer.from_file(tokenizer) if tokenizer.is_file() else None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions, self.names = {}, graph_names(self.config)
        for name, (inputs, _) in self.names.items():
            path = folder / f"{name}.onnx"
            if not path.is_file():
                raise ValueError(f"{path}: missing (re-run mlm export onnx)")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            stamp = session.get_modelmeta().custom_metadata_map.get("mlm_fingerprint")
            if stamp != self.fingerprint:
                raise ValueError(f"{path}: made from another model (fingerprint {stamp}, {MANIFEST} says "
                                 f"{self.fingerprint})")  # fmt: skip
            got = [i.name for i in session.get_inputs()]
            if got != inputs:
                raise ValueError(f"{path}: inputs {got}, expected {inputs}")
            self.sessions[name] = session

    def empty_caches(self, batch: int) -> dict[str, np.ndarray]:
        """Zero self-attention caches of the step graph for a batch."""
        shapes = {i.name: i.shape for i in self.sessions["decoder_step"].get_inputs()}
        return {name: np.zeros([batch if isinstance(d, str) else d for d in shapes[name]], np.float32)
                for name in cache_inputs(self.config)}  # fmt: skip

    def _image(self, images: Tensor) -> list[np.ndarray]:
        return self.sessions["image"].run(None, {"images": images.float().numpy()})

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """L2-normalised image embeddings (B, E) (the graph holds the normalised ones only)."""
        if not normalize:
            raise ValueError("the ONNX image graph returns L2-normalised embeddings only (normalize=True)")
        return torch.from_numpy(self._image(images)[0])

    def encode_text(self, text_ids: Tensor, normalize: bool = True, text_mask: Tensor | None = None) -> Tensor:
        """L2-normalised text embeddings (B, E) of right-padded ids (B, T <= model.max_text_len)."""
        if not normalize:
            raise ValueError("the ONNX text graph returns L2-normalised embeddings only (normalize=True)")
        if text_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"texts of {text_ids.shape[1]} tokens; the graph takes at most {self.config.max_text_len}")
        if text_mask is None:
            text_mask = text_ids != self.tokenizer.pad_id
        feed = {"text_ids": text_ids.numpy().astype(np.int64), "text_mask": text_mask.numpy().astype(bool)}
        return torch.from_numpy(self.sessions["text"].run(None, feed)[0])

    def generate(
        self, images: Tensor, prompt=None, *, decoding: DecodingConfig | None = None, generator=None, **overrides
    ) -> list[str]:
        """Caption images (B, 3, H, W) or continue prompts, as :meth:`MLMModel.generate` does (``overrides``:
        max_new_tokens, num_beams, top_p, min_new_tokens)."""
        if self.tokenizer is None:
            raise ValueError("this export has no tokenizer.json; generation needs the model's tokenizer")
        settings = (decoding or self.generation_config).update(**overrides)
        prompts = [prompt] * images.shape[0] if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        ids = [[self.tokenizer.bos_id] if p is None else self.tokenizer.encode(p, eos=False) for p in prompts]
        _, *outputs = self._image(images)
        contexts = dict(zip(self.names["image"][1][1:], outputs, strict=True))  # cross-attention caches, grounding

        def session(rows: Tensor, total_len: int) -> OnnxSession:
            index = rows.numpy()
            picked = {name: np.take(array, index, axis=batch_axis(name)) for name, array in contexts.items()}
            return OnnxSession(self, picked, total_len)

        out = generate_from_prompts(
            None, torch.zeros(images.shape[0], 0), ids, max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams, top_p=settings.top_p, eos_id=self.tokenizer.eos_id, generator=generator,
            min_new_tokens=settings.min_new_tokens, session_factory=session,
        )  # fmt: skip
        return [self.tokenizer.decode(seq).strip() for seq in out]

    def answer(self, images: Tensor, questions: list[str], **generate_kwargs) -> list[str]:
        """Answer one question per image by continuing ``question: <q> answer:``, as :meth:`MLMModel.answer`."""
        from mlm.data.tokenizer import vqa_prompt

        if len(questions) != images.shape[0]:
            raise ValueError(f"got {len(questions)} questions for {images.shape[0]} images")
        prompts = [vqa_prompt(q.strip(), self.config.vqa_prompt) for q in questions]
        return self.generate(images, prompts, **generate_kwargs)


def load_onnx_model(folder: str | Path, threads: int = 0) -> OnnxModel:
    """Load an ``mlm export onnx`` folder; a missing or foreign graph is named in the ValueError."""
    folder = Path(folder)
    if not is_onnx_folder(folder):
        raise ValueError(f"{folder}: not an ONNX export (no {MANIFEST}; make one with mlm export onnx)")
    try:
        return OnnxModel(folder, threads)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / MANIFEST}: unreadable ({err})") from err
