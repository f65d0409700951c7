"""The one config system: frozen dataclasses, loaded from YAML, with ``key=value`` overrides.

Every driver in the kit (model presets, pretraining, fine-tuning, zero-shot, sweeps) describes its
settings as a tree of frozen dataclasses.  This module turns plain mappings (from YAML or JSON) into
such trees and back, rejecting unknown keys and wrongly typed values with one message that names each
offending key (all of them, not just the first) and the file it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import yaml

from clara.io_utils import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


class _Problems(ConfigError):
    """Several problems the loader found in one pass, in field order: a bad section cannot be built, so
    neither can its parent, and stopping at the first made the user fix and rerun once per mistake.
    Internal: from_dict turns it into a plain ConfigError, the problems joined with "; " (as the
    dataclasses' own __post_init__ checks join theirs)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _problems(err: ConfigError) -> list[str]:
    """The separate messages in ``err``: several for a _Problems, else its one message."""
    return list(err.problems) if isinstance(err, _Problems) else [str(err)]


def _raise_all(errors: Sequence[ConfigError]) -> None:
    """Raise nothing for no errors, the error itself for one (its type and message kept), else one
    _Problems listing every problem of every error in the order given."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise _Problems([problem for err in errors for problem in _problems(err)])


_SURROGATE = re.compile(r"[\ud800-\udfff]")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader less the YAML 1.1 readings that turn plain text into something else:
    yes/no/on/off as booleans (``language: no``, Norwegian, became False), a leading 0 as octal (``010``
    became 8), ``1:30`` as base 60 (90) and dates (a ``datetime.date``, which no setting takes).  Those
    stay strings.  What it reads as a number, boolean or null, yaml.safe_load reads the same, so what
    yaml.safe_dump writes (save_yaml) loads back the same with either.  Repeated keys are an error."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # PyYAML keeps the last of repeated keys: a second ``train:`` section would silently drop the first.
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_str(self, node: yaml.ScalarNode) -> str:
        # The CLIs pass paths (and sweeps their values) as JSON overrides, JSON being YAML, but JSON
        # escapes a character past U+FFFF as a surrogate pair, "\ud83d\ude00", whose halves YAML reads
        # as two lone surrogates: a path no file system takes (a UnicodeEncodeError traceback).
        text = self.construct_scalar(node)
        if _SURROGATE.search(text):
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
        return text


_Loader.add_constructor("tag:yaml.org,2002:str", _Loader.construct_yaml_str)
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$", "-+0123456789"),
    ("float", r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("merge", r"^(?:<<)$", "<"),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``hint``; convert lists/ints where that is lossless."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return _from_mapping(hint, value, where)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # an optional setting: the one type's own reason says more
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            item_hints = args
        else:
            item_hints = (args[0] if args else Any,) * len(value)
        items, errors = [], []
        for i, (v, a) in enumerate(zip(value, item_hints)):
            try:
                items.append(_coerce(v, a, f"{where}[{i}]"))
            except ConfigError as err:  # every bad item, not just the first
                errors.append(err)
        _raise_all(errors)
        return tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponent forms without a dot (``2e-3``) as strings.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range (10**400): float() and isfinite() raise
            number = math.inf
        # No setting means anything by nan or inf, and both slip past range checks (nan > 0 is
        # false, and so is nan <= 0) to fail far from the config, e.g. in torch's optimiser.
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build ``cls`` from ``data``, or raise every problem found: the unknown keys at this level first,
    then each field's problems (its section's, recursively) in the dataclass's field order."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    errors: list[ConfigError] = []
    # str: a YAML key may be a number (``1: x``), which sorted() beside a string and join() refused.
    unknown = sorted(str(key) for key in data if key not in fields)
    if unknown:
        errors.append(ConfigError(
            f"{where + ': ' if where else ''}unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}"
        ))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in fields:
        if name not in data:
            continue
        sub = f"{where}.{name}" if where else name
        try:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        except ConfigError as err:  # a section's own __post_init__ checks included; go on to its siblings
            errors.append(err)
    _raise_all(errors)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping; ``source`` names the origin in errors.

    Errors read ``<source>: <dotted key>: <what was expected>``, e.g. ``run.yaml: train.lr: expected
    a number, got 'fast'``; the source is kept apart from the key so a path's dots are not mistaken
    for one.  Every problem is in the one error, in field order, joined with "; " (``run.yaml:
    train.lr: expected a number, got 'fast'; data.batch_size: expected an integer, got 'x'``), so a
    user does not fix one, rerun and meet the next.
    """
    try:
        return _from_mapping(cls, data or {}, "")
    except _Problems as err:
        raise ConfigError(f"{source + ': ' if source else ''}{err}") from None
    except ConfigError as err:
        if not source:
            raise
        raise ConfigError(f"{source}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The nested plain-dict form of a config (tuples become lists, so it round-trips via YAML)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"audio.layers=4"`` -> (["audio", "layers"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. audio.layers=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    path = key.split(".")
    if "" in path:  # else "a..b" or "a." reads as an unknown key with no name
        raise ConfigError(f"override {text!r}: empty part in the key {key!r}")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, list[str], Any]]:
    """(text, key path, value) of each override; one ConfigError naming every malformed one, in order."""
    parsed, errors = [], []
    for text in overrides:
        try:
            parsed.append((text, *parse_override(text)))
        except ConfigError as err:
            errors.append(err)
    if len(errors) > 1:
        raise ConfigError("; ".join(map(str, errors)))
    if errors:
        raise errors[0]
    return parsed


def check_overrides(overrides: Sequence[str], field: str) -> None:
    """Raise ConfigError, prefixed with ``field`` (where the list came from), naming every malformed
    ``key=value`` text; what the overrides set is checked where they are applied."""
    try:
        _parse_overrides(overrides)
    except ConfigError as err:
        raise ConfigError(f"{field}: {err}") from None


def format_fields(template: str, where: str) -> list[str]:
    """The field names of ``str.format`` template ``template``, in order; ConfigError naming ``where``
    (the setting) when it does not parse (an unmatched brace)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{where}: {template!r} is not a valid format string ({err})") from None


def check_fills(template: str, where: str, values: Mapping[str, str]) -> None:
    """Fill ``template`` once with ``values``: parsing accepts any conversion ("!z") and format spec,
    which would fail only when the template is filled, mid-run; ConfigError naming ``where`` then."""
    try:
        template.format(**values)
    except ValueError as err:
        raise ConfigError(f"{where}: {template!r} cannot be filled ({err})") from None


@contextmanager
def noting(note: str, *kinds: type[Exception]) -> Iterator[None]:
    """Re-raise an error of ``kinds`` from inside as its own type with `` (note)`` after its message, so
    it says under what it happened (e.g. which override list a checkpoint was loaded with); with an
    empty ``note`` the error passes as it is."""
    try:
        yield
    except kinds as err:
        if not note:
            raise
        raise type(err)(f"{err} ({note})") from None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], *, source: str | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override set.

    ``source`` names where ``data`` came from (a file), for the error when an override goes into a
    key that holds a plain value: the error says who set that value, ``data`` or an earlier
    override, as the override that fails may not be the one at fault (a CLI flag applied after the
    user's own overrides, say).
    """
    parsed = _parse_overrides(overrides)  # all malformed ones in one error, before any is applied
    result = json.loads(json.dumps(data, default=list)) if data else {}
    set_by: dict[tuple[str, ...], str] = {}  # key path -> the override that last set it
    for text, path, value in parsed:
        node = result
        for depth, part in enumerate(path[:-1], start=1):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {_not_a_section(path[:depth], child, set_by, source)}")
            node = child
        node[path[-1]] = value
        key = tuple(path)
        set_by = {k: v for k, v in set_by.items() if k[: len(key)] != key}
        set_by[key] = text
    return result


def _not_a_section(path: list[str], value: Any, set_by: Mapping[tuple[str, ...], str], source: str | None) -> str:
    """Why ``path`` cannot hold keys: it holds ``value``, set by an earlier override or the config."""
    dotted = ".".join(path)
    setters = [set_by[tuple(path[:n])] for n in range(len(path), 0, -1) if tuple(path[:n]) in set_by]
    if setters:
        return f"{dotted} was set to {value!r} by the earlier override {setters[0]!r}, so it is not a section"
    return f"{dotted} is {value!r} in {source or 'the config'}, not a section"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parse error on one line, where it was found (1-based) first: PyYAML's own text spans
    several lines, quoting the source with a caret."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        where += f", {context} from line {context_mark.line + 1}, column {context_mark.column + 1}"
    return where


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file, then apply ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides, source=None if path is None else str(path))
    return from_dict(cls, data, source=_source(path, overrides))


def _source(path: str | Path | None, overrides: Sequence[str]) -> str:
    """What a config came from, for its errors: the file, the overrides, or both."""
    if path is None:
        return "overrides" if overrides else "config"
    return f"{path} + overrides" if overrides else str(path)


def replace(config: T, overrides: Sequence[str]) -> T:
    """A copy of a config with ``key=value`` overrides applied (validated like a file)."""
    data = apply_overrides(to_dict(config), overrides)
    return from_dict(type(config), data, source="overrides")


def save_yaml(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))
