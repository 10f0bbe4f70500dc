"""Data: the record shape, safe image decoding, sources (COCO, Karpathy, VQAv2, CSV/JSONL, HF datasets,
webdataset), the synthetic scene benchmark, the tokenizer, image transforms, the torch dataset and the collate
function (the map of modules is in the README's Layout section).

Submodules import their heavy dependencies themselves; import what you need from them, e.g.
``from mlm.data.tokenizer import MLMTokenizer``.
"""
