"""A sweep's study: the search space turned into fine-tune configs, the storage, the Optuna study.

``Backend`` names the fine-tune entry points a sweep drives: ``meld.finetune``'s in use, a stand-in in
tests. A study is identified by its storage and name; its user attribute ``sweep`` records what its
values mean (the base fine-tune config as resolved when the study was made, the space, the objective),
so a rerun that changes any of them (an edited base YAML included) is refused instead of mixing
incomparable trials.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from clara import config as config_lib
from clara.config import ConfigError
from clara.run_dir import differing_keys
from meld.errors import MeldDataError
from meld.sweep_config import Param, SweepConfig

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SweepError(Exception):
    """A problem the user can fix (storage, study folder, a failing search space); one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """The fine-tune entry points a sweep drives (``meld.finetune`` in use; a stand-in in tests).

    ``user_errors``: exceptions a run raises for the user's inputs (missing data, a bad checkpoint);
    every trial would hit them again, so the sweep stops at the first with its message.
    ``point_errors``: those among them that only some points of the space meet (a batch larger than
    the training set): that trial fails with its reason, and the search goes on.
    ``same_run(run_dir, config)``: whether ``run_dir`` holds a run that ``config`` resumes or reuses (the
    fine-tune's own rule, which lets paths be spelt otherwise and workers or devices change); None:
    its config.yaml must equal ``config`` exactly.
    """

    load_config: Callable[[str | None, Sequence[str]], Any]
    run_finetune: Callable[..., dict]
    user_errors: tuple[type[BaseException], ...] = (ConfigError, MeldDataError)
    outputs_key: str = ""  # the config key of a run's output level (full | light); "" = the runs have none
    device_key: str = ""  # the config key of a run's device (auto | cpu | cuda:N); "" = the runs have none
    seeds_key: str = ""  # the config key of a run's number of seeds; "" = a run is always one seed
    point_errors: tuple[type[BaseException], ...] = ()
    same_run: Callable[[Path, Any], bool] | None = None


def finetune_backend() -> Backend:
    from clara.engine import BatchDoesNotFit
    from meld import finetune  # imported here: tests drive a stand-in instead

    return Backend(finetune.load_config, finetune.run_finetune, finetune.USER_ERRORS, outputs_key="outputs",
                   device_key="train.device", seeds_key="seeds", point_errors=(BatchDoesNotFit,),
                   same_run=_same_finetune_run)


def _same_finetune_run(run_dir: Path, config: Any) -> bool:
    """Whether ``run_dir`` holds a fine-tune run that ``config`` resumes (as ``--out`` would take it)."""
    from clara.run_dir import OutDirError
    from meld import finetune

    if not finetune.holds_run(run_dir):
        return False
    try:
        finetune.check_out_dir(run_dir, config)
    except OutDirError:
        return False
    return True


# ---- the search space -> fine-tune configs


def override(key: str, value: Any) -> str:
    # JSON is valid YAML, so strings keep their quotes and null/true stay typed through the override parser.
    return f"{key}={json.dumps(value)}"


def trial_config(config: SweepConfig, backend: Backend, params: Mapping[str, Any], extra: Sequence[str] = ()) -> Any:
    """The fine-tune config of a trial: base, its fixed overrides, then the sampled values."""
    overrides = [*config.base_overrides, *(override(k, v) for k, v in params.items()), *extra]
    return backend.load_config(config.base or None, overrides)


def outputs_override(backend: Backend, level: str) -> list[str]:
    """The override giving a run the output level ``level`` (light for trials, full for the final runs)."""
    return [override(backend.outputs_key, level)] if backend.outputs_key else []


def check_space(config: SweepConfig, backend: Backend) -> None:
    """Build the fine-tune config at every bound and choice (and with the final runs' seed key), so a
    misspelt key fails before any trial."""
    base = trial_config(config, backend, {}, outputs_override(backend, config.study.trial_outputs))
    runs = functools.reduce(getattr, backend.seeds_key.split("."), base) if backend.seeds_key else 1
    if runs != 1:
        # Each seed would report epochs 1, 2, ... again (the pruner keeps only the first report of a
        # step), and the objective would be the best seed's: the final runs are the sweep's seeds.
        raise ConfigError(f"base config: {backend.seeds_key}={runs}: a sweep trial is one run; final.seeds "
                          "re-runs the best config with several seeds")
    for param in config.space:
        values = param.choices if param.type == "categorical" else (param.low, param.high)
        for value in values:
            value = int(value) if param.type == "int" else value
            try:
                trial_config(config, backend, {param.key: value})
            except ConfigError as err:
                raise ConfigError(f"space[{param.key}] = {value!r}: {err}") from None
    if config.final.seeds:
        # The final runs set this key; a misspelling would otherwise surface after every trial had run.
        try:
            trial_config(config, backend, {config.final.seed_key: 0})
        except ConfigError as err:
            raise ConfigError(f"final.seed_key {config.final.seed_key!r}: {err}") from None
        final_seed(config, base)  # a key that holds no whole number (model.dropout) too


def final_seed(config: SweepConfig, finetune_config: Any) -> int:
    """The value of ``final.seed_key`` in a fine-tune config: the final runs' seeds count on from it."""
    key = config.final.seed_key
    node: Any = config_lib.to_dict(finetune_config)
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"final.seed_key: the fine-tune config has no {key!r}")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int):
        raise ConfigError(f"final.seed_key: {key} is not an integer")
    return node


def suggest(trial: optuna.Trial, space: Sequence[Param]) -> dict[str, Any]:
    """Sample the space in order; a parameter whose ``only_if`` does not hold is left at the base value."""
    params: dict[str, Any] = {}
    for param in space:
        if any(key not in params or params[key] not in values for key, values in param.only_if.items()):
            continue
        if param.type == "float":
            params[param.key] = trial.suggest_float(param.key, param.low, param.high, log=param.log, step=param.step)
        elif param.type == "int":
            params[param.key] = trial.suggest_int(param.key, int(param.low), int(param.high), log=param.log,
                                                  step=int(param.step or 1))
        else:
            params[param.key] = trial.suggest_categorical(param.key, list(param.choices))
    return params


def metric_value(metrics: Mapping, path: str) -> float:
    """The number at a dotted path of a split's metrics (``macro_f1``, ``per_class.fear.f1``)."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            known = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))
            raise ConfigError(f"objective.metric: the dev metrics have no {path!r} (scalars: {known})")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float, np.number)):
        raise ConfigError(f"objective.metric: {path!r} is not a number")
    return float(node)


# ---- storage and study


def storage_url(config: SweepConfig, study_dir: Path) -> str:
    return config.study.storage or f"sqlite:///{study_dir.resolve() / 'study.db'}"


def shown_url(url: str) -> str:
    """The storage URL for messages, its password (postgresql://user:secret@host/db) masked."""
    return re.sub(r"(://[^:/@]+:)[^@/]*@", r"\1***@", url)


def open_storage(config: SweepConfig, study_dir: Path) -> optuna.storages.BaseStorage:
    url = storage_url(config, study_dir)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.name:
            raise SweepError("storage journal:PATH needs a file path, e.g. journal:runs/sweeps/study.log")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        except OSError as err:  # a folder in its place, no permission, a read-only disk
            raise SweepError(f"storage {url}: {err.strerror or err}: {err.filename or path}") from None
    if "://" not in url:
        raise SweepError(f"storage {url!r}: expected an RDB URL (sqlite:///FILE, postgresql://...) or journal:PATH")
    if url.startswith("sqlite") and _in_memory(url):
        # Private to each connection and gone at exit: Optuna's own commits fail on it with a traceback,
        # and there would be nothing to resume or share. A blank path is likely an unset variable.
        raise SweepError(f"storage {url}: an in-memory SQLite database cannot hold a study; give a file, "
                         "e.g. sqlite:///runs/sweeps/study.db, or leave --storage out for STUDY_DIR/study.db")
    # SQLite lets one writer in at a time: workers wait up to a minute for it instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as err:  # sqlalchemy's URL, driver and connection errors, and Optuna's schema checks
        message = shown_url(str(err).splitlines()[0]) if str(err) else ""
        raise SweepError(f"storage {shown_url(url)}: {type(err).__name__}: {message}") from None
    if url.startswith("sqlite"):
        _write_ahead_log(storage.engine)
    return storage


def _in_memory(url: str) -> bool:
    try:
        database = sqlalchemy.engine.make_url(url).database
    except sqlalchemy.exc.ArgumentError:
        return False  # RDBStorage names what is wrong with the URL
    return not database or ":memory:" in database


def _write_ahead_log(engine: sqlalchemy.engine.Engine) -> None:
    """Put every later connection of a SQLite storage in WAL mode, still syncing each commit (synchronous=FULL).

    A trial commits some twenty times (its parameters, one report per epoch, heartbeats); with SQLite's
    default rollback journal a commit took ~17 ms on the 2-core dev box, with the write-ahead log ~4 ms,
    equally durable. Readers then also stop blocking the writer. WAL needs every worker on one machine,
    which SQLite storage always did (several machines: journal:PATH or a server database).
    """

    def on_connect(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # persistent in the file; a no-op once set
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", on_connect)
    engine.dispose()  # the connections Optuna opened to set up the schema reconnect with the pragmas


def base_config(config: SweepConfig, backend: Backend) -> dict[str, Any]:
    """The fine-tune settings every trial starts from (``base``, then ``base_overrides``), resolved to
    plain values, as the study records them."""
    return json.loads(json.dumps(config_lib.to_dict(trial_config(config, backend, {}))))


def _fingerprint(config: SweepConfig, backend: Backend) -> dict[str, Any]:
    """What a trial's value means; a rerun that changes it would mix incomparable trials in one study.

    ``base`` and ``base_overrides`` say how the base config was given; ``base_config`` is what they
    resolved to, so an edit to the base YAML (or preset) between runs is caught, and the record shows
    which settings the trials ran with.
    """
    return json.loads(json.dumps({
        "base": config.base, "base_overrides": config.base_overrides, "base_config": base_config(config, backend),
        "space": config_lib.to_dict(config.space), "objective": config_lib.to_dict(config.objective),
    }))


def _differences(stored: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> list[str]:
    """What differs between a study's record and this run's, for the refusal: empty when it may resume."""
    if "base_config" not in stored:
        # Recorded before the resolved base config was: only how the base was given can be compared.
        return [key for key in ("base", "base_overrides", "space", "objective") if stored.get(key) != fingerprint[key]]
    changed = [key for key in ("space", "objective") if stored[key] != fingerprint[key]]
    then, now = stored["base_config"], fingerprint["base_config"]
    # A key on one side only is a fine-tune setting added or dropped by an update of the kit since
    # the study was made, not a change of the user's: it is left out.
    keys = [key for key in differing_keys(then, now) if _MISSING not in (_at(then, key), _at(now, key))]
    if keys:
        shown = "; ".join(f"{key}: {_at(then, key)!r} then, {_at(now, key)!r} now" for key in keys[:3])
        changed.insert(0, f"base config ({shown}{'; ...' if len(keys) > 3 else ''})")
    return changed


_MISSING = object()


def _at(tree: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a nested mapping, or _MISSING."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def make_pruner(config: SweepConfig) -> optuna.pruners.BasePruner:
    pruner = config.pruner
    if pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.n_startup_trials,
                                           n_warmup_steps=pruner.n_warmup_steps)
    if pruner.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=pruner.min_resource,
                                              max_resource=pruner.max_resource or "auto",
                                              reduction_factor=pruner.reduction_factor)
    return optuna.pruners.NopPruner()


class _TrialSeededSampler(optuna.samplers.BaseSampler):
    """Samples each trial with a sampler seeded by ``sampler.seed`` and the trial's number.

    Trial numbers are handed out by the storage, so they are unique across every worker of the study,
    local or on another machine: no two workers draw the same stream, even when they start together on
    the same study (a seed per worker or per start would repeat across machines), a resumed run draws
    fresh points, and a one-worker sweep is reproducible.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._make(int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(config: SweepConfig) -> optuna.samplers.BaseSampler:
    if config.sampler.type == "random":
        return _TrialSeededSampler(lambda seed: optuna.samplers.RandomSampler(seed=seed), config.sampler.seed)
    startup = config.sampler.n_startup_trials
    return _TrialSeededSampler(lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
                               config.sampler.seed)


def open_study(config: SweepConfig, study_dir: Path, backend: Backend | None = None) -> optuna.Study:
    """The study of ``config`` in its storage (made when new), checked against the record of what its
    values mean; ``backend`` resolves the base config (default: meld.finetune's, as run_sweep)."""
    storage = open_storage(config, study_dir)
    study = optuna.create_study(storage=storage, study_name=config.study.name, direction=config.objective.direction,
                                pruner=make_pruner(config), load_if_exists=True)
    fingerprint = _fingerprint(config, backend or finetune_backend())
    stored = study.user_attrs.get("sweep")
    changed = _differences(stored, fingerprint) if stored is not None else []
    if changed:
        raise SweepError(f"study {config.study.name!r} in {shown_url(storage_url(config, study_dir))} was made "
                         f"with another {', '.join(changed)}; use a new study.name or --study-dir to search "
                         "a different space, or the settings it was made with to resume it")
    if stored is None or "base_config" not in stored:  # a new study, or one recorded before base_config was
        study.set_user_attr("sweep", fingerprint)
    study.sampler = make_sampler(config)
    return study


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / "trials" / f"trial-{number:04d}"


def check_trial_dirs(study: optuna.Study, study_dir: Path) -> None:
    """Refuse a study folder whose trial folders belong to another study: a trial would write into them."""
    known = {trial.number for trial in study.get_trials(deepcopy=False)}
    numbers = {path.name: path.name.removeprefix("trial-") for path in (study_dir / "trials").glob("trial-*")}
    strays = sorted(name for name, number in numbers.items() if number.isdigit() and int(number) not in known)
    if strays:
        raise SweepError(f"{study_dir / 'trials'} holds {', '.join(strays[:3])}{' ...' if len(strays) > 3 else ''}, "
                         f"which study {study.study_name!r} in this storage never ran; use a new --study-dir "
                         "or the storage that made them")


