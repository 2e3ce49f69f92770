"""Configuration: every shipped file loads; typos and wrong types are errors naming the key; round trips."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from genrec.config import Config, ConfigError, load_config, parse_override
from genrec.models import MODELS, HSTUConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.toml"))
BASE = {"data": {"path": "data/x", "max_len": 30}, "model": {"name": "sasrec"}}


def test_config_dir_is_not_empty():
    assert len(CONFIG_FILES) >= 5


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.model, tuple(config_cls for config_cls, _ in MODELS.values()))
    assert cfg.model.max_len >= cfg.data.max_len
    assert path.read_text().startswith("#")  # each config opens with the command that runs it
    out = tmp_path / "cfg.toml"
    out.write_text(cfg.to_toml())
    assert load_config(out).to_dict() == cfg.to_dict()


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epoch\b"):
        load_config(base=BASE, overrides=["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"model\.num_layers"):
        load_config(base=BASE, overrides=["model.num_layers=3"])
    with pytest.raises(ConfigError, match="trian"):
        load_config(base={**BASE, "trian": {"epochs": 3}})


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[data]\npath = "x"\n[model]\nname = "hstu"\nqk_dims = 3\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.qk_dims" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("train.epochs=ten", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("eval.exclude_history=1", "eval.exclude_history"),
    ("eval.ks=10", "eval.ks"),
    ('eval.ks=[10, "x"]', "eval.ks[1]"),
    ("model.dim=[1]", "model.dim"),
    ("data.path=3", "data.path"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(base=BASE, overrides=[override])
    assert key in str(err.value)


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "sasrec"\n[train]\nepochs = "ten"\n')
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(path)


def test_model_name_errors():
    with pytest.raises(ConfigError, match="transformerxl"):
        load_config(base={"model": {"name": "transformerxl"}})
    with pytest.raises(ConfigError, match="name"):
        load_config(base={"model": {"dim": 8}})


def test_invalid_values_rejected():
    for override in ["model.silu=relu", "loss.name=hinge", "data.split=random", "train.epochs=0",
                     "eval.select_metric=ndcg@7", "loss.temperature=0", "train.betas=[0.9]"]:
        with pytest.raises(ConfigError):
            load_config(base={**BASE, "model": {"name": "hstu"}}, overrides=[override])
    with pytest.raises(ConfigError, match="num_heads"):
        load_config(base=BASE, overrides=["model.dim=10", "model.num_heads=3"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_parse_override_values():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 0.0003)
    assert parse_override("train.epochs=7") == (["train", "epochs"], 7)
    assert parse_override("eval.exclude_history=false") == (["eval", "exclude_history"], False)
    assert parse_override("model.ln_affine=true") == (["model", "ln_affine"], True)
    assert parse_override("eval.ks=[5, 20]") == (["eval", "ks"], [5, 20])
    assert parse_override("data.path=data/ml-1m") == (["data", "path"], "data/ml-1m")  # bare string
    assert parse_override('data.path="3"') == (["data", "path"], "3")  # quoted: stays a string
    assert parse_override(" train.seed = 5 ") == (["train", "seed"], 5)
    for bad in ["train.epochs", "epochs=3", "a.b.c=1", ".x=1"]:
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_overrides_are_applied_with_types():
    cfg = load_config(base=BASE, overrides=["train.lr=3e-4", "train.epochs=7", "eval.exclude_history=false",
                                            "eval.ks=[5, 20]", "eval.select_metric=hr@5", "data.path=data/y",
                                            "loss.temperature=1"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 7 and cfg.eval.exclude_history is False
    assert cfg.eval.ks == [5, 20] and cfg.data.path == "data/y"
    assert isinstance(cfg.loss.temperature, float) and cfg.loss.temperature == 1.0
    # overrides win over the file
    path = CONFIG_FILES[0]
    assert load_config(path, overrides=["train.epochs=2"]).train.epochs == 2


def test_model_max_len_follows_data_max_len():
    for name in ("sasrec", "hstu"):
        cfg = load_config(base={"data": {"max_len": 37}, "model": {"name": name}})
        assert cfg.model.max_len == 37
        cfg = load_config(base={"data": {"max_len": 37}, "model": {"name": name, "max_len": 64}})
        assert cfg.model.max_len == 64
        cfg = load_config(base={"model": {"name": name}}, overrides=["data.max_len=12"])
        assert cfg.model.max_len == 12
        with pytest.raises(ConfigError, match="max_len"):
            load_config(base={"data": {"max_len": 100}, "model": {"name": name, "max_len": 50}})


def test_defaults_beside_the_code():
    cfg = load_config(base={"model": {"name": "hstu"}})
    assert asdict(cfg.model) == asdict(HSTUConfig(max_len=cfg.data.max_len))
    assert cfg.to_dict()["model"]["name"] == "hstu"


@pytest.mark.parametrize("model", [
    {"name": "sasrec", "dim": 16, "ffn_activation": "relu", "scale_embeddings": False},
    {"name": "hstu", **{k: v for k, v in asdict(HSTUConfig.production(dim=16)).items()}},
])
def test_to_toml_round_trip(model, tmp_path):
    raw = {"data": {"path": 'odd "dir"\\x', "max_len": 20, "split": "temporal"},
           "model": model,
           "loss": {"name": "full_softmax", "l2_norm": False, "temperature": 0.5},
           "train": {"epochs": 3, "betas": [0.8, 0.9], "lr": 2e-3},
           "eval": {"ks": [1, 10], "select_metric": "mrr", "exclude_history": False}}
    cfg = load_config(base=raw)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert again.data.path == 'odd "dir"\\x' and again.train.betas == [0.8, 0.9]
    assert type(again.model) is type(cfg.model)


def test_to_toml_escapes_control_characters(tmp_path):
    """BUG CHECK. ``dump_toml`` escapes only backslash and double quote, so a string holding a newline
    (or another control character) is written raw into a one-line TOML string and the file no longer loads."""
    cfg = load_config(base={"data": {"path": "runs/a\nb"}, "model": {"name": "sasrec"}})
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path).data.path == "runs/a\nb"


def test_production_preset_matches_hstu_production():
    from genrec.models.hstu import HSTUConfig

    cfg = load_config(CONFIG_DIR / "ml-1m/hstu-large-production.toml")
    assert cfg.model == HSTUConfig.production(dim=50, num_blocks=8, num_heads=2, qk_dim=25, v_dim=25,
                                              relative_bias="position", max_len=200)
