"""High-level Python API used by the CLI: evaluate a run, run the demo.

    from genrec.api import evaluate_run
    from genrec.config import load_config
    from genrec.train.trainer import train
    from genrec.infer.recommender import Recommender
"""

from __future__ import annotations

import shutil
from pathlib import Path

from genrec.config import ConfigError, config_from_dict, load_config
from genrec.data.store import DatasetError
from genrec.eval.ranking import Report, evaluate_model
from genrec.models import build_model
from genrec.models.scoring import Scorer
from genrec.train.checkpoint import load_checkpoint
from genrec.train.trainer import load_data, resolve_device


def evaluate_run(run_dir: str | Path, which: str = "test", exclude_history: bool | None = None,
                 checkpoint: str = "best.pt") -> Report:
    """Full-ranking evaluation of a run's checkpoint on its own dataset and split.

    ``exclude_history`` defaults to the run's own ``eval.exclude_history``.
    """
    path = Path(run_dir) / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a `genrec train` run directory?")
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    device = resolve_device(cfg.train.device)
    try:
        store, split = load_data(cfg)
    except DatasetError as e:
        raise DatasetError(f"{e} (data.path comes from the run's config, {Path(run_dir) / 'config.toml'})") from None
    if store.item_vocab.raw.tolist() != list(ckpt["item_vocab"]["raw"]):
        raise DatasetError(f"dataset {cfg.data.path} does not have the item vocabulary the run was trained with "
                           f"(was it prepared again?); evaluate on the dataset the run used")
    if exclude_history is None:
        exclude_history = cfg.eval.exclude_history
    if which == "valid" and cfg.data.train_on_valid:
        raise ValueError(f"{run_dir} trained on its validation events (data.train_on_valid = true): it has no "
                         f"validation split to evaluate; use --split test")
    model = build_model(cfg.model, store.num_items)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    return evaluate_model(model, Scorer(l2_norm=cfg.loss.l2_norm), store, split.examples(which), which,
                          split.description, cfg.data.max_len, cfg.eval.ks, cfg.eval.batch_size,
                          cfg.eval.item_chunk, exclude_history, device)


def find_configs() -> Path:
    """The repository's configs/ directory (from the working directory or next to the source tree)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "configs" / "synthetic").is_dir():
            return base / "configs"
    raise ConfigError("cannot find configs/synthetic; run from the genrec repository checkout")


def run_demo(out: str | Path = "runs/demo", epochs: int | None = None, echo=print) -> dict:
    """Prepare the synthetic default data, train SASRec and HSTU, print metrics and recommendations."""
    from genrec.data.synthetic import PRESETS, generate_to
    from genrec.infer.recommender import Recommender
    from genrec.train.trainer import train

    out = Path(out)
    data_dir = out / "data"
    if not (data_dir / "manifest.json").is_file():
        echo(f"preparing synthetic data in {data_dir} ...")
        generate_to(PRESETS["default"], data_dir)
    configs = find_configs() / "synthetic"
    reports = {}
    for name in ("sasrec", "hstu"):
        run_dir = out / name
        if run_dir.exists():  # the demo always trains from scratch, replacing only its own earlier runs
            if any(run_dir.iterdir()) and not (run_dir / "config.toml").is_file():
                raise ConfigError(f"{run_dir} exists and is not a genrec run; choose another --out")
            shutil.rmtree(run_dir)
        overrides = [f'data.path="{data_dir}"'] + ([f"train.epochs={epochs}"] if epochs else [])
        cfg = load_config(configs / f"{name}.toml", overrides)
        echo(f"\n== training {name} ({configs / f'{name}.toml'}) ==")
        reports[name] = train(cfg, run_dir, progress=False, echo=echo)

    echo("\n== test metrics (chosen on validation) ==")
    ks = list(reports["hstu"]["test"])
    echo("model        " + "  ".join(f"{k:>8}" for k in ks))
    rows = [("popularity", reports["hstu"]["popularity_test"])] + [(n, r["test"]) for n, r in reports.items()]
    for name, m in rows:
        echo(f"{name:<12} " + "  ".join(f"{m[k]:8.4f}" for k in ks))
    echo(f"protocol: {reports['hstu']['protocol']}")

    from genrec.data.store import SequenceStore

    store = SequenceStore.load(data_dir)
    rec = Recommender.load(out / "hstu")
    echo("\n== example recommendations (HSTU, raw item ids) ==")
    for u in range(3):
        rows = slice(store.offsets[u], store.offsets[u + 1])
        items, times = store.item_vocab.to_raw(store.items[rows]).tolist(), store.timestamps[rows].tolist()
        # recommend for one hour after the user's last event (the model uses the time gaps)
        (r,) = rec.recommend([items], k=5, timestamps=[times], query_time=times[-1] + 3600)
        echo(f"user {store.user_vocab.to_raw(u)}: ... {items[-5:]} -> {r.items}")
    echo(f"\nruns in {out}/; try: genrec recommend {out}/sasrec --history {','.join(map(str, items[-5:]))}")
    return reports
