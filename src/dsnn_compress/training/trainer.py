"""Joint multi-level (DSNN) fine-tuning, dense training from scratch, checkpoints/resume and DDP.

One optimizer step runs the batch at several levels on the *shared* weights: for level ``k`` the forward uses
``weight * (code >= k)`` (``torch.func.functional_call`` over :func:`~dsnn_compress.core.masked.masked_parameters`), so
a pruned weight gets gradient only from the levels where it is alive. The weighted per-level losses are summed
(one backward per level, so only one graph is alive at a time). Optional in-place distillation adds
``weight * T^2 * KL(dense || level)`` on frame posteriors, the dense output detached. Optional gradual pruning
recomputes the codes from current magnitudes on a cubic schedule; nesting holds by the code encoding.

Everything random is derived from ``(seed, step)`` or saved in the training state, so ``--resume`` after a crash
reproduces the uninterrupted run. Under ``torchrun`` every rank takes its share of each global batch, gradients
are all-reduced (averaged), codes are broadcast from rank 0, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import tool_metadata
from ..atomic import atomic_path
from ..core.bundle import Bundle, save_bundle
from ..core.masked import passes_per_step, run_at_level, train_step
from ..core.schedule import lr_at, sample_levels, should_update_codes
from ..data.batch import Batch
from ..data.dataset import SpeechDataset, bucket_batches, collate, utterance_lengths
from ..data.features import spec_augment
from ..data.manifest import read_manifest
from ..data.prepare import prepare_data
from ..data.text import normalize_text
from ..errors import DsnnError, UsageError
from ..evaluation.scoring import word_errors
from ..models.base import AdapterRunner
from .model_setup import ModelSetup, build_model, scheduled_codes
from .recipe import Recipe, schedule_end_too_late

STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Rank layout of this process (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the rank that writes files and prints."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _broadcast_tensors(tensors: Sequence[torch.Tensor], dist_info: DistInfo) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def _average_gradients(params: Sequence[nn.Parameter], dist_info: DistInfo) -> None:
    if dist_info.world <= 1:
        return
    import torch.distributed as dist

    for param in params:
        if not param.requires_grad:
            continue  # frozen (e.g. a Hugging Face feature encoder): no gradient, so no weight decay either
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= dist_info.world


def _average_losses(losses: dict[int, float], dist_info: DistInfo, device: torch.device) -> dict[int, float]:
    """Each level's loss averaged over the ranks (all train the same levels), so logs show the global batch."""
    if dist_info.world <= 1 or not losses:
        return losses
    import torch.distributed as dist

    keys = sorted(losses)
    values = torch.tensor([losses[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: v / dist_info.world for k, v in zip(keys, values.tolist())}


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------- model setup


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available", "use training.device: cpu")
    return device


# ----------------------------------------------------------------------------------------------- level sampling


def _epoch_batches(lengths: Sequence[float], recipe: Recipe, epoch: int, dist_info: DistInfo) -> list[list[int]]:
    """This rank's batches of ``epoch`` (each global batch split across ranks; too-small batches dropped)."""
    batches = bucket_batches(lengths, recipe.data.batch_frames, shuffle=True, seed=recipe.training.seed + epoch,
                             max_batch_size=recipe.data.max_batch_size)
    if dist_info.world == 1:
        return batches
    return [b[dist_info.rank::dist_info.world] for b in batches if len(b) >= dist_info.world]


def _loader(dataset: SpeechDataset, batches: list[list[int]], workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      generator=generator, persistent_workers=False)


def _augment(batch: Batch, seed: int, step: int) -> Batch:
    """SpecAugment each utterance with a generator derived from (seed, step, position): resume-safe."""
    if batch.inputs.dim() != 3:  # raw-waveform models (hf-ctc) have no [T, F] features; they mask inside the model
        return batch
    inputs = batch.inputs.clone()
    for i in range(len(batch)):
        length = int(batch.input_lengths[i])
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + i)
        inputs[i, :length] = spec_augment(batch.inputs[i, :length], gen)
    batch.inputs = inputs
    return batch


# ----------------------------------------------------------------------------------------------- evaluation


def dev_wer(runner: AdapterRunner, params: dict[str, torch.Tensor], codes: dict[str, torch.Tensor], num_levels: int,
            dev: Any, batch_size: int = 16) -> list[float]:
    """Greedy WER per level on prepared dev data (model in eval mode for the duration)."""
    from ..data.batch import pad_batch

    adapter = runner.adapter
    normalizer = getattr(adapter, "normalizer", "default")
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
                            for h in run_at_level(runner, params, codes, index, batch, "decode"))
            wers.append(word_errors(dev.references, hyps).rate)
    adapter.model.train(was_training)
    return wers


# ----------------------------------------------------------------------------------------------- state files


def state_path(output: Path) -> Path:
    """Where the resumable training state of ``output`` lives."""
    return output.with_name(output.name + ".train-state.pt")


def log_path(output: Path) -> Path:
    """The JSONL metrics log next to ``output``."""
    return output.with_name(output.stem + ".log.jsonl")


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is reported the same way
        raise DsnnError(f"training state {path} is unreadable ({type(exc).__name__})",
                        "delete it and start over, or restore it from a backup") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise DsnnError(f"training state {path} has an unknown layout", "delete it and start over")
    return state


# ----------------------------------------------------------------------------------------------- the loop


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


Reporter = Callable[[str, dict[str, Any]], None]


def finetune(recipe: Recipe, resume: bool = False, force: bool = False, report: Reporter | None = None,
             stop_after: int | None = None) -> FinetuneResult:
    """Run the recipe: joint multi-level training (or dense training when there are no levels).

    ``report(event, data)`` receives ``start``, ``step``, ``eval``, ``checkpoint`` and ``end`` events (rank 0 only).
    ``stop_after`` ends the process's loop early after that many total steps without writing the final output
    (used to simulate a crash in tests; the periodic checkpoint stays).
    """
    started = time.perf_counter()
    cfg = recipe.training
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    output = Path(recipe.output)
    state_file, log_file = state_path(output), log_path(output)
    if dist_info.main:
        _check_outputs(output, state_file, resume, force)
    emit = report if (report is not None and dist_info.main) else (lambda _e, _d: None)

    setup = build_model(recipe)
    adapter, levels = setup.adapter, setup.levels
    num_levels = len(levels)
    weights = _loss_weights(recipe, num_levels)
    model = adapter.model.to(device)
    codes = {n: c.to(device) for n, c in setup.codes.items()}
    params = dict(model.named_parameters())
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)

    utterances = read_manifest(recipe.data.train)
    lengths = utterance_lengths(utterances, skip_bad=recipe.data.skip_bad)
    dataset = SpeechDataset(utterances, adapter.prepare, adapter.encode_text, adapter.sample_rate,
                            normalizer=getattr(adapter, "normalizer", "default"), skip_bad=recipe.data.skip_bad)
    per_epoch = len(_epoch_batches(lengths, recipe, 0, dist_info))
    if per_epoch == 0:
        raise DsnnError("the training data gives no batch", "use more data or a larger data.batch_frames")
    total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
    if recipe.schedule.enabled and recipe.schedule.end_step >= total_steps:
        raise UsageError(schedule_end_too_late(recipe.schedule.end_step, str(total_steps)),
                         "set schedule.end_step below the run's step count, or train for more epochs")
    dev = None
    if recipe.data.dev is not None:
        dev_utts = read_manifest(recipe.data.dev)
        if recipe.data.max_dev_utterances:
            dev_utts = dev_utts[: recipe.data.max_dev_utterances]
        dev = prepare_data(dev_utts, adapter.sample_rate, adapter.encode_text, adapter.normalizer, skip_bad=True)

    step, epoch, position = 0, 0, 0
    best: dict[str, Any] | None = None
    skipped_total = 0
    if resume:
        state = _load_state(state_file)
        if state["recipe"] != json.dumps(recipe.to_dict(), sort_keys=True):
            raise UsageError("the recipe differs from the one the training state was made with",
                             "resume with the same recipe and options, or start over with --force")
        model.load_state_dict({k: v.to(device) for k, v in state["model"].items()})
        codes = {n: c.to(device) for n, c in state["codes"].items()}
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("numpy_rng") is not None:
            _set_numpy_rng_state(state["numpy_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        best = state.get("best")
        skipped_total = int(state.get("skipped", 0))
    else:
        torch.manual_seed(cfg.seed)
    _broadcast_tensors([*params.values(), *codes.values()], dist_info)

    runner = AdapterRunner(adapter)
    model.train()
    log_handle = _open_log(log_file, resume, step) if dist_info.main else None
    emit("start", {"steps": total_steps, "start_step": step, "levels": list(levels), "world": dist_info.world,
                   "per_epoch": per_epoch, "params": sum(p.numel() for p in params.values()),
                   "device": str(device), "log": str(log_file)})
    forward_passes = 0
    last_losses: dict[str, float] = {}
    last_dev: list[float] | None = None
    tick = time.perf_counter()
    steps_in_window = 0
    batches = _epoch_batches(lengths, recipe, epoch, dist_info)
    iterator = iter(_loader(dataset, batches[position:], recipe.data.num_workers, cfg.seed + epoch))
    limit = total_steps if stop_after is None else min(total_steps, stop_after)
    while step < limit:
        try:
            batch = next(iterator)
        except StopIteration:
            epoch, position = epoch + 1, 0
            batches = _epoch_batches(lengths, recipe, epoch, dist_info)
            iterator = iter(_loader(dataset, batches, recipe.data.num_workers, cfg.seed + epoch))
            continue
        position += 1
        skipped_total += len(batch.skipped)
        if num_levels and should_update_codes(step, recipe.schedule):
            if dist_info.main:
                codes = scheduled_codes(adapter, codes, levels, recipe, step)
            _broadcast_tensors(list(codes.values()), dist_info)
        if len(batch) == 0:
            continue
        if recipe.data.spec_augment:
            batch = _augment(batch, cfg.seed + dist_info.rank, step)
        batch = batch.to(device)
        lr = lr_at(step, opt.lr, recipe.lr_schedule, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = sample_levels(num_levels, recipe.sampling.mode, recipe.sampling.random_levels, cfg.seed, step)
        optimizer.zero_grad(set_to_none=True)
        distill = recipe.distillation.weight if recipe.distillation.enabled and num_levels else 0.0
        losses = train_step(runner, params, codes, batch, indices, weights, distill,
                            recipe.distillation.temperature)
        forward_passes += passes_per_step(indices, weights, distill)
        _average_gradients(list(params.values()), dist_info)
        losses = _average_losses(losses, dist_info, device)
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip))
        optimizer.step()
        step += 1
        steps_in_window += 1
        last_losses = {_level_key(levels, i): v for i, v in losses.items()}
        if dist_info.main and (step % cfg.log_every == 0 or step == total_steps):
            now = time.perf_counter()
            record = {"event": "step", "step": step, "epoch": epoch, "lr": lr, "loss": last_losses,
                      "grad_norm": grad_norm, "steps_per_s": steps_in_window / max(now - tick, 1e-9),
                      "skipped": skipped_total}
            _log(log_handle, record)
            emit("step", record)
            tick, steps_in_window = now, 0
        elif dist_info.main:
            emit("tick", {"step": step, "loss": last_losses, "lr": lr})
        if dev is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            if dist_info.main:
                last_dev = dev_wer(runner, params, codes, num_levels, dev)
                record = {"event": "eval", "step": step,
                          "dev_wer": {_level_key(levels, i): w for i, w in enumerate(last_dev)}}
                _log(log_handle, record)
                emit("eval", record)
                mean = sum(last_dev) / len(last_dev)
                # with the gradual schedule only steps after end_step run at the target sparsities; an earlier,
                # less sparse step would win on dev WER but does not hold the levels the bundle declares
                at_target = not recipe.schedule.enabled or step > recipe.schedule.end_step
                if cfg.keep == "best" and at_target and (best is None or mean < best["metric"]):
                    best = {"metric": mean, "step": step, "dev_wer": list(last_dev),
                            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                            "codes": {n: c.cpu().clone() for n, c in codes.items()}}
            _barrier(dist_info)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
            if dist_info.main:
                _save_state(state_file, _state_dict(recipe, model, codes, optimizer, device, step, epoch,
                                                    position, best, skipped_total))
                _write_output(recipe, setup, model, codes, output, step, last_losses, last_dev, dist_info)
                emit("checkpoint", {"step": step, "path": str(state_file)})
                _log(log_handle, {"event": "checkpoint", "step": step})
            _barrier(dist_info)
    if stop_after is not None and step < total_steps:
        if log_handle:
            log_handle.close()
        return FinetuneResult(output, step, levels, last_losses, last_dev, time.perf_counter() - started,
                              forward_passes, log_file)
    if dist_info.main:
        if cfg.keep == "best" and best is not None:
            model.load_state_dict({k: v.to(device) for k, v in best["model"].items()})
            codes = {n: c.to(device) for n, c in best["codes"].items()}
        # with keep=best the bundle holds the best step's weights: record that step's dev WER, not the last one
        written_dev = best.get("dev_wer", last_dev) if (cfg.keep == "best" and best is not None) else last_dev
        _write_output(recipe, setup, model, codes, output, step, last_losses, written_dev, dist_info,
                      best_step=best["step"] if best else None)
        if state_file.exists():
            state_file.unlink()
        _log(log_handle, {"event": "end", "step": step, "output": str(output)})
        if log_handle:
            log_handle.close()
        emit("end", {"output": str(output), "steps": step, "dev_wer": last_dev})
    _barrier(dist_info)
    return FinetuneResult(output, step, levels, last_losses, last_dev, time.perf_counter() - started,
                          forward_passes, log_file)


def _level_key(levels: Sequence[float], index: int) -> str:
    return "dense" if index == 0 else f"{levels[index - 1]:g}"


def _loss_weights(recipe: Recipe, num_levels: int) -> list[float]:
    weights = recipe.sampling.loss_weights
    if weights is None:
        return [1.0] * (num_levels + 1)
    if len(weights) != num_levels + 1:
        raise UsageError(f"sampling.loss_weights has {len(weights)} values but there are {num_levels + 1} levels "
                         "(dense included)", "give one weight per level, dense first")
    return [float(w) for w in weights]


def _check_outputs(output: Path, state_file: Path, resume: bool, force: bool) -> None:
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        raise DsnnError(f"output directory {parent} is not writable", "choose a writable location")
    if resume:
        if not state_file.is_file():
            raise UsageError(f"no training state {state_file} to resume from",
                             "start without --resume (checkpoints need training.checkpoint_every > 0)")
        return
    if state_file.exists() and not force:
        raise UsageError(f"a training state {state_file} exists from an interrupted run",
                         "pass --resume to continue it or --force to start over")
    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", "pass --force to overwrite it or choose another path")


def _open_log(path: Path, resume: bool, step: int = 0):  # noqa: ANN202 - a text file handle
    """Open the JSONL log; on resume, first drop what the crashed run logged after the resumed ``step``.

    A crash after the last checkpoint leaves records of steps that the resumed run repeats (and possibly a torn last
    line from a kill in mid-write); keeping them would give duplicate or unparseable records.
    """
    if not resume:
        return open(path, "w", encoding="utf-8")
    kept: list[str] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            logged = record.get("step") if isinstance(record, dict) else None
            if isinstance(logged, int) and logged <= step:
                kept.append(line)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    return open(path, "a", encoding="utf-8")


def _log(handle: Any, record: dict[str, Any]) -> None:
    if handle is None:
        return
    handle.write(json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n")
    handle.flush()


def _state_dict(recipe: Recipe, model: nn.Module, codes: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                device: torch.device, step: int, epoch: int, position: int, best: dict[str, Any] | None,
                skipped: int) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "recipe": json.dumps(recipe.to_dict(), sort_keys=True),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "codes": {n: c.cpu() for n, c in codes.items()},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "numpy_rng": _numpy_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "step": step,
        "epoch": epoch,
        "position": position,
        "best": best,
        "skipped": skipped,
    }


def _numpy_rng_state() -> dict[str, Any]:
    """NumPy's global generator state (Hugging Face SpecAugment draws from it), as tensors and numbers."""
    import numpy as np

    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached"]))


def _write_output(recipe: Recipe, setup: ModelSetup, model: nn.Module, codes: dict[str, torch.Tensor],
                  output: Path, step: int, losses: dict[str, float], dev: list[float] | None,
                  dist_info: DistInfo, best_step: int | None = None) -> None:
    """Write the bundle (or, with no sparse levels, a dense dsnn checkpoint) atomically."""
    from ..models.registry import save_checkpoint

    training = {"steps": step, "final_loss": losses, "world_size": dist_info.world, "best_step": best_step,
                "dev_wer": None if dev is None else {_level_key(setup.levels, i): w for i, w in enumerate(dev)}}
    if not setup.levels:
        extra = {"recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                 "training": json.dumps(training, sort_keys=True),
                 "tool": json.dumps(tool_metadata())}
        save_checkpoint(setup.adapter, output, extra)
        return
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metadata = {
        **setup.base_metadata,
        "allocation": setup.base_metadata.get("allocation", recipe.allocation),
        "selection": setup.base_metadata.get("selection", {"include": list(recipe.include),
                                                           "exclude": list(recipe.exclude)}),
        "source": setup.source,
        "tool": tool_metadata(),
        "command": ["dsnn", "finetune"],
        "model": setup.adapter.metadata(),
        "recipe": recipe.to_dict(),
        "training": training,
    }
    save_bundle(Bundle(tensors=tensors, codes={n: c.cpu() for n, c in codes.items()}, levels=setup.levels,
                       metadata=metadata), output)
