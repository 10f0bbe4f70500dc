"""Model compression for deployment: post-training dynamic INT8 (:mod:`mlm.compress.int8`)."""

ENGINES = ("torchao", "fbgemm")  # INT8 kernels; here so that argument parsers need not import torch
