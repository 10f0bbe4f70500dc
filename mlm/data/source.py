"""The Source type: the records of one annotation source with their skip counts, and sources joined as one.

Every reader's result reaches the caller as a :class:`Source` (``open_source`` wraps a reader's list of records in
one; a reader that keeps rows in a lazily indexed table, like the HF one, subclasses it). ``a.json+b.csv`` opens as
a :class:`ConcatSource`, whose counts are the sum of its parts'.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mlm.data.records import Record, SkipStats


class Source(Sequence[Record]):
    """Records from one annotation source with its skip counts; images are decoded only when used."""

    def __init__(self, name: str, kind: str, records: list[Record], stats: SkipStats):
        self.name = name
        self.kind = kind
        self.records = records
        self.stats = stats

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def texts(self) -> Iterator[str]:
        """Every caption, question and answer: the text a tokenizer is trained on."""
        for record in self:
            yield from record.captions
            if record.question:
                yield record.question
                yield from record.answers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r}, records={len(self)})"


class ConcatSource(Source):
    """Several sources read as one; their counts are merged."""

    def __init__(self, parts: list[Source]):
        stats = SkipStats(strict=parts[0].stats.strict)
        for part in parts:
            stats.merge(part.stats)
        super().__init__(" + ".join(p.name for p in parts), "+".join(p.kind for p in parts), [], stats)
        self.parts = parts
        self._offsets = [0]
        for part in parts:
            self._offsets.append(self._offsets[-1] + len(part))

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = next(i for i in range(len(self.parts)) if index < self._offsets[i + 1])
        return self.parts[part][index - self._offsets[part]]

    def texts(self) -> Iterator[str]:
        for part in self.parts:
            yield from part.texts()
