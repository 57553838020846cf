"""Tests of bnconvert.rules: the shipped rules, the schema, and its errors."""

import pathlib
import textwrap

import keras
import pytest

import bnconvert
from bnconvert import rules
from bnconvert.errors import RuleError

GOOD_RULE = """
[[rule]]
name = "mine"
direction = "sync"
match = ["keras.layers.BatchNormalization"]
target = "bnconvert>SyncBatchNormalization"
"""


def write(tmp_path, text, name="user.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_rules_load_from_the_package():
    files = rules.shipped_rule_files()
    names = [pathlib.Path(f).name for f in files]
    assert {"sync.toml", "inference.toml"} <= set(names)
    ruleset = bnconvert.load_rules()
    by_name = {r.name: r for r in ruleset.rules}
    sync = by_name["bn-to-sync"]
    assert sync.direction == "sync"
    assert sync.match_classes == (keras.layers.BatchNormalization,)
    assert sync.target_class is bnconvert.SyncBatchNormalization
    assert "synchronized" in sync.config.drop
    unsync = by_name["sync-to-bn"]
    assert unsync.target_class is keras.layers.BatchNormalization
    assert dict(unsync.config.set) == {"synchronized": False}
    assert dict(by_name["keras-sync-bn-to-bn"].when) == {"synchronized": True}


def test_fold_rules_parse_into_frozen_dataclasses(tmp_path):
    path = write(tmp_path, """
        [[fold]]
        name = "fold-into-conv"
        into = ["keras.layers.Conv1D", "keras.layers.Conv2D", "Conv3D"]
        layout = "conv"
    """)
    ruleset = rules.load_rules([path])
    fold = {f.name: f for f in ruleset.fold_rules}["fold-into-conv"]
    assert fold.into == ("keras.layers.Conv1D", "keras.layers.Conv2D", "Conv3D")
    assert fold.layout == "conv" and fold.source == str(path)
    assert fold.classes == (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    with pytest.raises(AttributeError):
        fold.layout = "dense"


def test_rule_matches_exact_class_and_conditions():
    ruleset = rules.load_rules()
    plain = keras.layers.BatchNormalization()
    synced = keras.layers.BatchNormalization(synchronized=True)
    assert ruleset.match(plain, "sync").name == "bn-to-sync"
    assert ruleset.match(plain, "inference") is None
    assert ruleset.match(synced, "inference").name == "keras-sync-bn-to-bn"
    assert ruleset.match(bnconvert.SyncBatchNormalization(), "sync") is None

    class Sub(keras.layers.BatchNormalization):
        pass

    assert ruleset.match(Sub(), "sync") is None
    rule = ruleset.match(plain, "sync")
    assert "is not one of" in rule.why_not(Sub())


def test_config_mapping_order():
    mapping = rules.ConfigMapping(
        drop=("a",), rename={"b": "c"}, set={"d": 1}
    )
    assert mapping.apply({"a": 1, "b": 2, "x": 3}) == {"c": 2, "x": 3, "d": 1}


def test_later_files_override_by_name_and_take_precedence(tmp_path):
    first = write(tmp_path, GOOD_RULE, "first.toml")
    second = write(tmp_path, """
        [[rule]]
        name = "bn-to-sync"
        direction = "sync"
        description = "replaced"
        match = ["keras.layers.BatchNormalization"]
        target = "bnconvert>SyncBatchNormalization"
    """, "second.toml")
    ruleset = rules.load_rules([first, second])
    names = [r.name for r in ruleset.for_direction("sync")]
    assert names.count("bn-to-sync") == 1
    assert names[0] == "bn-to-sync" and names[1] == "mine"
    assert ruleset.rules[0].description == "replaced"
    assert ruleset.rules[0].source == str(second)
    assert ruleset.sources[-2:] == (str(first), str(second))


def test_enabled_false_removes_a_shipped_rule(tmp_path):
    path = write(tmp_path, """
        [[rule]]
        name = "bn-to-sync"
        enabled = false
    """)
    ruleset = rules.load_rules([path])
    assert "bn-to-sync" not in [r.name for r in ruleset.rules]
    assert ruleset.match(keras.layers.BatchNormalization(), "sync") is None


def test_class_names_resolve_without_imports():
    assert rules.resolve_class("bnconvert>SyncBatchNormalization") is bnconvert.SyncBatchNormalization
    assert rules.resolve_class("keras.layers.Dense") is keras.layers.Dense
    assert rules.resolve_class("Dense") is keras.layers.Dense

    class Mine(keras.layers.Layer):
        pass

    assert rules.resolve_class("Mine", {"Mine": Mine}) is Mine
    assert rules.resolve_class("Mine") is None
    assert rules.resolve_class("os.path") is None
    assert rules.resolve_class("keras.ops.add") is None  # not a layer class
    assert rules.resolve_class("keras.layers._private") is None


def test_custom_objects_resolve_rule_classes(tmp_path):
    class MyBN(keras.layers.BatchNormalization):
        pass

    path = write(tmp_path, GOOD_RULE.replace('"keras.layers.BatchNormalization"', '"MyBN"'))
    with pytest.raises(RuleError, match="unknown layer class"):
        rules.load_rules([path])
    ruleset = rules.load_rules([path], custom_objects={"MyBN": MyBN})
    assert ruleset.match(MyBN(), "sync").name == "mine"


def _error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        rules.load_rules([path])
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.mark.parametrize(
    "edit, rule, key",
    [
        (('direction = "sync"', 'direction = "sideways"'), "mine", "direction"),
        (('target = "bnconvert>SyncBatchNormalization"', 'target = "NoSuchLayer"'),
         "mine", "target"),
        (('match = ["keras.layers.BatchNormalization"]', 'match = "keras.layers.BatchNormalization"'),
         "mine", "match"),
        (('match = ["keras.layers.BatchNormalization"]', 'match = []'), "mine", "match"),
        (('name = "mine"', 'name = "mine"\ncolour = "blue"'), "mine", "colour"),
        (('target = "bnconvert>SyncBatchNormalization"', ''), "mine", "target"),
        (('name = "mine"', 'name = "mine"\nenabled = "yes"'), "mine", "enabled"),
        (('name = "mine"', 'name = "mine"\nwhen = 3'), "mine", "when"),
        (('name = "mine"', 'name = "mine"\nweights = { gamma = 1 }'), "mine", "weights"),
        (('name = "mine"', 'name = "mine"\nconfig = { keep = ["a"] }'), "mine", "keep"),
        (('name = "mine"', 'name = "mine"\nconfig = { drop = "a" }'), "mine", "drop"),
    ],
)
def test_rule_errors_name_file_rule_and_key(tmp_path, edit, rule, key):
    old, new = edit
    message = _error(tmp_path, GOOD_RULE.replace(old, new))
    assert f"rule '{rule}'" in message and f"key '{key}'" in message


def test_duplicate_name_in_one_file(tmp_path):
    message = _error(tmp_path, GOOD_RULE + GOOD_RULE)
    assert "rule 'mine'" in message and "used by two rules" in message


def test_fold_rule_errors(tmp_path):
    fold = '[[fold]]\nname = "f"\ninto = ["Dense"]\nlayout = "{}"\n'
    message = _error(tmp_path, fold.format("diagonal"))
    assert "rule 'f'" in message and "key 'layout'" in message
    message = _error(tmp_path, fold.format("dense").replace('["Dense"]', '["Nope"]'))
    assert "key 'into'" in message and "Nope" in message
    message = _error(tmp_path, fold.format("dense") * 2)
    assert "used by two fold rules" in message


def test_top_level_errors(tmp_path):
    assert "key 'rules'" in _error(tmp_path, "[[rules]]\nname = 'x'\n")
    assert "key 'version'" in _error(tmp_path, "version = 2\n")
    assert "key 'name'" in _error(tmp_path, "[[rule]]\ndirection = 'sync'\n")
    assert "not valid TOML" in _error(tmp_path, "[[rule]\nname = \n")


def test_unreadable_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(RuleError, match="Cannot read rule file .*missing.toml"):
        rules.load_rules([missing])
