"""Experiment configuration: defaults, validation, and agreement with pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from e3sfc_core.compressor import COMPRESSORS
from e3sfc_core.config import METHODS, ExperimentConfig, parse_pairs
from e3sfc_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONF_FILES = sorted((ROOT / "conf").glob("*.toml"))


def test_defaults_parse() -> None:
    # Execute
    cfg = ExperimentConfig.from_run_config({})

    # Assert
    assert cfg == ExperimentConfig()
    assert (cfg.method, cfg.dataset, cfg.model) == ("e3sfc", "digits", "mlp")
    assert cfg.compress_downlink
    assert cfg.compressor_name == "3sfc"


def test_run_config_round_trip() -> None:
    # Prepare
    cfg = ExperimentConfig.from_run_config({"method": "topk", "num-rounds": 7, "topk-ratio": 0.05})

    # Execute
    again = ExperimentConfig.from_run_config(cfg.to_run_config())

    # Assert
    assert again == cfg
    assert all("_" not in key for key in cfg.to_run_config())


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"no-such-key": 1}, "no-such-key"),
        ({"method": "zip"}, "method"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"downlink": "sometimes"}, "downlink"),
        ({"budget-policy": "greedy"}, "budget-policy"),
        ({"device": "tpu"}, "device"),
        ({"num-rounds": 0}, "num-rounds"),
        ({"num-rounds": 2.5}, "num-rounds"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"qsgd-levels": 128}, "qsgd-levels"),
        ({"topk-ratio": 0.0}, "topk-ratio"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"clip-norm-factor": -1.0}, "clip-norm-factor"),
        ({"budget-total-bytes": -5}, "budget-total-bytes"),
        ({"iid": "maybe"}, "iid"),
        ({"round-timeout": 0}, "round-timeout"),
        ({"synthetic-samples": 20, "synthetic-samples-max": 16}, "synthetic-samples"),
        ({"budget-n-min-uplink": 0}, "budget-n-min-uplink"),
        ({"budget-total-bytes": 10**6, "budget-n-min-downlink": 17}, "budget-n-min-uplink/-downlink"),
        ({"budget-decay": 0.0}, "budget-decay"),
        ({"budget-cos-low": 0.7, "budget-cos-high": 0.6}, "budget-cos-low"),
        ({"budget-residual-growth": -0.1}, "budget-residual-growth"),
        ({"budget-adaptive-up": 0.9}, "budget-adaptive-up"),
        ({"budget-adaptive-down": 1.5}, "budget-adaptive-down"),
        ({"budget-factor-min": 2.0}, "budget-factor-min"),
        ({"budget-factor-max": 0.5}, "budget-factor-max"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(overrides: dict[str, object], key: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_run_config(overrides)

    # Assert
    assert key in str(info.value)


def test_config_error_is_a_value_error_and_lists_every_problem() -> None:
    # Execute
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_run_config({"num-rounds": 0, "method": "zip"})

    # Assert
    assert isinstance(info.value, ConfigError)
    assert "num-rounds" in str(info.value) and "method" in str(info.value)


def test_pyproject_defaults_equal_the_model_defaults() -> None:
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]

    # Execute
    defaults = ExperimentConfig().to_run_config()

    # Assert: same keys, same values, same TOML types (Flower passes them as typed)
    assert declared == defaults
    assert list(declared) == list(defaults)
    for key, value in defaults.items():
        assert type(declared[key]) is type(value), key


def test_every_method_has_a_compressor() -> None:
    # Execute
    names = {ExperimentConfig(method=m).compressor_name for m in METHODS}  # type: ignore[arg-type]

    # Assert
    assert names <= set(COMPRESSORS)


@pytest.mark.parametrize(
    ("method", "downlink", "compressed"),
    [
        ("e3sfc", "auto", True),
        ("3sfc", "auto", False),
        ("topk", "compressed", True),
        ("e3sfc", "dense", False),
    ],
)
def test_compress_downlink(method: str, downlink: str, compressed: bool) -> None:
    # Execute
    cfg = ExperimentConfig.from_run_config({"method": method, "downlink": downlink})

    # Assert
    assert cfg.compress_downlink is compressed


def test_compressor_settings_carry_the_knobs() -> None:
    # Prepare
    cfg = ExperimentConfig.from_run_config(
        {"topk-ratio": 0.2, "qsgd-levels": 7, "float16": True, "max-evals": 9, "seed": 3}
    )

    # Execute
    s = cfg.compressor_settings()

    # Assert
    assert (s.topk_ratio, s.qsgd_levels, s.float16, s.max_evals, s.seed) == (0.2, 7, True, 9, 3)


def test_config_is_frozen() -> None:
    # Prepare
    cfg = ExperimentConfig()

    # Execute / Assert
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
        cfg.num_rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize("path", CONF_FILES, ids=[p.name for p in CONF_FILES])
def test_conf_files_are_valid_overrides(path: Path) -> None:
    # Prepare
    overrides = tomllib.loads(path.read_text())

    # Execute
    cfg = ExperimentConfig.from_run_config(overrides)

    # Assert: flat kebab-case keys only, each one known
    assert overrides, f"{path.name} is empty"
    assert set(overrides) <= set(ExperimentConfig().to_run_config())
    assert all(not isinstance(v, dict) for v in overrides.values())
    assert cfg.to_run_config()["dataset"] == overrides.get("dataset", "digits")


def test_key_value_text_is_parsed_as_toml_values() -> None:
    # Execute
    raw = parse_pairs(["lr=0.1", "iid=true", "num-rounds=3", 'dataset="mnist"', "method=topk", "x = 1e3"])
    # Assert: TOML scalars, bare words as strings, keys and values trimmed
    assert raw == {"lr": 0.1, "iid": True, "num-rounds": 3, "dataset": "mnist", "method": "topk", "x": 1000.0}
    cfg = ExperimentConfig.from_run_config({k: raw[k] for k in ("lr", "num-rounds", "dataset", "method")})
    assert (cfg.lr, cfg.num_rounds, cfg.dataset, cfg.method) == (0.1, 3, "mnist", "topk")


def test_a_pair_without_equals_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_pairs(["lr"])


def test_float16_auto_means_float16_for_3sfc_payloads_only() -> None:
    """``float16 = "auto"`` (the default): 3SFC / E-3SFC payloads in float16, every other
    method (FedAvg above all) in float32; an explicit setting wins for every method."""
    for method, expected in [
        ("e3sfc", True),
        ("3sfc", True),
        ("fedavg", False),
        ("topk", False),
        ("qsgd", False),
    ]:
        cfg = ExperimentConfig.from_run_config({"method": method})
        assert cfg.compressor_settings().float16 is expected, method
    for method in ("e3sfc", "fedavg"):
        for value in (True, False):
            cfg = ExperimentConfig.from_run_config({"method": method, "float16": value})
            assert cfg.compressor_settings().float16 is value
    with pytest.raises(ConfigError, match="float16"):
        ExperimentConfig.from_run_config({"float16": "sometimes"})


def test_budget_params_carry_every_budget_key() -> None:
    # Every scheduler tunable is a config key, passed through as given (no constants)
    cfg = ExperimentConfig.from_run_config(
        {"budget-total-bytes": 5000, "budget-n-min-uplink": 3, "budget-decay": 0.7, "budget-factor-max": 3.0}
    )
    params = cfg.budget_params()
    assert (params.total_bytes, params.n_min_uplink, params.n_min_downlink) == (5000, 3, 2)
    assert (params.decay, params.factor_max, params.n_max) == (0.7, 3.0, cfg.synthetic_samples_max)
    tunables = {
        k.removeprefix("budget-").replace("-", "_") for k in cfg.to_run_config() if k.startswith("budget-")
    }
    others = {"policy", "total_bytes", "num_rounds", "n_max", "n_default"}
    assert tunables - {"policy", "total_bytes"} == set(vars(params)) - others


def test_n_min_above_samples_max_is_allowed_without_a_budget() -> None:
    cfg = ExperimentConfig.from_run_config({"synthetic-samples": 1, "synthetic-samples-max": 1})
    assert cfg.budget_params().n_default == 1
