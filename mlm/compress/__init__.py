"""Model compression for deployment: post-training dynamic INT8 (:mod:`mlm.compress.int8`)."""
