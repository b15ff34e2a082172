"""Joint multi-level (DSNN) fine-tuning and dense training from scratch: the training loop.

One optimizer step runs the batch at several levels on the *shared* weights: for level ``k`` the forward uses
``weight * (code >= k)`` (``torch.func.functional_call`` over :func:`~dsnn_compress.core.masked.masked_parameters`), so
a pruned weight gets gradient only from the levels where it is alive. The weighted per-level losses are summed
(one backward per level, so only one graph is alive at a time). Optional in-place distillation adds
``weight * T^2 * KL(dense || level)`` on frame posteriors, the dense output detached. Optional gradual pruning
recomputes the codes from current magnitudes on a cubic schedule; nesting holds by the code encoding.

The run is a :class:`Finetuner`, shaped like torchtune's recipe classes: :meth:`~Finetuner.setup` (device, process
group, model, optimizer, data, resume), :meth:`~Finetuner.train` (the loop), :meth:`~Finetuner.train_step`,
:meth:`~Finetuner.evaluate`, :meth:`~Finetuner.checkpoint` and :meth:`~Finetuner.finish`; :func:`finetune` runs
them in order. The pieces around it live in their own modules: :mod:`.ddp` (collectives), :mod:`.state` (the
resumable :class:`~.state.TrainState`), :mod:`.output` (result file and JSONL log), :mod:`.batches` (data stream).

Everything random is derived from ``(seed, step)`` or saved in the training state, so ``--resume`` after a crash
reproduces the uninterrupted run. Under ``torchrun`` every rank takes its share of each global batch, gradients
are all-reduced (averaged), codes are broadcast from rank 0, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import StagedOutputs
from ..core import masked
from ..core.continuous import keep_masks
from ..core.levels import level_label
from ..core.schedule import lr_at, sample_continuous, sample_levels, should_update_codes
from ..data.batch import Batch
from ..data.manifest import read_manifest
from ..data.prepare import PreparedData, prepare_data
from ..data.text import normalize_text
from ..errors import DsnnError, UsageError
from ..evaluation.scoring import word_errors
from ..models.base import AdapterRunner
from .batches import BatchStream, augment
from .ddp import average_gradients, average_losses, barrier, broadcast_tensors, init_distributed, resolve_device
from .model_setup import ModelSetup, build_model, scheduled_codes
from .output import JsonlLog, RunOutput, log_path
from .recipe import Recipe, check_loss_weights, check_schedule_end
from .state import TrainState, state_path
from .teacher import Teacher, check_compatible

__all__ = ["FinetuneResult", "Finetuner", "Reporter", "dev_wer", "finetune", "log_path", "state_path"]

Reporter = Callable[[str, dict[str, Any]], None]


@dataclass
class FinetuneResult:
    """What a training run produced."""

    output: Path
    steps: int
    levels: tuple[float, ...]
    final_losses: dict[str, float]
    dev_wer: list[float] | None
    seconds: float
    forward_passes: int
    log: Path


def finetune(recipe: Recipe, resume: bool = False, force: bool = False, report: Reporter | None = None,
             stop_after: int | None = None, verify: bool = True) -> FinetuneResult:
    """Run the recipe: joint multi-level training (or dense training when there are no levels).

    ``report(event, data)`` receives ``start``, ``step``, ``tick``, ``eval``, ``checkpoint`` and ``end`` events (rank 0
    only). ``stop_after`` ends the process's loop early after that many total steps without writing the final output
    (used to simulate a crash in tests; the periodic checkpoint stays). ``verify`` checks the checksums of the
    starting bundle or checkpoint (``model.init``) when it has them.
    """
    run = Finetuner(recipe, report, verify)
    try:
        run.setup(resume=resume, force=force)
        run.train(stop_after)
        return run.finish()
    except BaseException as exc:
        run.abandon(exc)
        raise


def dev_wer(runner: AdapterRunner, params: dict[str, torch.Tensor], codes: dict[str, torch.Tensor], num_levels: int,
            dev: PreparedData, batch_size: int = 16) -> list[float]:
    """Greedy WER per level on prepared dev data (model in eval mode for the duration)."""
    from ..data.batch import pad_batch

    adapter = runner.adapter
    normalizer = adapter.normalizer
    was_training = adapter.model.training
    adapter.model.eval()
    wers = []
    with torch.no_grad():
        for index in range(num_levels + 1):
            hyps: list[str] = []
            for start in range(0, len(dev.ids), batch_size):
                waves = dev.waveforms[start:start + batch_size]
                batch = pad_batch([adapter.prepare(w) for w in waves], [[] for _ in waves], ["" for _ in waves],
                                  dev.ids[start:start + batch_size])
                hyps.extend(normalize_text(h, normalizer)
                            for h in masked.run_at_level(runner, params, codes, index, batch, "decode"))
            wers.append(word_errors(dev.references, hyps).rate)
    adapter.model.train(was_training)
    return wers


# ----------------------------------------------------------------------------------------------- the run


class Finetuner:
    """One training run: ``setup()``, ``train()``, ``finish()``. Only rank 0 writes files and reports."""

    model_setup: ModelSetup
    levels: tuple[float, ...]
    labels: list[str]  # level index -> "dense" / "0.7", the keys of losses and dev WERs in logs and files
    weights: list[float]
    distill: float
    model: torch.nn.Module
    codes: dict[str, torch.Tensor]
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    data: BatchStream
    total_steps: int
    dev: PreparedData | None
    runner: AdapterRunner
    log: JsonlLog
    teacher: Teacher | None
    labels_from_teacher: bool
    label_weight: float

    def __init__(self, recipe: Recipe, report: Reporter | None = None, verify: bool = True) -> None:
        self.started = time.perf_counter()
        self.verify = verify
        self.recipe, self.cfg = recipe, recipe.training
        device = resolve_device(self.cfg.device)
        self.dist = init_distributed(device)
        self.device = self.dist.rank_device(device)
        self.out = RunOutput(Path(recipe.output), recipe)
        self.emit: Reporter = report if (report is not None and self.dist.main) else (lambda _e, _d: None)
        self.step, self.skipped, self.forward_passes = 0, 0, 0
        self.best: dict[str, Any] | None = None
        self.last_losses: dict[str, float] = {}
        self.last_dev: list[float] | None = None

    # ------------------------------------------------------------------------------------------- setup

    def setup(self, resume: bool = False, force: bool = False) -> None:
        """Check the outputs; build model, optimizer and data; restore the state (``resume``) or seed; announce."""
        recipe, cfg = self.recipe, self.cfg
        if self.dist.main:
            self.out.check(resume, force)
        self.model_setup = build_model(recipe, self.verify)
        adapter, self.levels = self.model_setup.adapter, self.model_setup.levels
        self.labels = [level_label(level) for level in (0.0, *self.levels)]
        self.weights = check_loss_weights(recipe.sampling.loss_weights, len(self.levels))
        self.distill = recipe.distillation.weight if recipe.distillation.enabled and self.levels else 0.0
        self.model = adapter.model.to(self.device)
        self.codes = {n: c.to(self.device) for n, c in self.model_setup.codes.items()}
        self.params = dict(self.model.named_parameters())
        self.optimizer = self._optimizer()
        self.data = BatchStream(recipe, adapter, self.dist)
        self._setup_teacher()
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * self.data.per_epoch))
        check_schedule_end(recipe.schedule, self.total_steps)
        self.dev = self._dev_data()
        if resume:
            self._restore(TrainState.load(self.out.state_file))
        else:
            torch.manual_seed(cfg.seed)
        broadcast_tensors([*self.params.values(), *self.codes.values()], self.dist)
        self.runner = AdapterRunner(adapter)
        self.model.train()
        self.log = JsonlLog.open(self.out.log_file, resume, self.step) if self.dist.main else JsonlLog()
        self.emit("start", {"steps": self.total_steps, "start_step": self.step, "levels": list(self.levels),
                            "teacher": None if self.teacher is None else str(self.teacher.path),
                            "labels": "teacher" if self.labels_from_teacher else "transcripts",
                            "world": self.dist.world, "per_epoch": self.data.per_epoch,
                            "params": sum(p.numel() for p in self.params.values()), "device": str(self.device),
                            "log": str(self.out.log_file)})

    def _setup_teacher(self) -> None:
        """The frozen teacher of ``distillation.teacher`` and where the label loss takes its targets from."""
        distill = self.recipe.distillation
        self.teacher, self.labels_from_teacher, self.label_weight = None, False, distill.label_weight
        self.teacher_checked = False
        if distill.teacher is None:
            return
        self.teacher = Teacher(Path(distill.teacher), self.model_setup.adapter, self.device, self.verify)
        self.labels_from_teacher = distill.labels == "teacher" or (distill.labels == "auto"
                                                                   and not self.data.transcribed)
        if self.labels_from_teacher and not self.teacher.seq2seq:
            # a CTC student learns the teacher's frame posteriors; greedy CTC pseudo-labels would add nothing
            self.label_weight = 0.0
            if distill.teacher_weight == 0:
                raise UsageError("without transcripts a CTC student learns only the teacher's posteriors, but "
                                 "distillation.teacher_weight is 0", "set distillation.teacher_weight above 0")

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on the >= 2-D weights only."""
        opt = self.recipe.optimizer
        decay = [p for p in self.params.values() if p.dim() >= 2]
        no_decay = [p for p in self.params.values() if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)

    def _dev_data(self) -> PreparedData | None:
        data, adapter = self.recipe.data, self.model_setup.adapter
        if data.dev is None:
            return None
        utterances = read_manifest(data.dev)
        if data.max_dev_utterances:
            utterances = utterances[: data.max_dev_utterances]
        return prepare_data(utterances, adapter.sample_rate, adapter.encode_text, adapter.normalizer, skip_bad=True)

    def _restore(self, state: TrainState) -> None:
        """Continue an interrupted run from its state: weights, codes, optimizer, RNGs and data position."""
        if state.recipe != json.dumps(self.recipe.to_dict(), sort_keys=True):
            raise UsageError("the recipe differs from the one the training state was made with",
                             "resume with the same recipe and options, or start over with --force")
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.model.items()})
        self.codes = {n: c.to(self.device) for n, c in state.codes.items()}
        self.optimizer.load_state_dict(state.optimizer)
        state.restore_rng(self.device)
        self.step, self.best, self.skipped = state.step, state.best, state.skipped
        self.data.seek(state.epoch, state.position)

    # ------------------------------------------------------------------------------------------- the loop

    def train(self, stop_after: int | None = None) -> None:
        """Train to the last step, evaluating and checkpointing on schedule (``stop_after``: stop at that step)."""
        cfg, schedule = self.cfg, self.recipe.schedule
        limit = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        tick, window = time.perf_counter(), 0
        while self.step < limit:
            batch = self.data.next_batch()
            self.skipped += len(batch.skipped)
            if self.levels and should_update_codes(self.step, schedule):
                self.update_codes()
            if len(batch) == 0:
                continue
            lr, losses, grad_norm = self.train_step(batch)
            self.step += 1
            window += 1
            self.last_losses = {self.labels[i] if isinstance(i, int) else i: v for i, v in losses.items()}
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                self._record("step", {"step": self.step, "epoch": self.data.epoch, "lr": lr, "loss": self.last_losses,
                                      "grad_norm": grad_norm, "steps_per_s": window / max(now - tick, 1e-9),
                                      "skipped": self.skipped})
                tick, window = now, 0
            else:
                self.emit("tick", {"step": self.step, "loss": self.last_losses, "lr": lr})
            if self.dev is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                         or self.step == self.total_steps):
                self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self.checkpoint()

    def update_codes(self) -> None:
        """Gradual pruning: rank 0 recomputes the codes from the current magnitudes and broadcasts them."""
        if self.dist.main:
            self.codes = scheduled_codes(self.model_setup.adapter, self.codes, self.levels, self.recipe, self.step,
                                         self.model_setup.groups, self.model_setup.allocation)
        broadcast_tensors(list(self.codes.values()), self.dist)

    def continuous_masks(self) -> list[dict[str, torch.Tensor]]:
        """Keep-masks of the continuous levels the ``uniform`` sampling mode trains at this step (else none).

        ``sampling.random_levels`` levels are drawn uniformly from ``(0, largest)``; each mask comes from
        :func:`~dsnn_compress.core.continuous.keep_masks` on the current codes and the *current* weights'
        magnitudes, which is how ``evaluate``/``transcribe`` serve that level from the bundle written at the end
        (its stored weights are the trained weights). The masks are rebuilt every step since the weights move.
        """
        sampling = self.recipe.sampling
        if sampling.mode != "uniform" or not self.levels:
            return []
        allocation = self.model_setup.base_metadata.get("allocation", self.recipe.allocation)
        tensors = {n: self.params[n].detach() for n in self.codes}
        values = sample_continuous(self.levels[-1], sampling.random_levels, self.cfg.seed, self.step)
        return [keep_masks(tensors, self.codes, self.levels, value, allocation) for value in values]

    def train_step(self, batch: Batch) -> tuple[float, dict[int | str, float], float | None]:
        """One optimizer step on ``batch`` at the sampled levels. Returns the LR, loss per level index, grad norm."""
        recipe, cfg = self.recipe, self.cfg
        if recipe.data.spec_augment:
            batch = augment(batch, cfg.seed + self.dist.rank, self.step)
        batch = batch.to(self.device)
        lr = lr_at(self.step, recipe.optimizer.lr, recipe.lr_schedule, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        indices = sample_levels(len(self.levels), recipe.sampling.mode, recipe.sampling.random_levels, cfg.seed,
                                self.step)
        extra = self.continuous_masks()
        teacher_scores = None
        if self.teacher is not None:
            if self.labels_from_teacher:
                batch = self.teacher.labelled(batch)
            teacher_scores = self.teacher.scores(batch)
            if not self.teacher_checked:
                with torch.no_grad():
                    check_compatible(teacher_scores, self.runner(batch, "loss")[1], self.teacher.path)
                self.teacher_checked = True
        plan = masked.StepPlan(indices, self.weights, self.distill, recipe.distillation.temperature, extra,
                               teacher_scores, recipe.distillation.teacher_weight if teacher_scores is not None
                               else 0.0, self.label_weight)
        self.optimizer.zero_grad(set_to_none=True)
        losses = masked.train_step(self.runner, self.params, self.codes, batch, plan)
        self.forward_passes += masked.passes_per_step(plan)
        average_gradients(self.params.values(), self.dist)
        losses = average_losses(losses, self.dist, self.device)
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip))
        self.optimizer.step()
        return lr, losses, grad_norm

    def evaluate(self) -> None:
        """Dev WER per level on rank 0 (logged and reported); keep=best remembers the best step's weights."""
        if self.dist.main:
            self.last_dev = dev_wer(self.runner, self.params, self.codes, len(self.levels), self.dev)
            self._record("eval", {"step": self.step, "dev_wer": self._labelled(self.last_dev)})
            self._consider_best(self.last_dev)
        barrier(self.dist)

    def _consider_best(self, wers: list[float]) -> None:
        # with the gradual schedule only steps after end_step run at the target sparsities; an earlier,
        # less sparse step would win on dev WER but does not hold the levels the bundle declares
        schedule = self.recipe.schedule
        at_target = not schedule.enabled or self.step > schedule.end_step
        mean = sum(wers) / len(wers)
        if self.cfg.keep == "best" and at_target and (self.best is None or mean < self.best["metric"]):
            self.best = {"metric": mean, "step": self.step, "dev_wer": list(wers),
                         "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                         "codes": {n: c.cpu().clone() for n, c in self.codes.items()}}

    def checkpoint(self) -> None:
        """Rank 0 writes the training state and the current result file, so a crash can ``--resume``."""
        if self.dist.main:
            with StagedOutputs() as staged:  # the state and its result replace the previous pair together
                self.snapshot().save(staged.file(self.out.state_file))
                self._write_result(self.last_dev, path=staged.file(self.out.path))
            self.log.publish()  # from now on the state, the result and the log make a run that --resume continues
            self.emit("checkpoint", {"step": self.step, "path": str(self.out.state_file)})
            self.log.write({"event": "checkpoint", "step": self.step})
        barrier(self.dist)

    def snapshot(self) -> TrainState:
        """The resumable state at the end of the current step."""
        return TrainState(
            recipe=json.dumps(self.recipe.to_dict(), sort_keys=True),
            model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            codes={n: c.cpu() for n, c in self.codes.items()}, optimizer=self.optimizer.state_dict(),
            **TrainState.rng_states(self.device), step=self.step, epoch=self.data.epoch,
            position=self.data.position, best=self.best, skipped=self.skipped)

    # ------------------------------------------------------------------------------------------- the end

    def finish(self) -> FinetuneResult:
        """Write the result (the best step's weights with keep=best), drop the state file, close the log.

        A run stopped early by ``stop_after`` writes nothing more: its last checkpoint stays, as after a crash.
        """
        if self.step < self.total_steps:
            self.log.discard()  # an unpublished log (no checkpoint yet) has nothing to resume; a published one stays
            return self.result()
        if self.dist.main:
            best = self.best if self.cfg.keep == "best" else None
            if best is not None:
                self.model.load_state_dict({k: v.to(self.device) for k, v in best["model"].items()})
                self.codes = {n: c.to(self.device) for n, c in best["codes"].items()}
            # the log's last record first: a failure then leaves no result without its log (all or nothing)
            self.log.write({"event": "end", "step": self.step, "output": str(self.out.path)})
            # with keep=best the bundle holds the best step's weights: record that step's dev WER, not the last one
            self._write_result(best.get("dev_wer", self.last_dev) if best is not None else self.last_dev,
                               best_step=self.best["step"] if self.best else None)
            self.log.publish()
            self.log.close()
            if self.out.state_file.exists():
                self.out.state_file.unlink()
            self.emit("end", {"output": str(self.out.path), "steps": self.step, "dev_wer": self.last_dev})
        barrier(self.dist)
        return self.result()

    def abandon(self, exc: BaseException) -> None:
        """After a failure: leave nothing new, unless a checkpoint of this run can be resumed.

        Before the run's first checkpoint the unpublished log is removed (the state and its result are written only
        at checkpoints, together: :class:`~dsnn_compress.atomic.StagedOutputs`), so the failed run leaves no file.
        After one, the state, its result and the log stay for ``--resume``, and an error reported to the user says so.
        """
        log = getattr(self, "log", None)
        if log is None:
            return
        resumable = log.pending is None and self.out.state_file.is_file()
        log.discard()
        if resumable and isinstance(exc, DsnnError) and self.dist.main:
            note = f"the training state {self.out.state_file} is kept: rerun with --resume to continue"
            exc.hint = f"{exc.hint}; {note}" if exc.hint else note

    def result(self) -> FinetuneResult:
        """The run's outcome so far."""
        return FinetuneResult(self.out.path, self.step, self.levels, self.last_losses, self.last_dev,
                              time.perf_counter() - self.started, self.forward_passes, self.out.log_file)

    # ------------------------------------------------------------------------------------------- helpers

    def _labelled(self, values: list[float]) -> dict[str, float]:
        return {self.labels[i]: v for i, v in enumerate(values)}

    def _record(self, event: str, fields: Mapping[str, Any]) -> None:
        record = {"event": event, **fields}
        self.log.write(record)
        self.emit(event, record)

    def _write_result(self, dev: list[float] | None, best_step: int | None = None, path: Path | None = None) -> None:
        training = {"steps": self.step, "final_loss": self.last_losses, "world_size": self.dist.world,
                    "best_step": best_step, "dev_wer": None if dev is None else self._labelled(dev)}
        self.out.write(self.model_setup, self.codes, training, path)
