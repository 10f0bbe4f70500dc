"""``mlm export CHECKPOINT --out DIR [--merge-lora]``: write a trained model as one self-contained model folder.

The checkpoint may be a model, checkpoint or run folder (a run folder means its latest checkpoint). With
``--merge-lora`` the LoRA adapters of a ``train.lora`` run are folded into the weights and the folder holds a plain
model (config.json, generation_config.json, model.safetensors, tokenizer.json) that loads without PEFT's files.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` command."""
    parser = sub.add_parser("export", help="write a trained model as a model folder (optionally merging LoRA)")
    parser.add_argument("checkpoint", help="model folder, checkpoint step_* folder or run folder")
    parser.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load, optionally merge, save; print what was written."""
    from mlm.lora import has_lora, merge_lora
    from mlm.model import MLMModel
    from mlm.run_folder import resolve_checkpoint

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: already exists and is not an empty folder; choose a new one")
    folder = resolve_checkpoint(args.checkpoint)
    model = MLMModel.from_pretrained(str(folder))
    adapted = has_lora(model)
    if args.merge_lora:
        if adapted:
            merge_lora(model)
        else:
            logger.warning("%s has no LoRA adapters; exporting it unchanged", folder)
    model.save_pretrained(out)
    if args.merge_lora and adapted:
        kind = "LoRA adapters merged into the weights"
    else:
        kind = "with its LoRA adapters" if adapted else "plain"
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out} from {folder} ({kind}; {sum(p.numel() for p in model.parameters()):,} parameters): {files}")
    return 0
