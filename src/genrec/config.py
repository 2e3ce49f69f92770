"""Typed configuration: dataclasses with defaults, TOML files and ``a.b=c`` overrides.

A run is described by one :class:`Config` with five sections::

    [data]   which prepared dataset, which split, the maximum history length
    [model]  ``name = "hstu"`` plus that model's own keys (see ``genrec.models``)
    [loss]   the training objective and the item scoring (dot or cosine / temperature)
    [train]  optimiser, epochs, batch size, early stopping, seed, threads
    [eval]   cut-offs, history exclusion, chunk sizes

Unknown keys and values of the wrong type are errors that name the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


@dataclass
class DataConfig:
    path: str = ""  # prepared dataset directory (output of `genrec prepare`)
    split: str = "leave_one_out"  # leave_one_out | temporal
    max_len: int = 200  # longest history fed to the model (most recent events kept)
    temporal_valid: float = 0.1  # temporal split: share of events (by time) in the validation window
    temporal_test: float = 0.1  # temporal split: share of events (by time) in the test window
    train_on_valid: bool = False  # train on the validation events too: no validation, the last epoch is tested


@dataclass
class LossConfig:
    name: str = "sampled_softmax"  # full_softmax | sampled_softmax | in_batch | bce
    num_negatives: int = 128  # sampled_softmax: uniform negatives per position
    temperature: float = 0.05  # logits are divided by this (softmax losses)
    l2_norm: bool = True  # L2-normalise queries and item embeddings (cosine scoring)
    logq_correction: bool = False  # sampled_softmax / in_batch: subtract log sampling probability
    chunk_size: int = 4096  # full_softmax: positions scored per chunk (bounds memory; at most 512 are used)


@dataclass
class TrainConfig:
    epochs: int = 101
    batch_size: int = 128
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    eval_every: int = 1  # validate every N epochs
    patience: int = 10  # stop after this many validations without improvement (0 = never stop early)
    seed: int = 42
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_steps_per_epoch: int = 0  # 0 = full epoch; >0 truncates (smoke tests, quick looks)
    grad_clip: float = 0.0  # 0 = off
    precision: str = "fp32"  # fp32 | bf16 (autocast; fast on GPUs and CPUs with bf16 units, slow elsewhere)
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory, more time)
    length_window: int = 0  # length-aware batching: sort users by length within windows of N batches (0 = off)
    keep_checkpoints: bool = True  # write last.pt every epoch for resume
    refit: bool = False  # then train a fresh model on train + validation events for the chosen epochs (RUN/refit)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    exclude_history: bool = True  # never rank items already in the user's history
    batch_size: int = 128  # users per forward pass (bigger: no faster on CPU, tensors leave the cache)
    item_chunk: int = 65536  # items scored per chunk (bounds memory on huge catalogues)
    max_users: int = 0  # 0 = every user; N = a fixed random sample of N users (huge data; stated in the protocol)
    select_metric: str = "ndcg@10"  # validation metric used for early stopping / best checkpoint


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # a model config dataclass chosen by [model] name
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = {"name": model_name(self.model), **dataclasses.asdict(self.model)}
        return out

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# ----------------------------------------------------------------------------------------------
# construction from dicts / TOML


def model_name(model_cfg: Any) -> str:
    from genrec.models import MODELS

    for name, (cfg_cls, _) in MODELS.items():
        if type(model_cfg) is cfg_cls:
            return name
    raise ConfigError(f"unknown model config type {type(model_cfg).__name__}")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_value(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected nothing, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def dataclass_from_dict(cls: type, values: dict, section: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]}; valid keys in [{section}]: {', '.join(sorted(names))}"
        )
    kwargs = {k: _check_value(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    from genrec.models import MODELS

    raw = dict(raw)
    unknown = sorted(set(raw) - {"data", "model", "loss", "train", "eval"})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; valid: data, model, loss, train, eval")
    for section, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{section} = {value!r} must be a table: write [{section}] and its keys below it")
    model_raw = dict(raw.get("model", {}))
    name = model_raw.pop("name", None)
    if name is None:
        raise ConfigError(f"[model] needs a name; one of: {', '.join(MODELS)}")
    if name not in MODELS:
        raise ConfigError(f"model.name = {name!r} is unknown; one of: {', '.join(MODELS)}")
    data = dataclass_from_dict(DataConfig, raw.get("data", {}), "data")
    model_fields = {f.name for f in dataclasses.fields(MODELS[name][0])}
    if "max_len" in model_fields and "max_len" not in model_raw:
        model_raw["max_len"] = data.max_len  # position table sized to the data unless set explicitly
    cfg = Config(
        data=data,
        model=dataclass_from_dict(MODELS[name][0], model_raw, "model"),
        loss=dataclass_from_dict(LossConfig, raw.get("loss", {}), "loss"),
        train=dataclass_from_dict(TrainConfig, raw.get("train", {}), "train"),
        eval=dataclass_from_dict(EvalConfig, raw.get("eval", {}), "eval"),
    )
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    choices = {
        "data.split": (cfg.data.split, ("leave_one_out", "temporal")),
        "loss.name": (cfg.loss.name, ("full_softmax", "sampled_softmax", "in_batch", "bce")),
        "train.precision": (cfg.train.precision, ("fp32", "bf16")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r}; choose one of {', '.join(allowed)}")
    if cfg.train.refit and cfg.data.train_on_valid:
        raise ConfigError("train.refit = true needs a run that validates (it refits for the epochs chosen on "
                          "validation); set data.train_on_valid = false")
    positive = {
        "data.max_len": cfg.data.max_len,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_every": cfg.train.eval_every,
        "train.lr": cfg.train.lr,
        "loss.num_negatives": cfg.loss.num_negatives,
        "loss.chunk_size": cfg.loss.chunk_size,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.item_chunk": cfg.eval.item_chunk,
    }
    non_negative = {
        "train.weight_decay": cfg.train.weight_decay,
        "train.patience": cfg.train.patience,
        "train.threads": cfg.train.threads,
        "train.max_steps_per_epoch": cfg.train.max_steps_per_epoch,
        "train.grad_clip": cfg.train.grad_clip,
        "train.length_window": cfg.train.length_window,
        "eval.max_users": cfg.eval.max_users,
    }
    for key, value in positive.items():
        if not value > 0:  # also rejects NaN
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{key} must be zero or positive, got {value}")
    for key, value in (("data.temporal_valid", cfg.data.temporal_valid), ("data.temporal_test", cfg.data.temporal_test)):
        if not 0 < value < 1:
            raise ConfigError(f"{key} must be between 0 and 1, got {value}")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature must be positive, got {cfg.loss.temperature}")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas needs two numbers in [0, 1), got {cfg.train.betas}")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise ConfigError(f"eval.ks must be positive cut-offs, got {cfg.eval.ks}")
    metric, _, k = cfg.eval.select_metric.partition("@")
    if metric not in ("hr", "ndcg", "mrr") or (metric != "mrr" and (not k.isdigit() or int(k) not in cfg.eval.ks)):
        raise ConfigError(
            f"eval.select_metric = {cfg.eval.select_metric!r}; use mrr or hr@K / ndcg@K with K in eval.ks"
        )
    model_len = getattr(cfg.model, "max_len", None)
    if model_len is not None and cfg.data.max_len > model_len:
        raise ConfigError(f"data.max_len={cfg.data.max_len} exceeds model.max_len={model_len}")
    check = getattr(cfg.model, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 0.0003). Values are parsed as TOML, else kept as strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    key, _, value = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. train.epochs")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a TOML file (or ``base`` dict), apply ``section.key=value`` overrides, validate."""
    raw: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] is not a table")
        raw[section][key] = value
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def dump_toml(d: dict) -> str:
    """Minimal TOML writer for our flat two-level configs."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
