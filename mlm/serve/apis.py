"""The model behind ``mlm serve``: one LitServe ``LitAPI`` per endpoint, each batching its concurrent requests.

LitServe collects up to ``max_batch_size`` requests within ``batch_timeout`` and hands them to ``predict`` together.
Captions and answers of a batch run as one generation call per decoding setting: the image latents of the
cross-attention are computed once per image, prompts of different lengths decode in groups of equal length (so no
sequence holds padding), and each request stops at its own EOS and its own ``max_new_tokens`` (greedy decoding is
cut per request; beam search and sampling group requests with equal settings). Embeddings batch per modality.

A request whose image does not decode, or whose question is too long for the model, becomes an :class:`ItemError`
in ``decode_request``; LitServe would fail the whole batch on an exception there, so nothing is raised: the error
travels through ``predict`` untouched and ``encode_response`` turns it into that request's own 4xx response.
"""

from __future__ import annotations

import base64
import logging
import time
from abc import abstractmethod
from dataclasses import dataclass
from itertools import groupby
from queue import Empty

import litserve as ls
import torch
from fastapi.responses import JSONResponse
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

logger = logging.getLogger(__name__)

MAX_PIXELS = 12_000_000  # per image: the model sees 60-448 px, and decoding bigger ones stalls a whole batch
MAX_REQUEST_PIXELS = 48_000_000  # all images of one /v1/embed request together


@dataclass
class ItemError:
    """One request that fails on its own: HTTP status, field and reason."""

    status: int
    field: str
    reason: str


class WaitingBatchLoop(BatchedLoop):
    """LitServe's batched loop, but an idle worker sleeps on its queue until a request comes, then waits up to
    ``batch_timeout`` for more: LitServe's own collector polls the queue every millisecond, which on a small machine
    takes the CPU the model needs (measured: +29 ms on a single caption request with three idle endpoints)."""

    IDLE_WAKE_S = 1.0  # an idle worker looks at its queue this often (it still sees a stop request)

    def get_batch_requests(self, lit_api, request_queue, transport) -> tuple[list, list]:
        """Up to ``max_batch_size`` requests: the first one blocking, the rest until the batch's wait is over."""
        payloads, timed_out = [], []
        deadline = None
        while len(payloads) < lit_api.max_batch_size:
            wait = self.IDLE_WAKE_S if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                item = request_queue.get(timeout=wait)
            except Empty:
                if deadline is None:
                    return [], []
                break
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            queue_id, uid, timestamp, payload = item
            deadline = deadline or time.monotonic() + lit_api.batch_timeout
            kind = LoopResponseType.REGULAR
            self.put_response(transport, queue_id, uid, (), LitAPIStatus.START, kind)
            if lit_api.request_timeout not in (-1, False) and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((queue_id, uid))
            else:
                payloads.append((queue_id, uid, payload))
        return payloads, timed_out


class _ModelAPI(ls.LitAPI):
    """Loads the checkpoint in each worker; decodes images; answers errors item by item."""

    def __init__(self, checkpoint: str, api_path: str, max_batch_size: int, batch_timeout: float, threads: int = 0):
        loop = WaitingBatchLoop() if max_batch_size > 1 else "auto"
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path, loop=loop)
        self.checkpoint, self.threads = checkpoint, threads

    def setup(self, device) -> None:
        """Load the model (with its tokenizer) on this worker's device."""
        from mlm.inference import image_transform, load_model

        if self.threads:
            torch.set_num_threads(self.threads)  # workers and the HTTP process share the cores
        self.model = load_model(self.checkpoint, str(device))
        self.transform = image_transform(self.model)

    def _pixels(self, data: str, field: str) -> torch.Tensor | ItemError:
        from mlm.data.images import decode_image
        from mlm.data.records import DataError

        try:
            image, _ = decode_image(base64.b64decode(data), MAX_PIXELS, origin=field)
        except DataError as err:
            return ItemError(400, field, f"not a usable image ({err.reason})")
        self._last_size = image.width * image.height
        return self.transform(image)

    def batch(self, inputs: list) -> list:
        """Requests stay a list; predict groups them."""
        return inputs

    def unbatch(self, outputs: list) -> list:
        """One output per request, in order."""
        return outputs

    @torch.inference_mode()
    def predict(self, items):
        """Run the good items together, pass the errors through; if the batch fails, retry item by item."""
        if self.max_batch_size == 1:  # without batching LitServe passes the request itself, not a list
            return self._predict([items])[0]
        return self._predict(items)

    def _predict(self, items: list) -> list:
        good = [i for i, item in enumerate(items) if not isinstance(item, ItemError)]
        out = list(items)
        if not good:
            return out
        try:
            results = self.run([items[i] for i in good])
        except Exception:  # noqa: BLE001 - one bad item must not fail its neighbours: find it alone
            logger.exception("a batch of %d failed; running its requests one by one", len(good))
            results = []
            for i in good:
                try:
                    results += self.run([items[i]])
                except Exception as err:  # noqa: BLE001
                    results.append(ItemError(500, "request", f"the model failed on it ({type(err).__name__})"))
        for i, result in zip(good, results, strict=True):
            out[i] = result
        return out

    @abstractmethod
    def run(self, items: list) -> list:
        """Outputs of good items, in order (each endpoint's own)."""

    def encode_response(self, output):
        """The JSON response, or this request's own error."""
        if isinstance(output, ItemError):
            return JSONResponse(status_code=output.status, content={"error": output.reason, "field": output.field})
        return output


class CaptionAPI(_ModelAPI):
    """``POST /v1/caption``: the caption of one image."""

    def decode_request(self, request: dict):
        """Pixels and decoding settings."""
        pixels = self._pixels(request["image"], "image")
        return pixels if isinstance(pixels, ItemError) else {**request, "pixels": pixels, "prompt": None}

    def _prompt(self, item: dict) -> list[int]:
        return [self.model.tokenizer.bos_id]

    field = "caption"  # the response's key

    def run(self, items: list[dict]) -> list[dict]:
        """One generation call per group of equal decoding settings; greedy requests share one call."""
        tok = self.model.tokenizer
        results: dict[int, dict] = {}
        order = sorted(range(len(items)), key=lambda i: self._group(items[i], i))
        for _, group in groupby(order, key=lambda i: self._group(items[i], i)):
            rows = list(group)
            first = items[rows[0]]
            longest = max(items[i]["max_new_tokens"] for i in rows)
            generator = torch.Generator(self.model.device).manual_seed(first["seed"]) if first["top_p"] > 0 else None
            ids = self.model.generate_ids(
                torch.stack([items[i]["pixels"] for i in rows]),
                [self._prompt(items[i]) for i in rows],
                max_new_tokens=longest,
                num_beams=first["num_beams"],
                top_p=first["top_p"],
                min_new_tokens=1,
                generator=generator,
            )
            for i, seq in zip(rows, ids, strict=True):
                results[i] = {
                    self.field: tok.decode(seq[: items[i]["max_new_tokens"]]).strip(),
                    "batch_size": len(items),
                }
        return [results[i] for i in range(len(items))]

    @staticmethod
    def _group(item: dict, index: int) -> tuple:
        """Greedy requests decode together whatever their max tokens (cut afterwards), beam search groups by equal
        settings, and a sampled request decodes alone with its own seeded generator: a request's result never depends
        on its neighbours."""
        if item["top_p"] > 0:
            return (2, index)
        if item["num_beams"] == 1:
            return (0, 0)
        return (1, item["num_beams"] * 1000 + item["max_new_tokens"])


class AnswerAPI(CaptionAPI):
    """``POST /v1/answer``: the answer to a question about one image."""

    field = "answer"

    def decode_request(self, request: dict):
        """Pixels, settings and the question's prompt ids (a question too long for the model fails alone)."""
        from mlm.inference import check_question

        try:
            check_question(self.model, request["question"])
        except ValueError as err:
            return ItemError(422, "question", str(err).split(": ", 1)[-1])
        return super().decode_request(request)

    def _prompt(self, item: dict) -> list[int]:
        from mlm.data.tokenizer import vqa_prompt

        return self.model.tokenizer.encode(vqa_prompt(item["question"], self.model.config.vqa_prompt), eos=False)


class EmbedAPI(_ModelAPI):
    """``POST /v1/embed``: L2-normalised embeddings of images and texts, batched per modality across requests."""

    def decode_request(self, request: dict):
        """Every image decoded (one that does not fails this request)."""
        pixels, total = [], 0
        for i, data in enumerate(request["images"]):
            item = self._pixels(data, f"images[{i}]")
            if isinstance(item, ItemError):
                return item
            total += self._last_size
            if total > MAX_REQUEST_PIXELS:
                return ItemError(
                    413, f"images[{i}]", f"the images hold more than {MAX_REQUEST_PIXELS:,} pixels together"
                )
            pixels.append(item)
        return {"pixels": pixels, "texts": request["texts"]}

    def run(self, items: list[dict]) -> list[dict]:
        """One image pass and one text pass for the whole batch."""
        from mlm.inference import embed_images, embed_texts

        pixels = [p for item in items for p in item["pixels"]]
        texts = [t for item in items for t in item["texts"]]
        images = embed_images(self.model, torch.stack(pixels)) if pixels else torch.zeros(0)
        text_embeds = embed_texts(self.model, texts) if texts else torch.zeros(0)
        out, i, j = [], 0, 0
        for item in items:
            n, m = len(item["pixels"]), len(item["texts"])
            out.append({"image_embeds": images[i : i + n].tolist(), "text_embeds": text_embeds[j : j + m].tolist(),
                        "batch_size": len(items)})  # fmt: skip
            i, j = i + n, j + m
        return out


class SearchAPI(_ModelAPI):
    """``POST /v1/search``: the top-k images of the folder indexed at start-up for a text."""

    def __init__(self, checkpoint: str, images: str, cache_dir: str | None, **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.images, self.cache_dir = images, cache_dir

    def setup(self, device) -> None:
        """Load the model and the folder's cached index (embedding only new or changed files)."""
        from mlm.eval.image_index import ImageIndex
        from mlm.inference import checkpoint_id

        super().setup(device)
        self.index = ImageIndex(self.images, self.model, checkpoint_id(self.checkpoint), self.cache_dir)
        self.index.refresh()

    def decode_request(self, request: dict):
        """The text and k as they are."""
        return request

    def run(self, items: list[dict]) -> list[dict]:
        """One text pass for the batch, then each request's top-k."""
        from mlm.inference import embed_texts

        queries = embed_texts(self.model, [item["text"] for item in items])  # (B, E)
        scores = queries @ self.index.embeds.T if len(self.index.paths) else torch.zeros(len(items), 0)
        out = []
        for item, row in zip(items, scores, strict=True):
            top = torch.sort(row, descending=True, stable=True).indices[: item["k"]].tolist()
            hits = [{"path": str(self.index.paths[i].relative_to(self.index.folder)), "score": round(float(row[i]), 5)}
                    for i in top]  # fmt: skip
            out.append({"results": hits, "batch_size": len(items)})
        return out
