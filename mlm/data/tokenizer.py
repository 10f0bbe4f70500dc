"""Text tokenizer: a WordPiece vocabulary learned from the texts, any ``tokenizer.json``, or open_clip's BPE.

All three are one ``tokenizers.Tokenizer`` underneath, so saving and loading is always ``tokenizer.json``. Every
sequence is framed as ``[BOS] tokens [EOS]`` and padded with ``[PAD]``; VQA records use the text
``question: <q> answer: <a>`` by default (``model.vqa_prompt``, see :func:`vqa_prompt`), and the prompt part is
never a training target.
WordPiece follows BERT (Devlin et al., 2019) and is learned by :mod:`mlm.data.wordpiece`, the same texts always
giving the same vocabulary; the BPE is CLIP's (Radford et al., 2021) as open_clip ships it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mlm.data.wordpiece import PREFIX, count_words, learn_vocab

PAD, UNK, BOS, EOS, SEP = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, SEP]

# Names other tokenizer.json files use for the same roles, tried in order when loading one we did not write.
_ROLE_NAMES = {
    "bos": [BOS, "<s>", "<bos>", "<|startoftext|>", "<start_of_text>", "[CLS]", "<|begin_of_text|>"],
    "eos": [EOS, "</s>", "<eos>", "<|endoftext|>", "<end_of_text>", "<|end_of_text|>", "[SEP]"],
    "pad": [PAD, "<pad>", "<|pad|>", "<|padding|>"],
    "sep": [SEP, "<sep>", "</s>"],
}
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


VQA_PROMPT = "question: {question} answer:"  # model.vqa_prompt's default, and that of every older checkpoint


def vqa_prompt(question: str, template: str = VQA_PROMPT) -> str:
    """The text the decoder is conditioned on for a question (``{question}`` of the template); the answer follows."""
    return template.replace("{question}", question)


def vqa_text(question: str, answer: str, template: str = VQA_PROMPT) -> str:
    """The full training text of a VQA record."""
    return f"{vqa_prompt(question, template)} {answer}"


class MLMTokenizer:
    """A ``tokenizers.Tokenizer`` with BOS/EOS/PAD/SEP ids, batch encoding to padded tensors, and decoding."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {role: self._find(names) for role, names in _ROLE_NAMES.items()}
        missing = [_ROLE_NAMES[role][0] for role, token_id in ids.items() if token_id is None]
        if missing:
            # a tokenizer.json without these roles gets them as added special tokens
            tokenizer.add_special_tokens(missing)
            ids = {role: self._find(names) for role, names in _ROLE_NAMES.items()}
        self.pad_id: int = ids["pad"]
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.sep_id: int = ids["sep"]
        self._special = {self.pad_id, self.bos_id, self.eos_id, self.sep_id}

    def _find(self, names: list[str]) -> int | None:
        """Id of the first name that is a special token (preferred) or, failing that, a plain vocabulary entry."""
        special = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        for name in names:
            if name in special:
                return special[name]
        for name in names:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown-word token (None for byte-level vocabularies that have none)."""
        unk = getattr(self.tokenizer.model, "unk_token", None)
        return self.tokenizer.token_to_id(unk) if unk else None

    def cannot_spell(self, text: str) -> bool:
        """Whether the tokenizer writes some of ``text`` as the unknown-word token."""
        unk = self.unk_id
        return unk is not None and unk in self.tokenize(text)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train_wordpiece(cls, texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 1) -> MLMTokenizer:
        """Train a lower-cased BERT-style WordPiece vocabulary on the given texts (plus the VQA prompt words).

        vocab_size counts every token, special ones included; texts with fewer possible merges give fewer tokens.
        """
        normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True, strip_accents=True)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        # the prompt words ("question", "answer", ":") frame every VQA text, so they must be whole tokens
        words = count_words(itertools.chain(texts, [vqa_text("", "")] * 100), normalizer, pre_tokenizer)
        vocab = learn_vocab(words, vocab_size, min_frequency, special_tokens=SPECIAL_TOKENS)
        tok = Tokenizer(
            models.WordPiece(
                vocab={token: i for i, token in enumerate(vocab)},
                unk_token=UNK,
                max_input_chars_per_word=100,
                continuing_subword_prefix=PREFIX,
            )
        )
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.WordPiece(prefix=PREFIX)
        tok.add_special_tokens(SPECIAL_TOKENS)  # already ids 0..4 in the vocabulary; this marks them special
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}",
            pair=f"{BOS} $A {SEP} $B {EOS}",
            special_tokens=[(t, tok.token_to_id(t)) for t in (BOS, EOS, SEP)],
        )
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> MLMTokenizer:
        """Load any ``tokenizer.json`` (a folder holding one also works)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{path}: not a valid tokenizer.json: {err}") from err

    @classmethod
    def openclip(cls) -> MLMTokenizer:
        """open_clip's CLIP BPE (49408 tokens, shipped inside open_clip) plus [PAD] and [SEP]."""
        from open_clip.tokenizer import SimpleTokenizer

        clip = SimpleTokenizer()
        merges = [pair for pair, _ in sorted(clip.bpe_ranks.items(), key=lambda kv: kv[1])]
        tok = Tokenizer(
            models.BPE(
                vocab=dict(clip.encoder),
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token="<end_of_text>",
            )
        )
        # the same normalisation and regex split as CLIP's SimpleTokenizer (and transformers' CLIPTokenizer)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.Sequence(
            [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
        )
        tok.add_special_tokens(["<start_of_text>", "<end_of_text>", PAD, SEP])
        return cls(tok)

    @classmethod
    def from_config(cls, spec: str, texts: Iterable[str] | None = None, vocab_size: int = 2000) -> MLMTokenizer:
        """Build the tokenizer named by ``data.tokenizer``: wordpiece (trained on texts), openclip, or a path."""
        if spec == "wordpiece":
            if texts is None:
                raise ValueError("data.tokenizer=wordpiece needs the training texts to learn a vocabulary")
            return cls.train_wordpiece(texts, vocab_size)
        if spec == "openclip":
            return cls.openclip()
        return cls.from_file(spec)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (path may be a folder or a file name); returns the file written."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path

    def tokenize(self, text: str) -> list[int]:
        """Token ids of the text without any special token."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Token ids framed as ``[BOS] tokens [EOS]`` (either end can be left off, e.g. for a generation prompt)."""
        return [self.bos_id] * bos + self.tokenize(text) + [self.eos_id] * eos

    def frame(self, ids: list[int], max_len: int) -> list[int]:
        """``[BOS] ids [EOS]``, cutting ids so that the result has at most max_len tokens (EOS is kept)."""
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for BOS and EOS; use at least 2")
        return [self.bos_id] + ids[: max_len - 2] + [self.eos_id]

    def encode_vqa(self, question: str, answer: str, max_len: int, template: str = VQA_PROMPT) -> tuple[list[int], int]:
        """Ids of the prompt (``question: <q> answer:`` by default) and answer framed by BOS/EOS, and the prompt
        length (BOS up to the answer).

        When too long, the question is cut, never the answer (unless the answer alone does not fit).
        """
        prompt = self.tokenize(vqa_prompt(question, template))
        reply = self.tokenize(answer)[: max(0, max_len - 3)]
        room = max_len - 2 - len(reply)
        if len(prompt) > room:
            # keep the question's start and what follows it (the "answer :" marker) so the prompt stays well formed
            marker = self.tokenize(template.split("{question}", 1)[1])
            prompt = prompt[: max(0, room - len(marker))] + marker
        ids = [self.bos_id] + prompt + reply + [self.eos_id]
        return ids, 1 + len(prompt)

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad id lists to the longest one: ids (B, T) long and mask (B, T) bool, True at real tokens."""
        longest = max((len(s) for s in sequences), default=0)
        ids = torch.full((len(sequences), max(longest, 1)), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(ids.shape, dtype=torch.bool)  # (B, T)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return ids, mask

    def encode_batch(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts as ``[BOS] ... [EOS]`` truncated to max_len, padded to the longest: ids and mask (B, T)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return self.pad([self.frame(e.ids, max_len) for e in encodings])

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of the ids with special tokens (BOS/EOS/PAD/SEP) dropped; stops at the first EOS."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept = []
        for token_id in ids:
            if token_id == self.eos_id:
                break
            if token_id not in self._special:
                kept.append(int(token_id))
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()

    def __len__(self) -> int:
        return self.vocab_size
