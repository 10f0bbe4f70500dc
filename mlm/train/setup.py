"""Run set-up: mixed-precision choice, the accelerate ``Accelerator`` with trackers, the tokenizer, datasets, model.

Mixed precision ``auto`` means bf16 on CUDA devices that support it, fp16 (with loss scaling) on older CUDA, and
fp32 on every CPU: without native bf16 (AMX or AVX512-BF16) bf16 matmuls are emulated and ~70x slower, and even
with AVX512-BF16 autocast's casts outweigh the faster matmuls at the widths we train on CPU (tiny config: 0.56 s
a step in bf16 against 0.32 s in fp32 on a 2-core AVX512-BF16 machine). ``bf16`` remains a choice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mlm.config import Config, ConfigError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AMX tiles or AVX512-BF16)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_mixed_precision(value: str, device_type: str) -> str:
    """Turn ``train.mixed_precision`` into accelerate's ``no``/``bf16``/``fp16`` for this device."""
    if value == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if value == "fp16" and device_type != "cuda":
        raise ValueError(f"train.mixed_precision=fp16 needs CUDA (this run is on {device_type}); use bf16 or no")
    if value == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "train.mixed_precision=bf16 on a CPU without native bf16 (%s): matmuls are emulated and much slower "
            "than fp32; train.mixed_precision=auto picks fp32 here",
            torch.backends.cpu.get_cpu_capability(),
        )
    return value


def _flat_config(config: Config) -> dict:
    """The config as one level of ``section.key`` values that trackers accept (lists become strings)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config.to_dict())
    return flat


def build_accelerator(config: Config):
    """The Accelerator for this run: precision, trackers (``csv`` and any accelerate tracker name), run folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, ProjectConfiguration

    from mlm.train.tracking import CSVTracker

    t = config.train
    # A multi-process launch (torchrun, `accelerate launch --multi_gpu`) on a machine without CUDA runs DDP on CPU
    # over gloo; accelerate needs to be told, or each process would train alone.
    cpu = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    if not torch.cuda.is_available():
        # accelerate imports DeepSpeed (when installed) while saving; told the device, it does not warn about it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    state = PartialState(cpu=cpu)
    if state.num_processes == 1 and AcceleratorState._shared_state:
        # accelerate keeps one global state per process; a second run in the same process (a notebook, the tests)
        # with other settings would be refused, and with one process there is nothing shared to keep.
        AcceleratorState._reset_state()
    device_type = state.device.type
    output_dir = Path(t.output_dir)
    trackers = [CSVTracker("run", output_dir) if name == "csv" else name for name in t.trackers]
    mixed_precision = resolve_mixed_precision(t.mixed_precision, device_type)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step itself
        dynamo_backend="inductor" if t.compile else None,  # None: accelerate's own config/env decides
    )
    if cpu and accelerator.state.distributed_type == DistributedType.MULTI_CPU:
        _shard_on_cpu(state, accelerator, mixed_precision)
    return accelerator


def _shard_on_cpu(state, accelerator, mixed_precision: str) -> None:
    """Honour an FSDP or DeepSpeed ``accelerate launch`` config on CPU processes.

    accelerate turns both on for accelerator devices only, and on CPU processes would silently train plain DDP.
    FSDP2's ``fully_shard`` and DeepSpeed's CPU accelerator both run over the gloo group accelerate has set up, so
    the plugin the launcher described is installed in accelerate's state (PartialState too: every AcceleratorState()
    copies its fields over its own).
    """
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise ConfigError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 needs CUDA)")
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings of the launch
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)  # as accelerate does for its own FSDP runs
        state.distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* settings of the launch
        plugin.set_mixed_precision(mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.distributed_type = accelerator.state.distributed_type = DistributedType.DEEPSPEED
        accelerator.state.deepspeed_plugins = plugin
    else:
        return
    logger.info("%s on %d CPU processes over gloo", accelerator.state.distributed_type.value,
                accelerator.num_processes)  # fmt: skip


def configure_deepspeed(accelerator, train) -> None:
    """Fit a DeepSpeed run's config to the loop (nothing to do without DeepSpeed)."""
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is None:
        return
    # DeepSpeed steps its engine on every backward, so accumulation would have to live in its own config.
    if train.grad_accum_steps != 1:
        raise ConfigError(
            f"train.grad_accum_steps={train.grad_accum_steps} is not supported under DeepSpeed; "
            "set gradient_accumulation_steps in the DeepSpeed config and train.grad_accum_steps=1"
        )
    deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = train.batch_size  # no prepared loader


def start_trackers(accelerator, config: Config) -> None:
    """Open the run's trackers (metrics.csv, TensorBoard logs/); called when training starts, so a run that fails
    during set-up leaves no log files behind."""
    if config.train.trackers:
        accelerator.init_trackers("tensorboard", config=_flat_config(config))


def build_tokenizer(config: Config, source, accelerator, checkpoint: Path | None):
    """The run's tokenizer: the checkpoint's when resuming, the initial model's when fine-tuning, the teacher's when
    distilling, else built on the main process; shared by file."""
    from mlm.data.tokenizer import MLMTokenizer

    path = Path(config.train.output_dir) / TOKENIZER_FILE
    if checkpoint is not None:
        return MLMTokenizer.from_file(checkpoint / "model" / TOKENIZER_FILE)
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        if config.train.init_from:  # fine-tuning keeps the model's own vocabulary
            from mlm.train import init_from

            tokenizer = init_from.load_tokenizer(config)
            init_from.report_new_words(tokenizer, source.texts())
        elif config.train.distill.teacher:  # a student distils over its teacher's vocabulary
            from mlm.train import distill, init_from

            tokenizer = distill.load_tokenizer(config)
            init_from.report_new_words(tokenizer, source.texts())
        else:
            texts = list(source.texts()) if config.data.tokenizer == "wordpiece" else None
            tokenizer = MLMTokenizer.from_config(config.data.tokenizer, texts, config.data.vocab_size)
        tokenizer.save(path)
    accelerator.wait_for_everyone()
    return MLMTokenizer.from_file(path)


def open_split(config: Config, spec: str, split: str):
    """Open a data source and log its skip table."""
    from mlm.data.sources import open_source

    source = open_source(spec, config.data, split=split)
    if sum(source.stats.skipped.values()) or sum(source.stats.dropped.values()):
        logger.warning("%s", source.stats.table(f"{split} data: {spec}"))
    logger.info("%s data: %d records from %s", split, len(source), spec)
    return source
