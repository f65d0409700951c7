"""Settings of ``python -m meld.sweep``: the search space over fine-tune settings, and how to search it.

    base / base_overrides: the fine-tune config every trial starts from (``meld.finetune.load_config``)
    space:     the searched parameters, each a dotted fine-tune key (``train.lr``) with its range or choices
    objective: a dev metric (``macro_f1`` by default) and its direction; test is never looked at
    study:     name, folder, storage, trial count, workers, heartbeat, what a trial's run writes
    sampler:   TPE or random, seeded
    pruner:    median, hyperband or none, fed by one report per epoch
    final:     how many seeds the best config is re-run with before it is scored on test

``configs/sweep/fast.yaml`` (the no-argument demo) and ``configs/sweep/full.yaml`` are examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from clara.config import ConfigError

# What Optuna can store as a categorical choice.
_CHOICE_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One searched setting. ``key`` is a dotted fine-tune config key; ``only_if`` makes it conditional.

    ``only_if`` maps the key of an EARLIER parameter to the values for which this one is searched
    (``{loss.name: [focal]}`` for ``loss.focal_gamma``); otherwise the base config's value stands.
    """

    key: str
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None  # a grid: low, low + step, ...; not with log
    choices: tuple[Any, ...] = ()
    only_if: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"space[{self.key}]"
        if not self.key or any(not part for part in self.key.split(".")):
            raise ConfigError(f"space: {self.key!r} is not a dotted config key such as train.lr")
        if any(not isinstance(values, (list, tuple)) for values in self.only_if.values()):
            raise ConfigError(f"{where}.only_if: map each key to a list of values, e.g. {{loss.name: [focal]}}")
        empty = [key for key, values in self.only_if.items() if not values]
        if empty:  # a condition no value meets: this parameter would silently never be searched
            raise ConfigError(f"{where}.only_if: {empty[0]} lists no values, so {self.key} would never be searched")
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"{where}: a categorical parameter needs choices")
            if any(not isinstance(choice, _CHOICE_TYPES) for choice in self.choices):
                raise ConfigError(f"{where}: choices must be numbers, strings, true/false or null")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ConfigError(f"{where}: choices repeat")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ConfigError(f"{where}: a categorical parameter takes choices, not low/high/log/step")
            return
        if self.choices:
            raise ConfigError(f"{where}: choices are for type categorical")
        if self.low is None or self.high is None or not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ConfigError(f"{where}: a {self.type} parameter needs finite low and high")
        if self.low > self.high:
            raise ConfigError(f"{where}: low {self.low} is above high {self.high}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ConfigError(f"{where}: an int parameter needs whole low and high")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}: log scale needs low > 0")
        if self.log and self.step is not None:
            raise ConfigError(f"{where}: step and log cannot be combined")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"{where}: step must be positive")
        if self.type == "int" and self.step is not None and self.step != int(self.step):
            raise ConfigError(f"{where}: an int parameter needs a whole step")
        # Optuna would quietly lower high to the last grid point (low 0, high 1, step 0.3 searches 0 to 0.9);
        # decimal, as Optuna checks it, so that 0.1 steps from 0 reach 1.
        if self.step is not None and (Decimal(str(self.high)) - Decimal(str(self.low))) % Decimal(str(self.step)):
            raise ConfigError(f"{where}: high - low ({self.high} - {self.low}) is not a multiple of step {self.step}")


@dataclass(frozen=True)
class Objective:
    metric: str = "macro_f1"  # a key of the dev metrics; dotted for nested ones (per_class.fear.f1)
    direction: Literal["maximize", "minimize"] = "maximize"


@dataclass(frozen=True)
class StudyConfig:
    name: str = "meld"
    dir: str = "runs/sweeps/meld"  # trials/, study.db, summary and plots
    storage: str = ""  # "" = sqlite in dir; an Optuna RDB URL (postgresql://...); or journal:PATH
    n_trials: int = 50  # finished (complete or pruned) trials to reach; a rerun only adds the missing ones
    workers: int = 1  # local worker processes on the one storage
    heartbeat_interval: int = 10  # seconds; a RUNNING trial silent for grace_period is failed (its worker died)
    grace_period: int = 60
    max_failures: int = 5  # a worker stops after this many failed trials (a broken space fails every trial)
    plots: bool = True  # Optuna's plots at the end (their imports alone take seconds)
    # What each trial's run writes (meld.finetune's `outputs`): light = metrics, report tables, TensorBoard
    # scalars and hparams, no figures, PR curves or projector; the final runs of the best config are full.
    trial_outputs: Literal["light", "full"] = "light"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("study.name must not be empty")
        if self.n_trials < 1 or self.workers < 1 or self.max_failures < 1:
            raise ConfigError("study: n_trials, workers and max_failures must be at least 1")
        if self.heartbeat_interval < 1 or self.grace_period <= self.heartbeat_interval:
            raise ConfigError("study: heartbeat_interval must be >= 1 s and grace_period longer than it")


@dataclass(frozen=True)
class SamplerConfig:
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0  # each trial samples from a stream of this seed and its number (see meld.sweep_study)
    n_startup_trials: int = 10  # TPE: random trials before it models the results

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:  # numpy's seeds; any other failed at the first trial with a traceback
            raise ConfigError(f"sampler.seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.n_startup_trials < 0:
            raise ConfigError(f"sampler.n_startup_trials must be >= 0, got {self.n_startup_trials}")


@dataclass(frozen=True)
class PrunerConfig:
    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = 5  # median: finished trials before any pruning
    n_warmup_steps: int = 0  # median: epochs reported before a trial may be pruned
    min_resource: int = 1  # hyperband: epochs of the smallest bracket
    max_resource: int = 0  # hyperband: epochs of a full trial; 0 = learned from the first finished trial
    reduction_factor: int = 3  # hyperband

    def __post_init__(self) -> None:
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0 or self.max_resource < 0:
            raise ConfigError("pruner: n_startup_trials, n_warmup_steps and max_resource must be >= 0")
        if self.min_resource < 1 or self.reduction_factor < 2:
            raise ConfigError("pruner: min_resource must be >= 1 and reduction_factor >= 2")
        if 0 < self.max_resource < self.min_resource:  # Optuna's hyperband would make no bracket: no pruning at all
            raise ConfigError(f"pruner: max_resource {self.max_resource} is below min_resource {self.min_resource}")


@dataclass(frozen=True)
class FinalConfig:
    seeds: int = 3  # re-runs of the best config, scored once on test; 0 = none
    seed_key: str = "train.seed"  # the fine-tune key set to the best trial's seed + 1, + 2, ... (fresh seeds)

    def __post_init__(self) -> None:
        if self.seeds < 0:
            raise ConfigError(f"final.seeds must be >= 0, got {self.seeds}")


@dataclass(frozen=True)
class SweepConfig:
    base: str = ""  # a fine-tune YAML every trial starts from; "" = meld.finetune's defaults
    base_overrides: tuple[str, ...] = ()  # key=value fine-tune settings on top of base, fixed for all trials
    space: tuple[Param, ...] = ()
    objective: Objective = field(default_factory=Objective)
    study: StudyConfig = field(default_factory=StudyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    final: FinalConfig = field(default_factory=FinalConfig)

    def __post_init__(self) -> None:
        if not self.space:
            raise ConfigError("space: declare at least one parameter to search")
        seen: dict[str, Param] = {}
        for param in self.space:
            if param.key in seen:
                raise ConfigError(f"space: {param.key} is declared twice")
            for key, values in param.only_if.items():
                if key not in seen:
                    raise ConfigError(f"space[{param.key}].only_if: {key} is not an earlier parameter of the space")
                # A value the earlier parameter never takes (a typo, a quoted number) would silently
                # leave this parameter unsearched.
                never = [value for value in values if not _can_take(seen[key], value)]
                if never:
                    raise ConfigError(f"space[{param.key}].only_if: {key} never takes {never!r} "
                                      f"({_values_of(seen[key])})")
            seen[param.key] = param


def _can_take(param: Param, value: Any) -> bool:
    if param.type == "categorical":
        return value in param.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not param.low <= value <= param.high:
        return False
    # An int parameter takes whole numbers on its grid only (low, low + step, ...).
    return param.type != "int" or (value - param.low) % (param.step or 1) == 0


def _values_of(param: Param) -> str:
    if param.type == "categorical":
        return "choices: " + ", ".join(map(repr, param.choices))
    return f"range: {param.low} to {param.high}" + (f" in steps of {param.step}" if param.step is not None else "")
