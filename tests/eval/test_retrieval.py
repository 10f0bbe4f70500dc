"""Retrieval metrics: hand-built similarity matrices, the several-captions convention, ties, chunking equivalence."""

import pytest
import torch
import torch.nn.functional as F

from mlm.eval.retrieval import (
    image_to_text_ranks,
    load_embeddings,
    retrieval_metrics,
    save_embeddings,
    text_to_image_ranks,
    topk_indices,
)

# Rows: images, columns: captions. Captions 0,1 belong to image 0, caption 2 to image 1, captions 3,4 to image 2.
SIMS = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3],
        [0.7, 0.6, 0.5, 0.9, 0.4],
        [0.1, 0.2, 0.3, 0.0, 0.25],
    ]
)
OWNERS = torch.tensor([0, 0, 1, 2, 2])


def _embeds_for(sims):
    """Embeddings whose dot products are exactly ``sims``: one-hot images, texts = columns of sims."""
    return torch.eye(sims.shape[0]), sims.T.contiguous()


def test_hand_built_matrix_ranks_and_metrics():
    images, texts = _embeds_for(SIMS)
    # Image 0: its caption 0 is first. Image 1: caption 2 is 4th (0.9, 0.7, 0.6 above). Image 2: caption 4 is 2nd.
    assert image_to_text_ranks(images, texts, OWNERS).tolist() == [0, 3, 1]
    # Column-wise: caption 1's image 0 scores lowest of three; caption 3's image 2 too.
    assert text_to_image_ranks(images, texts, OWNERS).tolist() == [0, 2, 1, 2, 2]
    m = retrieval_metrics(images, texts, OWNERS, ks=(1, 2, 4))
    assert m["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(200 / 3)
    assert m["image_to_text_R@4"] == pytest.approx(100.0)
    assert [m[f"text_to_image_R@{k}"] for k in (1, 2, 4)] == pytest.approx([20.0, 40.0, 100.0])
    assert m["mean_recall"] == pytest.approx((100 / 3 + 200 / 3 + 100 + 20 + 40 + 100) / 6)
    assert m["image_to_text_median_rank"] == 2.0  # ranks 1, 2, 4
    assert m["text_to_image_median_rank"] == 3.0  # ranks 1, 2, 3, 3, 3
    assert m["image_to_text_mean_rank"] == pytest.approx(7 / 3)
    assert m["text_to_image_mean_rank"] == pytest.approx(2.4)
    assert (m["num_images"], m["num_texts"]) == (3, 5)


def test_image_to_text_counts_the_best_of_several_captions():
    images, texts = _embeds_for(SIMS)
    # Image 2's caption 3 is last in its row; caption 4 (2nd) decides. Pushing caption 3 lower changes nothing...
    lowered = SIMS.clone()
    lowered[2, 3] = -5.0
    assert image_to_text_ranks(*_embeds_for(lowered), OWNERS).tolist() == [0, 3, 1]
    # ...while lifting it to the top makes image 2 a hit at rank 1.
    lifted = SIMS.clone()
    lifted[2, 3] = 5.0
    assert image_to_text_ranks(*_embeds_for(lifted), OWNERS).tolist() == [0, 3, 0]
    # Keeping only caption 3 for image 2 (gallery: captions 0, 2, 3) drops image 2 to the last place.
    assert image_to_text_ranks(images, texts[[0, 2, 3]], torch.tensor([0, 1, 2])).tolist() == [0, 2, 2]


def test_equal_scores_are_ordered_by_index_not_counted_as_hits():
    # A collapsed model: every similarity equal. Ranks follow index order, so recall is chance level, not 100%.
    images, texts = torch.ones(4, 2) / 2**0.5, torch.ones(8, 2) / 2**0.5
    owners = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert text_to_image_ranks(images, texts, owners).tolist() == owners.tolist()
    assert image_to_text_ranks(images, texts, owners).tolist() == [0, 2, 4, 6]
    assert retrieval_metrics(images, texts, owners)["text_to_image_R@1"] == pytest.approx(25.0)


def _reference_ranks(images, texts, owners):
    """Unchunked reference: full similarity matrix, stable descending argsort, position of the targets."""
    sims = images @ texts.T  # (N, M)
    i2t_order = torch.sort(sims, dim=1, descending=True, stable=True).indices  # (N, M)
    i2t = [
        min(i2t_order[i].tolist().index(j) for j in torch.nonzero(owners == i).flatten().tolist())
        for i in range(images.shape[0])
    ]
    t2i_order = torch.sort(sims.T, dim=1, descending=True, stable=True).indices  # (M, N)
    t2i = [t2i_order[j].tolist().index(int(owners[j])) for j in range(texts.shape[0])]
    return i2t, t2i


@pytest.mark.parametrize("quantize", [False, True])
def test_chunked_equals_unchunked(quantize):
    gen = torch.Generator().manual_seed(1)
    n_images, n_texts = 37, 120
    images = F.normalize(torch.randn(n_images, 16, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(n_texts, 16, generator=gen), dim=-1)
    if quantize:  # coarse values make many exact ties
        images, texts = (images * 2).round() / 2, (texts * 2).round() / 2
    # Uneven caption counts: every image once, the rest at random.
    owners = torch.cat([torch.arange(n_images), torch.randint(0, n_images, (n_texts - n_images,), generator=gen)])
    ref_i2t, ref_t2i = _reference_ranks(images, texts, owners)
    full = retrieval_metrics(images, texts, owners, chunk_size=10_000)
    for chunk in (1, 5, 64):
        assert image_to_text_ranks(images, texts, owners, chunk_size=chunk).tolist() == ref_i2t
        assert text_to_image_ranks(images, texts, owners, chunk_size=chunk).tolist() == ref_t2i
        assert retrieval_metrics(images, texts, owners, chunk_size=chunk) == full


def test_topk_indices_match_full_sort_in_any_chunking():
    gen = torch.Generator().manual_seed(2)
    queries, gallery = torch.randn(9, 8, generator=gen), torch.randn(30, 8, generator=gen)
    expected = torch.topk(queries @ gallery.T, k=5, dim=1).indices
    assert torch.equal(topk_indices(queries, gallery, k=5, chunk_size=4), expected)
    assert topk_indices(queries, gallery[:3], k=5).shape == (9, 3)


def test_input_errors_name_the_problem():
    images, texts = _embeds_for(SIMS)
    with pytest.raises(ValueError, match=r"1 image\(s\) have no caption, e.g. image indices \[1\]"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 2, 2, 2]))
    with pytest.raises(ValueError, match=r"text_to_image values must lie in \[0, 2\], got 0..3"):
        retrieval_metrics(images, texts, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"expected image_embeds \(N, E\) and text_embeds \(M, E\)"):
        retrieval_metrics(images, texts[:, :2], OWNERS)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        retrieval_metrics(images, texts, OWNERS, chunk_size=0)


def test_embeddings_file_round_trip(tmp_path):
    images, texts = _embeds_for(SIMS)
    path = save_embeddings(tmp_path / "embeds.safetensors", images, texts, OWNERS)
    loaded = load_embeddings(path)
    assert torch.equal(loaded["text_embeds"], texts) and torch.equal(loaded["text_to_image"], OWNERS)
    from safetensors.torch import save_file

    save_file({"image_embeds": images}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['text_embeds', 'text_to_image'\]"):
        load_embeddings(tmp_path / "partial.safetensors")


def test_non_finite_embeddings_are_refused_not_scored_as_perfect():
    images = F.normalize(torch.randn(3, 4), dim=-1)
    texts = F.normalize(torch.randn(3, 4), dim=-1)
    texts[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"text_embeds: 1 of 3 rows hold NaN or inf"):
        retrieval_metrics(images, texts, torch.arange(3))
    with pytest.raises(ValueError, match=r"image_embeds: 3 of 3 rows"):
        retrieval_metrics(torch.full((3, 4), float("nan")), images, torch.arange(3))
