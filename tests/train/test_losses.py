"""Objectives: equality with open_clip's ClipLoss/SigLipLoss, HN-NCE by hand, masks, and the combined ImageTextLoss."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

from mlm.config import ConfigError, TrainConfig
from mlm.train.losses import ImageTextLoss, InfoNCELoss, SigLipLoss, TokenCrossEntropy, hn_nce_rows


def _features(n=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    return img, txt


def test_infonce_equals_open_clip_loss_and_gradients():
    img, txt = _features()
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    ours = InfoNCELoss()(img, txt, scale)
    grads = torch.autograd.grad(ours, (img, txt))
    ref = ClipLoss()(img, txt, scale)
    ref_grads = torch.autograd.grad(ref, (img, txt))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_siglip_equals_open_clip_siglip_loss():
    img, txt = _features(n=6)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = SigLipLoss()(img, txt, scale, bias)
    ref = OpenClipSigLipLoss()(img, txt, scale, bias)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours_grad = torch.autograd.grad(ours, img)[0]
    ref_grad = torch.autograd.grad(ref, img)[0]
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_hard_negative_strength_zero_is_exactly_infonce():
    img, txt = _features()
    scale = torch.tensor(14.0)
    plain = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(InfoNCELoss(hard_negative_strength=0.0)(img, txt, scale), plain)
    logits = scale * img @ txt.T
    labels = torch.arange(8)
    assert torch.equal(hn_nce_rows(logits, labels, 0.0), F.cross_entropy(logits, labels, reduction="none"))
    # The weighted formula itself (not only the beta = 0 shortcut) tends to InfoNCE as beta -> 0.
    torch.testing.assert_close(hn_nce_rows(logits, labels, 1e-9), F.cross_entropy(logits, labels, reduction="none"))


def test_hn_nce_matches_the_papers_formula_by_hand():
    """Radenovic et al. 2023, eq. (3): -log(e^s_ii / (alpha e^s_ii + sum_j!=i w_ij e^s_ij)), alpha = 1."""
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.0], [0.3, 1.0, 0.9, -0.5], [0.0, 0.0, 0.5, 0.1]])
    labels = torch.tensor([0, 1, 2])
    beta = 0.7
    expected = []
    for i in range(3):
        neg = [j for j in range(4) if j != labels[i]]
        exp_beta = torch.stack([torch.exp(beta * logits[i, j]) for j in neg])
        weights = len(neg) * exp_beta / exp_beta.sum()
        denominator = torch.exp(logits[i, labels[i]]) + (weights * torch.exp(logits[i, neg])).sum()
        expected.append(-torch.log(torch.exp(logits[i, labels[i]]) / denominator))
    torch.testing.assert_close(hn_nce_rows(logits, labels, beta), torch.stack(expected))


def test_hard_negatives_raise_the_loss_and_the_hardest_negatives_gradient():
    img, txt = _features()
    scale = torch.tensor(14.0)
    plain = InfoNCELoss()(img, txt, scale)
    hard = InfoNCELoss(hard_negative_strength=1.0)(img, txt, scale)
    assert hard > plain  # weights concentrate on the larger similarities (Chebyshev's sum inequality)
    logits = (scale * img @ txt.T).detach().requires_grad_()
    labels = torch.arange(8)
    grad_plain = torch.autograd.grad(hn_nce_rows(logits, labels, 0.0)[0], logits)[0][0]
    grad_hard = torch.autograd.grad(hn_nce_rows(logits, labels, 1.0)[0], logits)[0][0]
    negatives = logits[0].detach().clone()
    negatives[0] = float("-inf")
    hardest = negatives.argmax()
    # The push on the most similar wrong caption grows (its softmax share rises from ~0.68 to ~0.98 here).
    assert grad_hard[hardest] > grad_plain[hardest] + 0.1


def test_valid_rows_equal_the_loss_on_the_subset():
    img, txt = _features(n=10)
    valid = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    scale = torch.tensor(9.0)
    for loss in (InfoNCELoss(hard_negative_strength=0.5), InfoNCELoss(local_loss=True)):
        torch.testing.assert_close(loss(img, txt, scale, valid), loss(img[valid], txt[valid], scale))
    siglip = SigLipLoss()
    torch.testing.assert_close(
        siglip(img, txt, scale, torch.tensor(-3.0), valid), siglip(img[valid], txt[valid], scale, torch.tensor(-3.0))
    )


def test_no_valid_rows_gives_zero_but_keeps_the_graph():
    img, txt = _features(n=4)
    loss = InfoNCELoss()(img, txt, torch.tensor(10.0), torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(img.grad, torch.zeros_like(img))


def test_token_cross_entropy_shifts_and_ignores_prompt_and_pad():
    vocab = 7
    logits = torch.randn(2, 5, vocab)
    labels = torch.tensor([[1, 4, 5, -100, -100], [-100, -100, -100, 3, 2]])  # caption row; VQA row (answer 3 2)
    rows = torch.tensor([True, True])
    loss = TokenCrossEntropy()(logits, labels, rows)
    # Hand-listed targets: position t predicts label t+1.
    pairs = [(0, 0, 4), (0, 1, 5), (1, 2, 3), (1, 3, 2)]
    expected = torch.stack([F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in pairs]).mean()
    torch.testing.assert_close(loss, expected)
    only_second = TokenCrossEntropy()(logits, labels, torch.tensor([False, True]))
    torch.testing.assert_close(
        only_second,
        expected.new_tensor(0)
        + torch.stack([F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in pairs[2:]]).mean(),
    )


def _output(batch_size=6, seq=5, vocab=11, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        image_embeds=F.normalize(torch.randn(batch_size, dim, generator=g), dim=-1),
        text_embeds=F.normalize(torch.randn(batch_size, dim, generator=g), dim=-1),
        logit_scale=torch.tensor(1 / 0.07),
        logit_bias=torch.tensor(-10.0),
        logits=torch.randn(batch_size, seq, vocab, generator=g),
    )


def test_mlm_loss_routes_rows_and_weights_parts():
    out = _output()
    is_vqa = torch.tensor([False, True, False, False, True, False])
    labels = torch.randint(0, 11, (6, 5))
    labels[is_vqa, :3] = -100  # prompt tokens of the VQA rows
    batch = {"is_vqa": is_vqa, "labels": labels}
    loss_fn = ImageTextLoss.from_config(TrainConfig(contrastive_weight=1.0, caption_weight=2.0, vqa_weight=0.5))
    total, parts = loss_fn(out, batch)
    caption_rows = ~is_vqa
    contrastive = ClipLoss()(out.image_embeds[caption_rows], out.text_embeds[caption_rows], out.logit_scale)
    caption = TokenCrossEntropy()(out.logits[caption_rows], labels[caption_rows], torch.ones(4, dtype=torch.bool))
    vqa = TokenCrossEntropy()(out.logits[is_vqa], labels[is_vqa], torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(parts["contrastive"], contrastive)
    torch.testing.assert_close(parts["caption"], caption)
    torch.testing.assert_close(parts["vqa"], vqa)
    torch.testing.assert_close(total, contrastive + 2.0 * caption + 0.5 * vqa)


def test_vqa_contrastive_pairs_every_row_s_text_with_its_image():
    out = _output()
    is_vqa = torch.tensor([False, True, False, False, True, True])
    batch = {"is_vqa": is_vqa, "labels": torch.randint(0, 11, (6, 5))}
    _, parts = ImageTextLoss.from_config(TrainConfig(vqa_contrastive=True))(out, batch)
    torch.testing.assert_close(parts["contrastive"], ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale))
    questions_only = {"is_vqa": torch.ones(6, dtype=torch.bool), "labels": batch["labels"]}
    _, parts = ImageTextLoss.from_config(TrainConfig())(out, questions_only)
    assert parts["contrastive"] == 0  # off: no caption row, no contrastive loss
    _, parts = ImageTextLoss.from_config(TrainConfig(vqa_contrastive=True, contrastive_loss="siglip"))(out, batch)
    torch.testing.assert_close(
        parts["contrastive"], OpenClipSigLipLoss()(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    )


def test_siglip_with_hard_negative_strength_is_a_config_error():
    with pytest.raises(ConfigError, match="hard_negative_strength"):
        ImageTextLoss.from_config(TrainConfig(contrastive_loss="siglip", hard_negative_strength=0.5))


def test_swapped_word_negatives_add_the_per_row_cross_entropy():
    import torch.nn.functional as F

    from mlm.train.losses import InfoNCELoss

    torch.manual_seed(0)
    image, text, negatives = (F.normalize(torch.randn(n, 8), dim=-1) for n in (4, 4, 5))
    owners = torch.tensor([0, 0, 2, 3, 3])
    valid = torch.tensor([True, True, True, False])  # row 3 is a VQA row: its negatives do not count
    scale = torch.tensor(10.0)
    loss = InfoNCELoss()
    extra = loss(image, text, scale, valid, negatives, owners) - loss(image, text, scale, valid)
    by_hand = []
    for row in (0, 2):
        logits = scale * torch.cat([(image[row] * text[row]).sum()[None], negatives[owners == row] @ image[row]])
        by_hand.append(-torch.log_softmax(logits, dim=0)[0])
    torch.testing.assert_close(extra, torch.stack(by_hand).mean())


def test_word_idf_and_loss_by_hand():
    from mlm.data.tokenizer import MLMTokenizer
    from mlm.train.losses import WordLoss, word_idf

    texts = ["red circle", "red square", "red star"]
    tok = MLMTokenizer.train_wordpiece(texts, 60)
    idf = word_idf(tok, texts)
    (red,), (circle,), (square,) = tok.tokenize("red"), tok.tokenize("circle"), tok.tokenize("square")
    assert idf[red] == pytest.approx(0.0)  # in every caption: log(4 / 4)
    assert idf[circle] == pytest.approx(math.log(4 / 2))
    assert idf[tok.bos_id] == 0 and idf[tok.pad_id] == 0
    ids = torch.tensor([[tok.bos_id, red, circle, tok.eos_id], [tok.bos_id, red, square, tok.pad_id],
                        [tok.bos_id, red, tok.eos_id, tok.pad_id]])  # fmt: skip
    logits = torch.randn(3, tok.vocab_size)
    rows = torch.tensor([True, True, True])
    loss = WordLoss(idf)(logits, ids, rows)
    logp = logits.log_softmax(-1)
    # the third caption has no word with weight ("red" is everywhere): it is left out of the mean
    torch.testing.assert_close(loss, -(logp[0, circle] + logp[1, square]) / 2)
    torch.testing.assert_close(WordLoss(idf)(logits, ids, torch.tensor([False, True, True])), -logp[1, square])


def test_word_weight_needs_the_head_and_the_idf():
    from mlm.config import load_config

    with pytest.raises(ConfigError, match="train.word_weight=0.5 needs model.word_head"):
        load_config(None, ["train.word_weight=0.5"])
    with pytest.raises(ValueError, match="needs the token IDF"):
        ImageTextLoss.from_config(TrainConfig(word_weight=0.5))
    with pytest.raises(ConfigError, match="model.word_head_patches needs model.word_head: true"):
        load_config(None, ["model.word_head_patches=true"])


def test_patch_word_logits_are_each_words_best_patch():
    from tiny_checkpoint import TINY_MODEL

    from mlm.config import load_config
    from mlm.model import MLMModel

    config = load_config(None, [*TINY_MODEL, "model.word_head=true", "model.word_head_patches=true"]).model
    model = MLMModel(config).eval()
    images = torch.randn(2, 3, config.image_size, config.image_size)
    ids = torch.randint(1, config.vocab_size, (2, 6))
    with torch.no_grad():
        out = model(images, ids, torch.ones_like(ids, dtype=torch.bool))
        image = model.image_features(images)
        per_patch = model.word_head(model.pooler.proj(image.tokens))  # (B, N, V)
    assert per_patch.shape[1] == image.tokens.shape[1] > 1
    torch.testing.assert_close(out.word_logits, per_patch.max(dim=1).values)
