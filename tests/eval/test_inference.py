"""Model-facing helpers: checkpoint resolution, image batches with bad files, text embeddings, answer likelihoods."""

import pytest
import torch

from mlm import inference as infer
from mlm.data.tokenizer import vqa_prompt


def test_a_run_a_checkpoint_and_a_model_folder_resolve_to_the_same_model(tiny_run, tmp_path):
    run, _ = tiny_run
    model_dir = infer.resolve_checkpoint(run)
    assert model_dir == run / "checkpoints" / "step_000030" / "model"
    assert infer.resolve_checkpoint(model_dir.parent) == model_dir
    assert infer.resolve_checkpoint(model_dir) == model_dir
    assert infer.checkpoint_id(run) == infer.checkpoint_id(model_dir)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*step_\\*/model"):
        infer.resolve_checkpoint(tmp_path)


def test_image_batches_skip_bad_files_with_their_reason(tiny_model, tiny_run, tmp_path):
    images = sorted((tiny_run[1] / "images").glob("*.png"))[:3]
    (tmp_path / "notes.png").write_text("not an image")
    items = [images[0], tmp_path / "notes.png", images[1], tmp_path / "missing.png", images[2]]
    errors = {}
    batches = list(infer.image_batches(items, infer.image_transform(tiny_model), 2, errors=errors))
    assert [index for index, _ in batches] == [[0], [2], [4]]
    assert all(pixels.shape == (1, 3, 32, 32) for _, pixels in batches)
    assert sorted(errors) == [1, 3]
    assert "not an image" in errors[1] and "missing image" in errors[3]


def test_text_embeddings_do_not_depend_on_the_batch_size(tiny_model):
    texts = ["a red circle", "two large blue squares at the top left", "a star", "one object: a green cross."]
    one = infer.embed_texts(tiny_model, texts, batch_size=1)
    assert torch.allclose(one, infer.embed_texts(tiny_model, texts, batch_size=3), atol=1e-5)
    assert torch.allclose(one.norm(dim=-1), torch.ones(4), atol=1e-5)


@torch.no_grad()
def test_answer_log_likelihood_is_the_sum_of_answer_and_eos_token_log_probs(tiny_model, monkeypatch):
    model, tok = tiny_model, tiny_model.tokenizer
    pixels = torch.randn(2, 3, 32, 32)
    questions = ["what color is the shape?", "how many shapes are there at the bottom left?"]
    candidates = ["red", "two", "top left", "yes"]
    scores = infer.answer_log_likelihood(model, pixels, questions, candidates)
    image_tokens = model.encoder.encode_image(pixels).tokens
    for b, question in enumerate(questions):
        prompt = [tok.bos_id] + tok.tokenize(vqa_prompt(question))
        for c, candidate in enumerate(candidates):
            answer = tok.tokenize(candidate) + [tok.eos_id]
            ids = torch.tensor([prompt + answer])  # one unpadded sequence, scored by hand
            logprobs = model.text_logits(image_tokens[b : b + 1], ids).log_softmax(-1)[0]
            expected = sum(float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(answer))
            assert float(scores[b, c]) == pytest.approx(expected, abs=1e-4)
    monkeypatch.setattr(infer, "LOGIT_BUDGET", 1)  # one sequence per call: the chunking must not change anything
    assert torch.allclose(infer.answer_log_likelihood(model, pixels, questions, candidates), scores, atol=1e-4)
