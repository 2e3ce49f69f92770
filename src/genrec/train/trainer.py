"""The training loop: explicit, no framework.

``train(cfg, run_dir)`` loads the prepared dataset, splits it, builds the model and the loss, and runs
AdamW for ``train.epochs`` epochs. Every ``eval_every`` epochs it ranks the validation targets; the
best validation ``eval.select_metric`` selects the checkpoint (``best.pt``) and drives early stopping.
The test split is evaluated once, at the end, with the best checkpoint. ``last.pt`` is written after
every epoch, so ``train(..., resume=True)`` continues the same run: same weights, optimiser state,
RNG state and data order as an uninterrupted run.

``data.train_on_valid = true`` trains on the validation events too: nothing to validate, so the last
epoch is the one tested. ``train.refit = true`` uses it after the ordinary run: a fresh model (same seed)
trained on training + validation events for the epochs chosen on validation, tested once (published
ML-1M numbers train on the validation event; this is the way to compare with them without selecting on
test).

Run directory::

    config.toml     the resolved configuration
    metrics.jsonl   one JSON object per epoch / evaluation
    best.pt         weights selected on validation + config + vocabulary (for evaluate / recommend)
    last.pt         everything needed to resume
    report.json     validation and test metrics with their protocol (and the refit's under "refit")
    refit/          with train.refit: the refit's own run directory (the same files)
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genrec import __version__
from genrec.config import Config, ConfigError, config_from_dict
from genrec.data.batches import TrainLoader, prefetch
from genrec.data.split import Split, make_split, train_item_counts
from genrec.data.store import SequenceStore
from genrec.eval.ranking import Report, evaluate_model, evaluate_popularity
from genrec.losses import Loss
from genrec.models import build_model
from genrec.train.checkpoint import load_checkpoint, save_checkpoint, write_text_atomically
from genrec.train.distributed import DDPModel, Dist, setup, teardown


class RunError(RuntimeError):
    """A run directory cannot be used as asked (exists, missing checkpoint...)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"train.device = {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"train.device = {name!r} but this torch build has no CUDA device; use cpu or auto")
    return device


def item_counts(store: SequenceStore, split: Split) -> torch.Tensor:
    """(I + 1,) number of training events per item (row 0 = padding, always 0)."""
    return torch.from_numpy(train_item_counts(store, split.train_end))


class MetricsLog:
    """Appends one JSON line per record to metrics.jsonl and echoes a short line to the console."""

    def __init__(self, path: Path, echo=print):
        self.path, self.echo = path, echo

    def write(self, record: dict, line: str | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line and self.echo:
            self.echo(line)


def _patience_spent(state: dict, patience: int) -> bool:
    """The early-stopping rule: ``patience`` validations in a row without a gain (0: never stop)."""
    return bool(patience) and state["bad_evals"] >= patience


def _selected(report: Report, metric: str) -> float:
    return report.metrics[metric]


def train_step(model: torch.nn.Module, loss_fn: Loss, optimizer: torch.optim.Optimizer, batch,
               grad_clip: float = 0.0, d: Dist = Dist(), precision: str = "fp32") -> tuple[float, int]:
    """One optimisation step; returns (loss, predicted positions), both over all ranks.

    Under DDP each rank's mean loss is rescaled by its share of the global positions, so that the
    averaged gradient is the gradient of the global mean, exactly as in a single process.
    ``precision = "bf16"`` runs forward and loss under bfloat16 autocast (weights and optimiser stay fp32).
    A model with a ``training_batch(batch)`` method rewrites each batch first (BERT4Rec's cloze masking).
    """
    prepare = getattr(getattr(model, "module", model), "training_batch", None)  # e.g. BERT4Rec's cloze masking
    if prepare is not None:
        batch = prepare(batch)
    device_type = batch.items.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = model(batch)  # (B, L, D)
        loss = loss_fn(hidden, batch.targets, model.item_vectors())  # mean over this rank's positions
    loss = loss.float()
    n_local = int((batch.targets > 0).sum())
    n_global = int(d.sum(n_local))
    optimizer.zero_grad(set_to_none=True)
    (loss * (n_local * d.world_size / max(n_global, 1)) if d.enabled else loss).backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    value = float(loss.detach())
    return (d.sum(value * n_local) / max(n_global, 1) if d.enabled else value), n_global


def _resume_view(config: dict) -> dict:
    """The parts of a config that must not change on resume (epochs, patience, threads, device and refit may)."""
    train = {k: v for k, v in config["train"].items()
             if k not in ("epochs", "patience", "threads", "device", "refit")}
    return {**config, "train": train}


def load_data(cfg: Config) -> tuple[SequenceStore, Split]:
    store = SequenceStore.load(cfg.data.path)
    split = make_split(store, cfg.data.split, cfg.data.temporal_valid, cfg.data.temporal_test,
                       cfg.eval.max_users, cfg.train.seed)
    return store, split.train_on_valid() if cfg.data.train_on_valid else split


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool | None = None,
          echo=print) -> dict:
    """Train, validate, select, test (then refit with ``train.refit``). Under torchrun every process calls
    this; see train/distributed.py."""
    d = setup()
    try:
        echo = echo if d.is_main else (lambda *a, **k: None)
        report = _train(cfg, run_dir, resume, progress, echo, d)
        if cfg.train.refit and "refit" not in report:
            report = _refit(cfg, Path(run_dir), report, progress, echo, d)
        return report
    finally:
        teardown(d)


def _refit(cfg: Config, run_dir: Path, report: dict, progress: bool | None, echo, d: Dist) -> dict:
    """Train a fresh model (same seed) on the training and validation events for the number of epochs
    chosen on validation, in ``run_dir / "refit"``, and test it once; its test metrics join report.json
    (and a "final" record of metrics.jsonl) under "refit". Nothing is selected on test. Resumable like
    any run: a run continued for more epochs continues its refit too (the chosen epoch only moves later);
    a refit that somehow trained more epochs than the choice is moved aside (``refit.stale-N``), never
    deleted. Rank 0 decides and every rank follows."""
    epochs = int(report["best_epoch"])
    if epochs < 1:
        raise RunError(f"{run_dir}: cannot refit for best_epoch = {epochs} (report.json); the run must have "
                       f"chosen an epoch on validation")
    sub = copy.deepcopy(cfg)
    sub.train.refit, sub.data.train_on_valid, sub.train.epochs = False, True, epochs
    out = run_dir / "refit"
    resume = False
    if d.is_main and (out / "last.pt").is_file():
        done = int(load_checkpoint(out / "last.pt")["state"]["epoch"])
        resume = done <= epochs
        if not resume:
            stale = run_dir / f"refit.stale-{done}"
            n = 1
            while stale.exists():
                stale, n = run_dir / f"refit.stale-{done}.{n}", n + 1
            out.rename(stale)
            echo(f"{out} had trained {done} epochs, more than the {epochs} now chosen: moved to {stale.name}; "
                 f"refitting from scratch")
    resume = d.broadcast(resume)  # after rank 0's rename, if any
    echo(f"refit: a fresh model on the training and validation events for {epochs} epochs (chosen on "
         f"validation), in {out}")
    sub_report = _train(sub, out, resume, progress, echo, d)
    report = {**report, "refit": {"epochs": epochs, "run": "refit", "test": sub_report["test"],
                                  "popularity_test": sub_report["popularity_test"],
                                  "protocol": sub_report["protocol"]}}
    if d.is_main:
        write_text_atomically(run_dir / "report.json", json.dumps(report, indent=2))
        MetricsLog(run_dir / "metrics.jsonl").write({"final": True, **report})
    return report


def _train(cfg: Config, run_dir: str | Path, resume: bool, progress: bool | None, echo, d: Dist) -> dict:
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    holds_run = last_path.exists() or best_path.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file; choose a directory for --out")
    if holds_run and not resume:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if run_dir.exists() and not holds_run and not resume and set(p.name for p in run_dir.iterdir()) - {
            "config.toml", "metrics.jsonl"}:
        raise RunError(f"{run_dir} is not empty and is not a genrec run; choose another --out")
    if resume and not last_path.is_file():
        raise RunError(f"cannot resume: {last_path} not found (start the run without --resume)")
    progress = (sys.stderr.isatty() if progress is None else progress) and d.is_main
    if cfg.train.batch_size % d.world_size:
        raise RunError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be divisible by the "
                       f"{d.world_size} processes")
    d.barrier()  # every rank has checked the run directory before rank 0 writes into it

    cfg.data.path = str(Path(cfg.data.path).resolve())  # runs stay usable from any working directory
    tc = cfg.train
    seed_everything(tc.seed)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)

    store, split = load_data(cfg)
    validating = not cfg.data.train_on_valid  # otherwise the validation events are training data
    for which in ("valid", "test") if validating else ("test",):
        if len(split.examples(which)) == 0:
            raise RunError(f"{cfg.data.path}: the {split.name} split leaves no {which} users "
                           f"(leave-one-out needs users with at least 3 events)")
    if getattr(cfg.model, "relative_bias", None) == "position_time" and store.timestamps is None:
        echo("note: this dataset has no timestamps; HSTU's time bias is off (position bias only)")
    if not validating:
        echo(f"data.train_on_valid: the validation events are trained on; no validation, epoch {tc.epochs} is tested")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a leftover from a run that failed to start
    counts = item_counts(store, split)
    model = build_model(cfg.model, store.num_items).to(device)
    model.grad_checkpointing = tc.grad_checkpointing
    loss_fn = Loss(cfg.loss, store.num_items, counts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    loader = TrainLoader(store, split, tc.batch_size, cfg.data.max_len, seed=tc.seed, length_window=tc.length_window,
                         rank=d.rank, world_size=d.world_size)
    step_model = DDPModel(model, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled else model
    if d.enabled:  # DDP copied rank 0's weights everywhere; from here each rank draws its own randomness
        torch.manual_seed(tc.seed + d.rank)
    state = {"epoch": 0, "best_metric": -math.inf, "best_epoch": -1, "bad_evals": 0, "stopped": False}

    if resume:
        ckpt = load_checkpoint(last_path, map_location=device)
        # through the config classes: keys added to genrec since the run started take their defaults
        try:
            started = _resume_view(config_from_dict(ckpt["config"]).to_dict())
        except ConfigError as e:
            raise RunError(f"{run_dir}: the run's config no longer loads in this genrec ({e}); start a new run "
                           f"or use the genrec version that started it") from None
        if started != _resume_view(cfg.to_dict()):
            raise RunError(f"{run_dir}: the config differs from the one the run started with; "
                           f"resume with the same config (see {run_dir / 'config.toml'})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ranks = ckpt["rng"].get("torch_ranks")
        if d.enabled and (ranks is None or len(ranks) != d.world_size):
            raise RunError(f"{last_path} was written by {len(ranks or [0])} process(es); resume with as many")
        torch.set_rng_state((ranks[d.rank] if d.enabled else ckpt["rng"]["torch"]).cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda_ranks"):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda_ranks"][d.rank].cpu(), device)
        state = dict(ckpt["state"])
        was_stopped = state["stopped"]
        state["stopped"] = _patience_spent(state, tc.patience)  # patience may change on resume
        report_path = run_dir / "report.json"
        if (state["epoch"] >= tc.epochs or state["stopped"]) and report_path.is_file():
            echo(f"{run_dir} is finished; its report:")
            return json.loads(report_path.read_text())
        if was_stopped and not state["stopped"]:
            echo(f"early stop lifted: {state['bad_evals']} validations without gain, train.patience={tc.patience}")
        if d.is_main and report_path.is_file():
            # the run goes on, so its old report no longer describes it (metrics.jsonl keeps that report as
            # a "final" record); left in place, a run killed before its new end would look finished
            report_path.unlink()
            echo(f"{report_path.name} of the earlier end withdrawn (kept in metrics.jsonl); a new one comes at the end")
        echo(f"resuming {run_dir} after epoch {state['epoch']}")
    if d.is_main:  # on resume too: epochs or patience may have changed
        write_text_atomically(run_dir / "config.toml", cfg.to_toml())

    log = MetricsLog(run_dir / "metrics.jsonl", echo) if d.is_main else None
    n_params = sum(p.numel() for p in model.parameters())
    echo(f"{type(model).__name__}: {n_params:,} parameters; {store.num_users:,} users, {store.num_items:,} items; "
         f"{len(loader)} steps/epoch; device {device}; {torch.get_num_threads()} threads"
         + (f" x {d.world_size} processes" if d.enabled else ""))

    # what every checkpoint carries besides weights; built once (the vocabulary can hold millions of ids)
    meta = {"config": cfg.to_dict(), "item_vocab": store.item_vocab.state(), "item_counts": counts,
            "dataset": {"path": str(cfg.data.path), "counts": store.manifest.get("counts", {})},
            "genrec_version": __version__}

    def validate() -> Report:
        return evaluate_model(model, loss_fn.scorer, store, split.valid, "valid", split.description,
                              cfg.data.max_len, cfg.eval.ks, cfg.eval.batch_size, cfg.eval.item_chunk,
                              cfg.eval.exclude_history, device)

    from tqdm.auto import tqdm

    while state["epoch"] < tc.epochs and not state["stopped"]:
        epoch = state["epoch"]
        model.train()
        t0, tokens, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        batches = prefetch(loader.epoch(epoch), depth=2)  # the next batches are collated while this one trains
        bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch + 1}", disable=not progress, leave=False)
        for batch in bar:
            if tc.max_steps_per_epoch and steps >= tc.max_steps_per_epoch:
                break
            loss, n_tokens = train_step(step_model, loss_fn, optimizer, batch.to(device), tc.grad_clip, d,
                                        tc.precision)
            steps += 1
            tokens += n_tokens
            loss_sum += loss
            if not math.isfinite(loss):
                raise RunError(f"the training loss became {loss} at epoch {epoch + 1}, step {steps}; lower "
                               f"train.lr or set train.grad_clip, then resume from {last_path} (last good epoch)")
            if progress:
                bar.set_postfix(loss=f"{loss_sum / steps:.4f}")
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, steps), "seconds": round(seconds, 3),
                  "steps": steps, "tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
        line = f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}  {seconds:6.1f}s  {record['tokens_per_s']:,.0f} tok/s"
        state["epoch"] = epoch + 1
        if validating and ((epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs) and d.is_main:
            report = validate()
            value = _selected(report, cfg.eval.select_metric)
            record["valid"] = report.metrics
            line += "  valid " + "  ".join(f"{k} {v:.4f}" for k, v in report.metrics.items() if k.endswith("@10"))
            if value > state["best_metric"]:
                state.update(best_metric=value, best_epoch=epoch + 1, bad_evals=0)
                save_checkpoint({**meta, "model": model.state_dict(), "epoch": epoch + 1,
                                 "valid": report.metrics}, best_path)
                line += "  *"
            else:
                state["bad_evals"] += 1
                if _patience_spent(state, tc.patience):
                    state["stopped"] = True
                    line += f"  (early stop: no gain in {tc.patience} validations)"
        state = d.broadcast(state)  # rank 0 decided best / early stop; every rank follows
        if tc.keep_checkpoints or state["epoch"] >= tc.epochs or state["stopped"]:
            rng_ranks = d.gather(torch.get_rng_state())
            cuda_ranks = d.gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
            if d.is_main:
                rng = {"torch": rng_ranks[0], "torch_ranks": rng_ranks}
                if cuda_ranks is not None:
                    rng["cuda_ranks"] = cuda_ranks
                save_checkpoint({**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "rng": rng, "state": state}, last_path)
        if d.is_main:
            log.write(record, line)  # after last.pt: a crash in between never duplicates an epoch on resume

    if not validating and d.is_main:  # nothing to select on: the last epoch trained is the one tested
        save_checkpoint({**meta, "model": model.state_dict(), "epoch": state["epoch"], "valid": None}, best_path)
    report = finish(cfg, run_dir, model, loss_fn, store, split, device, log, echo) if d.is_main else None
    return d.broadcast(report)


def finish(cfg: Config, run_dir: Path, model, loss_fn: Loss, store: SequenceStore, split: Split, device,
           log: MetricsLog, echo=print) -> dict:
    """Evaluate the test split once with the checkpoint selected on validation; write report.json."""
    best = load_checkpoint(run_dir / "best.pt", map_location=device)
    model.load_state_dict(best["model"])
    test = evaluate_model(model, loss_fn.scorer, store, split.test, "test", split.description, cfg.data.max_len,
                          cfg.eval.ks, cfg.eval.batch_size, cfg.eval.item_chunk, cfg.eval.exclude_history, device)
    pop = evaluate_popularity(store, split.train_end, split.test, "test", split.description, cfg.data.max_len,
                              cfg.eval.ks, cfg.eval.exclude_history)
    report = {"model": cfg.to_dict()["model"]["name"], "best_epoch": best["epoch"], "valid": best["valid"],
              "test": test.metrics, "popularity_test": pop.metrics, "protocol": test.protocol,
              "num_test_users": test.num_users}
    write_text_atomically(run_dir / "report.json", json.dumps(report, indent=2))
    log.write({"final": True, **report})
    return report
