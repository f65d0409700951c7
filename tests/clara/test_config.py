"""The config system: YAML + overrides into frozen dataclasses, with errors that name the key."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from clara import config as config_lib
from clara.config import ConfigError


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    limit: int | None = None


def test_yaml_and_overrides_build_frozen_dataclasses(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ninner:\n  steps: 5\ntags: [a, b]\n")
    cfg = config_lib.load(Outer, path, ["inner.lr=2e-3", "inner.kind=b", "limit=7"])
    assert cfg == Outer(name="x", inner=Inner(lr=0.002, steps=5, kind="b"), tags=("a", "b"), limit=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"
    assert config_lib.from_dict(Outer, config_lib.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["inner.stpes=3"], r"inner: unknown key\(s\) stpes for Inner"),
        (["inner.steps=three"], r"inner.steps: expected an integer, got 'three'"),
        (["inner.lr=fast"], r"inner.lr: expected a number, got 'fast'"),
        (["inner.kind=c"], r"inner.kind: 'c' is not one of \['a', 'b'\]"),
        (["inner"], r"expected key=value"),
        (["name.x=1"], r"name: expected a string, got \{'x': 1\}"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(Outer, None, overrides)


def test_errors_keep_the_source_apart_from_the_key(tmp_path):
    path = tmp_path / "run.v2.yaml"
    path.write_text("inner:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, path)
    assert str(err.value) == f"{path}: inner.lr: expected a number, got 'fast'"
    path.write_text("nmae: x\n")
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, path, ["limit=3"])
    assert str(err.value).startswith(f"{path} + overrides: unknown key(s) nmae for Outer; known keys: inner, limit")
    with pytest.raises(ConfigError) as err:
        config_lib.replace(Outer(), ["inner.steps=1.5"])
    assert str(err.value) == "overrides: inner.steps: expected an integer, got 1.5"


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        config_lib.load(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        config_lib.load(Outer, bad)


@pytest.mark.parametrize("text, where", [
    ("train:\n  lr: [1, 2\n  epochs: 3\n",
     "line 3, column 9: expected ',' or ']', but got ':', while parsing a flow sequence from line 2, column 7"),
    ("a: b: c\n", "line 1, column 5: mapping values are not allowed here"),
    ("a:\n\t- x\n", "line 2, column 1: found character '\\t' that cannot start any token"),
])
def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path, text, where):
    # PyYAML's own message quotes the source over several lines; the command line prints one.
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config_lib.load(Outer, path)
    assert str(caught.value) == f"{path}: not valid YAML ({where})"


def test_replace_and_save_round_trip(tmp_path):
    cfg = config_lib.replace(Outer(), ["inner.steps=3"])
    config_lib.save_yaml(cfg, tmp_path / "resolved.yaml")
    assert config_lib.load(Outer, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf", "inf"])
def test_numbers_must_be_finite(value):
    # nan passes every range check (nan > 0 and nan <= 0 are both false) and would reach torch.
    with pytest.raises(ConfigError, match=r"^overrides: inner.lr: expected a finite number, got (nan|-?inf)$"):
        config_lib.load(Outer, None, [f"inner.lr={value}"])


def test_an_optional_setting_gives_its_type_s_reason():
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, None, ["limit=many"])
    assert str(err.value) == "overrides: limit: expected an integer, got 'many'"


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, binary)
    assert str(err.value) == f"{binary}: not UTF-8 text"


def test_an_override_into_a_plain_value_names_who_set_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("inner: 5\n")
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, path, ["inner.steps=1"])
    assert str(err.value) == f"override 'inner.steps=1': inner is 5 in {path}, not a section"
    # The failing override is not the culprit (think of a CLI flag applied after the user's own).
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, None, ["inner=abc", "inner.steps=1"])
    assert str(err.value) == ("override 'inner.steps=1': inner was set to 'abc' by the earlier override "
                              "'inner=abc', so it is not a section")
    # The override that set the value last is named, also through a whole section.
    with pytest.raises(ConfigError, match=r"inner.steps was set to 4 by the earlier override 'inner=\{steps: 4\}'"):
        config_lib.load(Outer, None, ["inner.steps=3", "inner={steps: 4}", "inner.steps.x=1"])
    with pytest.raises(ConfigError, match=r"inner.steps was set to 5 by the earlier override 'inner.steps=5'"):
        config_lib.load(Outer, None, ["inner={steps: 4}", "inner.steps=5", "inner.steps.x=1"])
    with pytest.raises(ConfigError, match="^override 'name.first=x': name is 'run' in the config, not a section$"):
        config_lib.replace(Outer(), ["name.first=x"])


def test_noting_adds_the_note_to_the_kinds_named_and_keeps_their_type():
    from clara.config import noting

    class Other(ValueError):
        pass

    with pytest.raises(ConfigError, match=r"^bad key \(with overrides \['a=1'\]\)$"):
        with noting("with overrides ['a=1']", ConfigError):
            raise ConfigError("bad key")
    with pytest.raises(ConfigError, match=r"^bad key$"):
        with noting("", ConfigError):  # nothing to note
            raise ConfigError("bad key")
    with pytest.raises(Other, match=r"^untouched$"):
        with noting("a note", ConfigError):
            raise Other("untouched")


def test_yaml_1_1_readings_of_plain_text_stay_strings(tmp_path):
    """PyYAML reads YAML 1.1: ``no`` (Norwegian, a tokenizer language) was False, ``010`` was 8, ``1:30``
    was 90, and a date was a datetime.date that crashed the override merge with a TypeError."""
    path = tmp_path / "run.yaml"
    path.write_text("name: 2024-05-01\ntags: [no, on, '1:30', 1:30, 010]\n")
    assert config_lib.load(Outer, path).tags == ("no", "on", "1:30", "1:30", "010")
    assert config_lib.load(Outer, path, ["name=no"]).name == "no"
    assert config_lib.load(Outer, None, ["name=2024-05-01"]).name == "2024-05-01"
    # Where a boolean or an integer is expected, they are a clear error rather than another value.
    with pytest.raises(ConfigError, match=r"^overrides: inner.steps: expected an integer, got '010'$"):
        config_lib.load(Outer, None, ["inner.steps=010"])
    path.write_text("inner:\n  steps: 0x10\n  lr: 1_000\n")
    assert config_lib.load(Outer, path).inner == Inner(lr=1000.0, steps=16)


def test_saved_strings_that_look_like_other_types_load_back_as_strings(tmp_path):
    cfg = Outer(name="no", tags=("yes", "null", "1e3", "010", "1:30", "2024-05-01", "0o10", "=", "~"),
                inner=Inner(lr=1e-06))
    config_lib.save_yaml(cfg, tmp_path / "resolved.yaml")
    assert config_lib.load(Outer, tmp_path / "resolved.yaml") == cfg
    # Run folders' configs are also read with plain yaml.safe_load (clara.run_dir): the same data.
    assert config_lib.from_dict(Outer, yaml.safe_load((tmp_path / "resolved.yaml").read_text())) == cfg


def test_a_repeated_key_in_a_file_is_an_error(tmp_path):
    # PyYAML keeps the last one: the first inner section's settings were silently dropped.
    path = tmp_path / "run.yaml"
    path.write_text("inner:\n  lr: 0.5\nname: x\ninner:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, path)
    assert str(err.value) == (f"{path}: not valid YAML (line 4, column 1: found duplicate key 'inner', "
                              "while constructing a mapping from line 1, column 1)")
    # A merge key's entries may still be overridden beside it.
    path.write_text("inner:\n  <<: {lr: 0.5, steps: 3}\n  steps: 4\n")
    assert config_lib.load(Outer, path).inner == Inner(lr=0.5, steps=4)


def test_an_integer_past_the_float_range_is_not_finite(tmp_path):
    # float(10**400) raises OverflowError, which escaped as a traceback.
    with pytest.raises(ConfigError, match=r"^overrides: inner.lr: expected a finite number, got 1000+$"):
        config_lib.load(Outer, None, [f"inner.lr={10**400}"])


@pytest.mark.parametrize("text", [".name=x", "inner..steps=3", "inner.=3"])
def test_an_empty_part_of_an_override_key_is_named(text):
    # It read as an unknown key without a name: "unknown key(s)  for Inner".
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, None, [text])
    assert str(err.value) == f"override {text!r}: empty part in the key {text.split('=')[0]!r}"


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, tmp_path)
    assert str(err.value) == f"{tmp_path}: a folder, not a config file"


def test_a_json_escaped_character_past_u_ffff_is_one_character():
    # The CLIs pass paths as JSON overrides; JSON writes 😀 as the pair \ud83d\ude00, which YAML read as two
    # lone surrogates, and the file system then refused the path with a UnicodeEncodeError traceback.
    path = "/data/😀 é"
    assert config_lib.load(Outer, None, [f"name={json.dumps(path)}"]).name == path


@dataclass(frozen=True)
class Checked:
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"checked: size must be at least 1, got {self.size}")


@dataclass(frozen=True)
class Sections:
    first: Inner = field(default_factory=Inner)
    second: Inner = field(default_factory=Inner)
    checked: Checked = field(default_factory=Checked)
    count: int = 0


def test_problems_in_sibling_sections_are_all_in_one_error(tmp_path):
    # A bad section cannot be built, so neither can its parent: the loader stopped at the first, and
    # the user fixed it, reran, and met the next.  Listed in field order, not the file's order.
    path = tmp_path / "run.yaml"
    path.write_text("second:\n  steps: many\nfirst:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as err:
        config_lib.load(Sections, path)
    assert str(err.value) == (f"{path}: first: unknown key(s) stpes for Inner; known keys: kind, lr, steps; "
                              "second.steps: expected an integer, got 'many'")
    # A section's own checks (its __post_init__) count too, and so do the overrides' values.
    with pytest.raises(ConfigError) as err:
        config_lib.load(Sections, path, ["checked.size=0", "count=x", "first={kind: c}"])
    assert str(err.value) == (f"{path} + overrides: first.kind: 'c' is not one of ['a', 'b']; second.steps: "
                              "expected an integer, got 'many'; checked: size must be at least 1, got 0; "
                              "count: expected an integer, got 'x'")


def test_an_unknown_key_and_a_bad_value_at_one_level_are_both_named():
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, None, ["inner.lr=fast", "inner.speed=3", "inner.steps=1.5"])
    assert str(err.value) == ("overrides: inner: unknown key(s) speed for Inner; known keys: kind, lr, steps; "
                              "inner.lr: expected a number, got 'fast'; inner.steps: expected an integer, got 1.5")
    with pytest.raises(ConfigError) as err:  # at the top level, and from_dict without a source
        config_lib.from_dict(Outer, {"limit": "many", "nmae": "x", "tags": [1, "b", None]})
    assert str(err.value) == ("unknown key(s) nmae for Outer; known keys: inner, limit, name, tags; "
                              "tags[0]: expected a string, got 1; tags[2]: expected a string, got None; "
                              "limit: expected an integer, got 'many'")


class Special(ConfigError):
    pass


@dataclass(frozen=True)
class Picky:
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        raise Special("picky: never")


@dataclass(frozen=True)
class Holder:
    picky: Picky = field(default_factory=Picky)
    name: str = ""


def test_one_problem_keeps_its_own_error():
    # One problem is raised as it was, its type kept (a section's check may raise a ConfigError subclass).
    with pytest.raises(Special, match="^picky: never$"):
        config_lib.from_dict(Holder, {"picky": {}})
    with pytest.raises(ConfigError) as err:
        config_lib.from_dict(Holder, {"picky": {}, "name": 3})
    assert str(err.value) == "picky: never; name: expected a string, got 3"


def test_a_key_that_is_not_a_string_is_named():
    # sorted() of a number beside a string, and join() of a number, raised a TypeError.
    with pytest.raises(ConfigError) as err:
        config_lib.from_dict(Outer, {1: "x", "nmae": "y"}, source="spec.json")
    assert str(err.value) == "spec.json: unknown key(s) 1, nmae for Outer; known keys: inner, limit, name, tags"


def test_every_malformed_override_is_named_at_once():
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, None, ["inner", "name=x", "inner..steps=3"])
    assert str(err.value) == ("override 'inner': expected key=value, e.g. audio.layers=4; "
                              "override 'inner..steps=3': empty part in the key 'inner..steps'")
    with pytest.raises(ConfigError) as err:
        config_lib.check_overrides(["=1", "a=1", "b"], "model.clara_overrides")
    assert str(err.value) == ("model.clara_overrides: override '=1': empty key; "
                              "override 'b': expected key=value, e.g. audio.layers=4")
    with pytest.raises(ConfigError) as err:  # one: as it was
        config_lib.check_overrides(["b"], "model.clara_overrides")
    assert str(err.value) == "model.clara_overrides: override 'b': expected key=value, e.g. audio.layers=4"
