"""Evaluation metrics: image-text retrieval, VQAv2 accuracy, COCO caption metrics, and reports.

Everything here scores predictions or embeddings; running a model to produce them is the caller's job.
"""

from mlm.eval.captioning import caption_metrics, load_caption_results, load_coco_captions
from mlm.eval.plots import plot_vqa_types
from mlm.eval.report import write_report
from mlm.eval.retrieval import retrieval_metrics, topk_indices
from mlm.eval.vqa import load_vqa_annotations, load_vqa_results, normalize_answer, rank_answers, vqa_accuracy

__all__ = [
    "caption_metrics",
    "load_caption_results",
    "load_coco_captions",
    "load_vqa_annotations",
    "load_vqa_results",
    "normalize_answer",
    "plot_vqa_types",
    "rank_answers",
    "retrieval_metrics",
    "topk_indices",
    "vqa_accuracy",
    "write_report",
]
