"""The training loop on HF accelerate: CoCa-style contrastive + captioning/VQA training of :class:`MLMModel`.

One optimiser step = ``train.grad_accum_steps`` micro-batches of ``train.batch_size`` records per process. The data
order, augmentation and model RNG are functions of (seed, step), and checkpoints hold the rest of the state, so a
run resumed from step k continues exactly as an uninterrupted one. The same code runs on one CPU process, one GPU
or under ``accelerate launch`` (DDP; FSDP and DeepSpeed through accelerate's config files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mlm.compress.qat import prepare_qat
from mlm.config import Config, ConfigError
from mlm.data.dataset import build_dataset
from mlm.data.turns import image_key
from mlm.data.word_targets import resolve_targets, word_documents
from mlm.fusion.matching import match_inputs
from mlm.lora import lora_settings
from mlm.train import checkpoint as ckpt
from mlm.train import comm, distill, init_from, sampler, setup
from mlm.train.guards import NonFiniteGuard, NonFiniteLossError, StopSignal, explain_oom
from mlm.train.losses import ImageTextLoss, learned_words, word_idf
from mlm.train.schedule import TimeFit, build_optimizer, build_scheduler
from mlm.train.tracking import CURVES_PNG, METRICS_CSV, SUMMARY_JSON, peak_memory_mb, plot_curves, write_summary
from mlm.train.trainer_state import TrainerState

logger = logging.getLogger(__name__)

PARTS = ("loss", "contrastive", "caption", "vqa", "words", "match", "exits", "gates", "lens", "distill")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Builds everything a run needs from a Config and trains; ``Trainer(config, resume).fit()`` -> summary."""

    def __init__(self, config: Config, resume: str | None = None, train_dataset=None, val_source=None):
        from accelerate.utils import set_seed

        self.config = config
        t = config.train
        if t.batch_size < 1 or t.grad_accum_steps < 1 or t.max_steps < 1:
            raise ConfigError("train.batch_size, train.grad_accum_steps and train.max_steps must be >= 1")
        self.output_dir = Path(t.output_dir)
        self.accelerator = accel = setup.build_accelerator(config)
        self.checkpoint = ckpt.resolve_resume(self.output_dir, resume)
        set_seed(t.seed, deterministic=t.deterministic)
        if accel.device.type == "cuda" and not t.deterministic:
            torch.backends.cuda.matmul.allow_tf32 = True
        self._build_data(train_dataset, val_source)
        if self.checkpoint is not None:
            self._check_same_model(ckpt.read_trainer_state(self.checkpoint).get("config"))
        self._build_model()
        self.state = TrainerState()
        self.guard = NonFiniteGuard(t.max_nonfinite_steps)
        if self.checkpoint is not None:
            self.state.restore(*ckpt.load_checkpoint(accel, self.checkpoint))
            self.guard.load_state_dict(self.state.nonfinite)
            self._restore_comm_hook()
            logger.info("resumed from %s at step %d", self.checkpoint, self.state.step)
        self.last_checkpoint = str(self.checkpoint) if self.checkpoint else None
        # The config decides the schedule (a checkpoint's scheduler state holds it too); a fitted end stays.
        self._schedule.warmup, self._schedule.total = t.warmup_steps, self.state.max_steps or t.max_steps
        self._time_fit = None
        if t.fit_steps_to_time:
            if t.max_time_s > 0:
                self._time_fit = TimeFit(t)
            else:
                logger.warning("train.fit_steps_to_time: no train.max_time_s to fit; the schedule ends at max_steps")

    def _build_data(self, train_dataset, val_source) -> None:
        """Tokenizer, training dataset, deterministic sampler and the validation subset."""
        from mlm.data.collate import Collate

        c, accel = self.config, self.accelerator
        if train_dataset is None:
            source = setup.open_split(c, c.data.train, "train")
            self.tokenizer = setup.build_tokenizer(c, source, accel, self.checkpoint)
            train_dataset = build_dataset(source, self.tokenizer, c, train=True)
        else:
            self.tokenizer = train_dataset.tokenizer
        c.model.vocab_size = self.tokenizer.vocab_size
        self.dataset = train_dataset
        # build_dataset's fallback for data without captions; saved with the run's config
        targets = resolve_targets(train_dataset.source, c.train.word_targets) if c.train.word_weight else None
        if targets not in (None, c.train.word_targets) and train_dataset.word_targets == targets:
            note = "data.train has no captions; the word objective learns the answers that name a thing"
            logger.warning("train.word_targets=%s: %s (%s)", c.train.word_targets, note, targets)
            c.train.word_targets = targets
        self.collate = Collate(self.tokenizer.pad_id)
        records = train_dataset.source
        self.sampler = sampler.GlobalBatchSampler(
            len(train_dataset), c.train.batch_size, c.train.seed, accel.process_index, accel.num_processes,
            is_vqa=torch.tensor([r.is_vqa for r in records]), vqa_fraction=c.train.vqa_fraction,
            image_keys=[image_key(r) for r in records] if c.train.vqa_same_images else None,
        )  # fmt: skip
        if c.train.hard_negative_sampler:
            texts = [r.captions[0] if r.captions else r.question or "" for r in records]
            self.sampler.set_features(sampler.caption_features(texts))
        self.validator = None
        if c.train.eval_every > 0:
            if val_source is None and not c.data.val:
                raise ConfigError(f"train.eval_every={c.train.eval_every} needs data.val (a validation source)")
            from mlm.train.validation import Validator

            val_source = val_source if val_source is not None else setup.open_split(c, c.data.val, "val")
            self.validator = Validator(c, val_source, self.tokenizer)

    def _check_same_model(self, config: dict | None) -> None:
        """Refuse to resume into a model of another shape (the weights would not fit)."""
        if config is None:
            raise ValueError(f"{self.checkpoint / ckpt.TRAINER_STATE}: no 'config' section to check the model by")
        changed = init_from.model_differences(config["model"], self.config.model)
        if changed:
            raise ConfigError(f"--resume {self.checkpoint}: the model settings differ from the checkpoint's: "
                              + "; ".join(changed))  # fmt: skip

    def _build_model(self) -> None:
        """Model, optimizer, schedule and loss, prepared by accelerate."""
        from mlm.model import MLMModel

        c, accel = self.config, self.accelerator
        model = MLMModel(c.model, tokenizer=self.tokenizer, generation_config=c.eval.decoding())
        if self.checkpoint is None and c.train.init_from:
            init_from.load_weights(model, c)  # fine-tuning: trained weights, fresh optimizer and schedule
        if c.train.lora.rank:
            lora_settings(model, c.train.lora)  # only the adapters train
        if c.train.qat:
            prepare_qat(model)  # same parameter names: checkpoints and --resume are unchanged
        if c.train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        words = word_documents(self.dataset.source, c.train.word_targets) if c.train.word_weight else []
        hint = (
            ""
            if c.train.word_targets == "answers"
            else "; train.word_targets=answers adds the answers that name a thing"
        )
        if c.train.word_weight and not words and model.decoder.grounding is not None:
            model.decoder.grounding.requires_grad_(False)  # a fresh one stays a no-op (its projection starts at 0)
            logger.warning("model.decoder_grounding: frozen; its word maps have no words to learn from (no captions%s)",
                           hint)  # fmt: skip
        if words and model.decoder.grounding is not None and self.checkpoint is None and not c.train.init_from:
            # before accelerate wraps or shards the weights (FSDP, DeepSpeed keep their own copies)
            model.decoder.grounding.start_words(learned_words(self.tokenizer, words))
        model.to(accel.device)
        optimizer = build_optimizer(model, c.train)
        scheduler = build_scheduler(optimizer, c.train)
        self._schedule = scheduler.lr_lambdas[0]  # its end moves with train.fit_steps_to_time
        setup.configure_deepspeed(accel, c.train)
        self.model, self.optimizer, self.scheduler = accel.prepare(model, optimizer, scheduler)
        self.comm_hook = comm.register(self.model, c.train, accel)  # DDP gradients compressed, when asked
        self._relayout = False
        losses = c.train
        if c.train.word_weight and not words:  # questions only (a VQA source): no caption words to predict
            logger.warning(
                "train.word_weight=%g: data.train has no words to learn (no captions%s); the word loss is off",
                losses.word_weight,
                hint,
            )
            losses = dataclasses.replace(c.train, word_weight=0.0)
        idf = word_idf(self.tokenizer, words) if words else None
        self.loss_fn = ImageTextLoss.from_config(losses, accel.process_index, accel.num_processes, idf)
        self.teacher, self.distill_loss = distill.build(c, accel.device)  # (None, ...) without train.distill.teacher

    def _restore_comm_hook(self) -> None:
        """The compressed-gradient hook's residuals of this process, and one re-layout step before training."""
        if self.comm_hook is None:
            return
        comm.restore(self.comm_hook, ckpt.load_process_tensors(self.checkpoint, self.accelerator.process_index),
                     self.config.train.grad_compression)  # fmt: skip
        self._relayout = True

    def _relayout_buckets(self, batches):
        """DDP lays its buckets out anew after a process's first step; take that step uncompressed with zero
        gradients, so the resumed steps see the buckets (and quantization chunks) the interrupted run saw."""
        first = next(batches)
        self.comm_hook.passthrough = True
        self._forward_backward(first, sync=True, scale=0.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.comm_hook.passthrough = False
        yield first
        yield from batches

    @property
    def unwrapped(self):
        """The bare MLMModel (no DDP or compile wrapper)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _micro_batches(self):
        """Endless micro-batches from the resume position: epoch after epoch, each in its seeded order."""
        t = self.config.train
        epoch, start = divmod(self.state.step * t.grad_accum_steps, len(self.sampler))
        items = sampler.SeededItems(self.dataset, t.seed)
        workers = self.config.data.num_workers
        while True:
            self._group_epoch(epoch, resumed_inside=start > 0)
            loader = DataLoader(
                items,
                batch_sampler=self.sampler.keyed_batches(epoch, start),
                collate_fn=self.collate,
                num_workers=workers,
                pin_memory=self.accelerator.device.type == "cuda",
                prefetch_factor=4 if workers else None,
            )
            for batch in loader:
                yield _to_device(batch, self.accelerator.device)
            epoch, start = epoch + 1, 0

    def _group_epoch(self, epoch: int, resumed_inside: bool) -> None:
        """Hard-negative sampler: epoch 0 groups by caption overlap, later epochs by the model's text embeddings
        at the epoch's start (kept in the checkpoint, so a resume inside the epoch reuses them)."""
        if not self.config.train.hard_negative_sampler or epoch == 0:
            return
        if not (resumed_inside and self.state.grouping is not None):
            texts = [r.captions[0] if r.captions else r.question or "" for r in self.dataset.source]
            c, accel = self.config, self.accelerator
            self.state.grouping = sampler.text_embeddings(self.unwrapped, self.tokenizer, texts, c.eval.batch_size,
                c.model.max_text_len, accel.device, accel.process_index, accel.num_processes)  # fmt: skip
        self.sampler.set_features(self.state.grouping.float())

    def _any(self, *flags: bool) -> list[bool]:
        """For each flag: True when it holds on any process (one tiny all-gather), so all processes act alike."""
        if self.accelerator.num_processes == 1:
            return list(flags)
        value = torch.tensor([float(f) for f in flags], device=self.accelerator.device)  # (k,)
        return self.accelerator.gather(value).view(-1, len(flags)).amax(0).bool().tolist()

    def _forward_backward(self, batch: dict, sync: bool, scale: float) -> torch.Tensor | None:
        """One micro-batch; returns the loss parts (len(PARTS),), or None when a process saw a non-finite loss."""
        accel = self.accelerator
        with contextlib.nullcontext() if sync else accel.no_sync(self.model):
            with accel.autocast():
                out = self.model(batch["images"], batch["text_ids"], batch["text_mask"],
                                 batch.get("negative_ids"), batch.get("negative_mask"),
                                 match_inputs(batch) if self.config.train.match_weight else None)  # fmt: skip
                loss, parts = distill.add_distillation(self.teacher, self.distill_loss, out, batch,
                                                       *self.loss_fn(out, batch))  # fmt: skip
            if self._any(not bool(torch.isfinite(loss.detach())))[0]:
                return None
            accel.backward(loss * scale)
        return torch.stack([loss.detach().float()] + [parts[name].float() for name in PARTS[1:]])

    def train_step(self, batches) -> torch.Tensor | None:
        """One optimizer step over grad_accum_steps micro-batches; None when it was skipped as non-finite."""
        t, accel = self.config.train, self.accelerator
        totals: torch.Tensor | None = torch.zeros(len(PARTS), device=accel.device)
        for micro in range(t.grad_accum_steps):
            batch = next(batches)  # consumed even after a bad micro-batch, to keep the data position
            if totals is None:
                continue
            # Dropout and any other model randomness: a function of (seed, step, micro-batch, process).
            sampler.seed_everything(sampler.seed_for(t.seed, self.state.step, micro, accel.process_index, 1))
            parts = self._forward_backward(batch, micro == t.grad_accum_steps - 1, 1.0 / t.grad_accum_steps)
            totals = None if parts is None else totals + parts / t.grad_accum_steps
        if totals is not None:
            # max_norm=inf still measures the norm, so non-finite gradients are caught with clipping off too.
            max_norm = t.clip_grad_norm if t.clip_grad_norm > 0 else math.inf
            norm = accel.clip_grad_norm_(self.model.parameters(), max_norm)  # None: DeepSpeed clips itself
            # With fp16 the grad scaler handles overflow itself (skips and lowers the scale); otherwise skip here.
            if accel.scaler is None and norm is not None and not math.isfinite(float(norm)):
                totals = None
        if totals is not None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return totals

    # ---- saving, logging, evaluation -------------------------------------------------------------------------

    def save(self) -> str:
        """Write a checkpoint for the current step (every process calls this)."""
        self.state.nonfinite = self.guard.state_dict()
        self.state.elapsed_s = self._elapsed()
        readable = {**self.state.progress(), "samples": self.samples_seen, "config": self.config.to_dict()}
        own = comm.tagged_state(self.comm_hook, self.config.train.grad_compression) if self.comm_hook else None
        path = ckpt.save_checkpoint(self.accelerator, self.model, self.output_dir, self.state.step, readable,
                                    self.config.train.keep_last, self.state.tensors(), own)  # fmt: skip
        self.last_checkpoint = str(path)
        return self.last_checkpoint

    @property
    def global_batch(self) -> int:
        """Records per optimizer step over all processes."""
        t = self.config.train
        return t.batch_size * t.grad_accum_steps * self.accelerator.num_processes

    @property
    def samples_seen(self) -> int:
        """Training records consumed so far (all processes)."""
        return self.state.step * self.global_batch

    def evaluate(self) -> dict[str, float]:
        """Validation metrics on the main process (the others wait); empty without a validator."""
        metrics: dict[str, float] = {}
        if self.validator is not None and self.accelerator.is_main_process:
            metrics = self.validator(self.unwrapped, self.accelerator.device, self.accelerator.autocast)
            logger.info("step %d validation: %s", self.state.step, {k: round(v, 2) for k, v in metrics.items()})
        self.accelerator.wait_for_everyone()
        return metrics

    def _reset_interval(self) -> None:
        """Start a new logging interval: loss sums over applied steps, step count, pure training seconds."""
        self._sums = torch.zeros(len(PARTS), device=self.accelerator.device)
        self._applied, self._steps, self._train_s = 0, 0, 0.0
        self._bytes_before = getattr(self.comm_hook, "bytes_sent", 0)

    def _log(self) -> dict[str, float]:
        """Log the mean loss parts of the interval's applied steps, the lr and the training throughput."""
        values = {}
        if self._applied:  # every process applied the same steps, so all take this branch (reduce is collective)
            means = self.accelerator.reduce(self._sums / self._applied, reduction="mean").tolist()
            values = {("loss" if name == "loss" else f"loss/{name}"): v for name, v in zip(PARTS, means, strict=True)}
        values["lr"] = self.scheduler.get_last_lr()[0]
        values["samples_per_s"] = self.global_batch * self._steps / max(self._train_s, 1e-9)
        values["skipped_steps"] = self.guard.skipped
        if self.comm_hook is not None:  # payload this process sent per step (compressed gradients)
            values["grad_bytes_per_step"] = (self.comm_hook.bytes_sent - self._bytes_before) / max(self._steps, 1)
            if (drift := self.comm_hook.drift()) is not None:  # error carried, in steps' worth of gradient
                values["grad_drift"] = drift
        self.accelerator.log(values, step=self.state.step)
        loss = f"{values['loss']:.3f}" if "loss" in values else "skipped"
        lr, sps = values["lr"], values["samples_per_s"]
        self._bar.set_postfix(loss=loss, lr=f"{lr:.2e}", samples_s=f"{sps:.0f}", refresh=False)
        return values if self._applied else {**self._last, **values}

    def _elapsed(self) -> float:
        """Training seconds of this run, earlier sessions included."""
        return self._elapsed_before + time.perf_counter() - self._started

    def _stop_reason(self, stop: StopSignal) -> str | None:
        """Why to stop after this step (agreed by all processes), or None to go on."""
        limit = self.config.train.max_time_s
        signalled, out_of_time = self._any(stop.requested, limit > 0 and self._elapsed() >= limit)
        return "interrupted" if signalled else "time limit" if out_of_time else None

    # ---- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to ``train.max_steps`` (or the time limit, or a stop signal); return the run summary."""
        accel, t = self.accelerator, self.config.train
        if accel.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.output_dir / "config.yaml")
        setup.start_trackers(accel, self.config)
        self._elapsed_before, self._started = self.state.elapsed_s, time.perf_counter()
        status, self._last, self._metrics = "completed", {}, {}
        batches = self._micro_batches()
        if self._relayout:
            batches = self._relayout_buckets(batches)
        self._reset_interval()
        self._bar = tqdm(
            total=self._schedule.total, initial=self.state.step, disable=not accel.is_main_process, desc="train"
        )
        with StopSignal() as stop, explain_oom(self.config):
            try:
                while self.state.step < self._schedule.total:
                    self._one_step(batches)
                    status = self._stop_reason(stop) or status
                    if status != "completed":
                        break
            except NonFiniteLossError:
                self._finish("non-finite loss", save=False)
                raise
        if status != "interrupted" and self.validator is not None and self.state.step % t.eval_every:
            self._evaluate_and_log()
        return self._finish(status, save=True)

    def _one_step(self, batches) -> None:
        """Train one step, then log, evaluate and save on their schedules."""
        t = self.config.train
        tick = time.perf_counter()
        parts = self.train_step(batches)
        self._train_s += time.perf_counter() - tick
        self._steps += 1
        self.state.step += 1
        if self._time_fit is not None:
            self._fit_schedule()
        if self.guard.update(parts is not None, self.state.step, self.last_checkpoint):
            self._sums, self._applied = self._sums + parts, self._applied + 1
        if self.state.step % t.log_every == 0:
            self._last = self._log()
            self._reset_interval()
        self._bar.update(1)
        if t.eval_every and self.state.step % t.eval_every == 0:
            self._evaluate_and_log()
        if t.save_every and self.state.step % t.save_every == 0:
            if self.guard.consecutive:
                logger.warning("step %d: no checkpoint saved during a run of non-finite steps", self.state.step)
            else:
                self.save()

    def _fit_schedule(self) -> None:
        """When a measurement is due, end the schedule at the steps that fit train.max_time_s at the latest pace."""
        elapsed = self._elapsed()
        pace = self._time_fit.pace(self.state.step, elapsed)
        if pace is None:
            return
        pace = float(self.accelerator.gather(torch.tensor([pace], device=self.accelerator.device)).max())
        total = self._time_fit.total(self.state.step, elapsed, pace)
        if total != self._schedule.total:
            logger.info("train.fit_steps_to_time: at step %d, %.3f s a step: the schedule ends at step %d",
                        self.state.step, pace, total)  # fmt: skip
        self._schedule.total = self.state.max_steps = total
        self._bar.total = total

    def _evaluate_and_log(self) -> None:
        self._metrics = self.evaluate()
        self.accelerator.log(self._metrics, step=self.state.step)

    def _finish(self, status: str, save: bool) -> dict:
        """Final checkpoint, summary.json, curve PNG and tracker shutdown."""
        accel, last = self.accelerator, self._last
        self._bar.close()
        if save:
            self.save()
        self.state.elapsed_s = self._elapsed()
        summary = {
            "status": status,
            "steps": self.state.step,
            "schedule_steps": self._schedule.total,
            "samples": self.samples_seen,
            "time_s": round(self.state.elapsed_s, 2),
            "samples_per_s": round(self.samples_seen / max(self.state.elapsed_s, 1e-9), 2),
            "final_losses": {k: v for k, v in last.items() if k.startswith("loss")},
            "final_lr": last.get("lr"),
            "skipped_steps": self.guard.skipped,
            "validation": self._metrics,
            "last_checkpoint": self.last_checkpoint,
            "processes": accel.num_processes,
            "distributed": str(accel.distributed_type.value),  # NO, MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
            "grad_bytes_sent": getattr(self.comm_hook, "bytes_sent", None),  # by this process, compressed hooks
            "global_batch": self.global_batch,
            "mixed_precision": accel.mixed_precision,
            **peak_memory_mb(accel.device),
        }
        if accel.is_main_process:
            write_summary(self.output_dir / SUMMARY_JSON, summary)
            if (self.output_dir / METRICS_CSV).exists():
                plot_curves(self.output_dir / METRICS_CSV, self.output_dir / CURVES_PNG)
        accel.end_training()
        if status == "interrupted":
            logger.warning("stopped by a signal at step %d; resume with --resume latest", self.state.step)
        return summary


def train(config: Config, resume: str | None = None) -> dict:
    """Train a model as the config says (``--resume latest|DIR`` continues a run); return the summary."""
    return Trainer(config, resume).fit()
