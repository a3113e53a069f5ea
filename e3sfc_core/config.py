"""Validated experiment configuration: the one parser of Flower's ``run_config``.

Every knob is a kebab-case key with a default here *and* in ``pyproject.toml``
(``[tool.flwr.app.config]``); a test keeps the two identical. Bad values fail before
round 1 with :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .budget import BudgetParams, PolicyName
from .compressor import CompressorSettings
from .errors import ConfigError

Method = Literal["e3sfc", "3sfc", "fedavg", "topk", "stc", "signsgd", "qsgd", "powersgd"]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class ExperimentConfig(BaseModel):
    """Everything one run needs.

    Tuning notes: ``synthetic_samples`` is 3SFC's n when no byte budget is set (bytes per
    payload grow linearly in n, cosine to the target grows fast for small n). With
    ``budget_total_bytes > 0`` the ``budget_policy`` chooses n per round and direction in
    ``[budget_n_min_*, synthetic_samples_max]`` and the run never spends more than the
    total; the ``budget_*`` tunables are the scheduler's (``e3sfc_core.budget``). The
    lower bound defaults to 2: at n = 1 the digits MLP was unstable without the
    correction (``bench/results/equal_budget.md``), and n = 2 is the unbudgeted default.
    ``correction_share`` is the share of each 3SFC payload's bytes given to a sparse
    correction of what the synthetic batch misses (0: the paper's 3SFC; see
    ``corrected``): without it, error feedback piles up what a few samples cannot
    express and convolutional models do not learn (``bench/results/archive/model_matrix_payload_bytes.md``);
    ``batch_min_cosine`` sends the batch only where its own cosine with the target reaches
    it (0.7 helped conv nets with the float correction code; with the default code it
    does not).
    ``payload_ratio`` keeps a corrected payload at least the dense float32 update's bytes
    divided by it: the batch's bytes follow the input size, not the model, so without it
    a ResNet-18 payload is 1/7,000 of its update (0: the batch and the share alone size
    it; the default, 160, is just under the digits MLP's n = 2 payload, which it leaves
    as it is, but lifts its n = 1 payload to about that size). ``correction_code``
    ``"ternary"`` sends the correction's entries as STC does (one magnitude, a sign
    each), about 3x as many as ``"float"`` values in the same bytes; ``"auto"`` sends,
    per payload, whichever leaves the smaller residual: ternary learned far better on the
    ConvNet and LeNet-5 but far worse on RegNetX, whose layers' magnitudes differ widely
    (``bench/results/model_matrix.md``).
    ``downlink="auto"`` compresses the downlink for ``e3sfc`` only (the paper's
    double-way method), except in rounds where relaying the clients' synthetic payloads
    costs at most ``relay_max_fraction`` of the dense weights (without a byte budget);
    ``"compressed"`` compresses for any method, ``"relay"`` always relays, ``"dense"``
    sends the aggregate as it is.
    ``clip_norm_factor`` clips every decompressed client update to that multiple of the
    round's median update norm (0 turns clipping off). ``num_threads`` sets torch's CPU
    threads in every process of the run (0 keeps torch's default); on small or shared
    machines 1 is much faster (bench/results/compression_speed.md).
    """

    model_config = ConfigDict(alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True)

    method: Method = "e3sfc"
    dataset: Literal["digits", "mnist", "fmnist", "emnist", "cifar10", "cifar100"] = "digits"
    model: Literal["mlp", "convnet", "lenet5", "resnet18", "vgg11", "regnetx_200mf"] = "mlp"
    num_rounds: int = Field(40, ge=1, le=100_000)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    min_train_nodes: int = Field(2, ge=1)
    local_epochs: int = Field(5, ge=1, le=1000)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0.0, le=10.0)
    dirichlet_alpha: float = Field(1.0, gt=0.0)
    iid: bool = False
    synthetic_samples: int = Field(2, ge=1, le=4096)
    synthetic_samples_max: int = Field(16, ge=1, le=4096)
    max_evals: int = Field(20, ge=1, le=10_000)
    stall_window: int = Field(5, ge=1, le=10_000)
    min_improvement: float = Field(1e-3, ge=0.0)
    init_scale: float = Field(0.25, gt=0.0, le=100.0)
    scale_mode: Literal["layer", "global"] = "layer"
    residual_cap: float = Field(0.0, ge=0.0)
    correction_share: float = Field(0.75, ge=0.0, le=0.99)
    batch_min_cosine: float = Field(0.0, ge=0.0, le=1.0)
    payload_ratio: float = Field(160.0, ge=0.0, le=1e9)
    correction_code: Literal["auto", "ternary", "float"] = "auto"
    float16: bool | Literal["auto"] = "auto"
    downlink: Literal["auto", "compressed", "relay", "dense"] = "auto"
    downlink_samples: int = Field(0, ge=0, le=4096)
    relay_max_fraction: float = Field(0.02, ge=0.0, le=1.0)
    budget_policy: PolicyName = "constant"
    budget_total_bytes: int = Field(0, ge=0)
    budget_n_min_uplink: int = Field(2, ge=1, le=4096)
    budget_n_min_downlink: int = Field(2, ge=1, le=4096)
    budget_decay: float = Field(0.9, gt=0.0, le=1.0)
    budget_cos_low: float = Field(0.3, ge=0.0, le=1.0)
    budget_cos_high: float = Field(0.6, ge=0.0, le=1.0)
    budget_residual_growth: float = Field(0.1, ge=0.0, le=100.0)
    budget_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0)
    budget_adaptive_up: float = Field(1.25, ge=1.0, le=16.0)
    budget_adaptive_down: float = Field(0.8, gt=0.0, le=1.0)
    budget_factor_min: float = Field(0.5, gt=0.0, le=1.0)
    budget_factor_max: float = Field(2.0, ge=1.0, le=64.0)
    topk_ratio: float = Field(0.01, gt=0.0, le=1.0)
    qsgd_levels: int = Field(16, ge=1, le=127)
    qsgd_bucket_size: int = Field(512, ge=1, le=65536)
    powersgd_rank: int = Field(4, ge=1, le=1024)
    clip_norm_factor: float = Field(0.0, ge=0.0)
    seed: int = Field(0, ge=0, lt=2**31)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_root: str = "data"
    download: bool = False
    output_dir: str = "outputs"
    run_name: str = ""
    checkpoint_every: int = Field(0, ge=0)
    resume: bool = False
    round_timeout: float = Field(600.0, gt=0.0)
    num_partitions: int = Field(10, ge=1)
    num_threads: int = Field(0, ge=0, le=1024)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.synthetic_samples > self.synthetic_samples_max:
            raise ValueError("synthetic-samples must not exceed synthetic-samples-max")
        n_min = max(self.budget_n_min_uplink, self.budget_n_min_downlink)
        if self.budget_total_bytes and n_min > self.synthetic_samples_max:
            raise ValueError("budget-n-min-uplink/-downlink must not exceed synthetic-samples-max")
        if self.budget_cos_low > self.budget_cos_high:
            raise ValueError("budget-cos-low must not exceed budget-cos-high")
        if self.downlink == "relay" and self.budget_total_bytes:
            raise ValueError(
                "downlink = relay cannot be planned by the budget scheduler yet: set budget-total-bytes = 0"
            )
        return self

    @property
    def compress_downlink(self) -> bool:
        """Whether the server compresses the global update (double-way) when it does not
        relay the round's uplink payloads."""
        return self.downlink == "compressed" or (self.downlink == "auto" and self.method == "e3sfc")

    def relays(self, bundle_bytes: int, dense_bytes: int) -> bool:
        """Whether this round's downlink is the relayed bundle of uplink payloads:
        always with ``relay``; with ``auto`` (E-3SFC, no byte budget) when the bundle is
        at most ``relay-max-fraction`` of the dense weights."""
        if self.downlink == "relay":
            return True
        auto = self.downlink == "auto" and self.method == "e3sfc" and not self.budget_total_bytes
        return auto and bundle_bytes <= self.relay_max_fraction * dense_bytes

    @property
    def partition_alpha(self) -> float:
        """Dirichlet concentration for partitioning (infinity means IID)."""
        return float("inf") if self.iid else self.dirichlet_alpha

    @property
    def compressor_name(self) -> str:
        """Registry key of the compressor: e3sfc is 3SFC on both links."""
        return "3sfc" if self.method == "e3sfc" else self.method

    @property
    def uses_float16(self) -> bool:
        """``float16 = "auto"``: float16 for 3SFC's synthetic payloads, whose scales are
        fitted after the rounding (twice the samples for the same bytes learned better than
        float32, ``bench/results/archive/model_matrix_payload_bytes.md``), float32 for the
        other methods, so FedAvg stays the float32 reference the papers compare against."""
        if self.float16 == "auto":
            return self.method in ("3sfc", "e3sfc")
        return self.float16

    def compressor_settings(self, layer_count: int = 0) -> CompressorSettings:
        """The subset of knobs the compressors read (``layer_count``: the model's number of
        parameter tensors, which sizes 3SFC payloads with per-layer scales)."""
        return CompressorSettings(
            topk_ratio=self.topk_ratio,
            qsgd_levels=self.qsgd_levels,
            qsgd_bucket_size=self.qsgd_bucket_size,
            float16=self.uses_float16,
            max_evals=self.max_evals,
            stall_window=self.stall_window,
            min_improvement=self.min_improvement,
            init_scale=self.init_scale,
            seed=self.seed,
            scale_mode=self.scale_mode,
            layer_count=layer_count,
            powersgd_rank=self.powersgd_rank,
            model=self.model,
            correction_share=self.correction_share,
            batch_min_cosine=self.batch_min_cosine,
            payload_ratio=self.payload_ratio,
            correction_code=self.correction_code,
        )

    def budget_params(self) -> BudgetParams:
        """The byte-budget scheduler's settings, validated here once: the run's policy,
        total and rounds, 3SFC's sample range (``synthetic-samples`` when unlimited) and
        the policies' tunables."""
        return BudgetParams(
            policy=self.budget_policy,
            total_bytes=self.budget_total_bytes,
            num_rounds=self.num_rounds,
            n_min_uplink=self.budget_n_min_uplink,
            n_min_downlink=self.budget_n_min_downlink,
            n_max=self.synthetic_samples_max,
            n_default=self.synthetic_samples,
            decay=self.budget_decay,
            cos_low=self.budget_cos_low,
            cos_high=self.budget_cos_high,
            residual_growth=self.budget_residual_growth,
            accuracy_drop=self.budget_accuracy_drop,
            adaptive_up=self.budget_adaptive_up,
            adaptive_down=self.budget_adaptive_down,
            factor_min=self.budget_factor_min,
            factor_max=self.budget_factor_max,
        )

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case mapping, the inverse of :func:`from_run_config`."""
        return self.model_dump(by_alias=True)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Parse Flower's flat ``run_config`` (or any kebab-case mapping).

        Raises
        ------
        ConfigError
            Unknown key, wrong type or out-of-range value; the message names each key.
        """
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "config"
                problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
            raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def parse_value(text: str) -> Any:
    """A value as Flower's ``--run-config`` reads it: a TOML scalar (``3``, ``0.5``,
    ``true``, ``"x"``); bare words become strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.1", "iid=true"]`` -> ``{"lr": 0.1, "iid": True}`` (the one parser of
    ``key=value`` text: the launchers, the in-process CLI and the benchmarks use it).

    Raises
    ------
    ConfigError
        For an item without ``=``.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out
