"""The typed fields of a rule file, read with one-line errors.

Each reader takes a TOML table (a dict from `tomllib`) and a key, checks the
value's type and returns it; on a wrong or missing value it raises a
`RuleError` naming the file, the rule and the key, with the value received
(`Context.fail`). `bnconvert.rules` builds its rules from these.
"""

from types import MappingProxyType

from bnconvert.errors import RuleError


class Context:
    """Builds one-line errors that name the file, the rule and the key."""

    def __init__(self, path):
        self.path = path

    def fail(self, rule, key, what, value):
        where = f"rule '{rule}'" if rule else "top level"
        raise RuleError(
            f"Rule file {self.path}, {where}, key '{key}': {what}. "
            f"Received: {key}={value!r}"
        )


def table_list(ctx, data, key):
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        ctx.fail(None, key, f"must be an array of tables ([[{key}]])", entries)
    return entries


def rule_name(ctx, entry, kind):
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        ctx.fail(None, "name", f"every [[{kind}]] needs a non-empty string name", name)
    return name


def check_keys(ctx, table, allowed, required, rule):
    for key in table:
        if key not in allowed:
            ctx.fail(rule, key, f"unknown key; allowed keys are {sorted(allowed)}",
                     table[key])
    for key in required:
        if key not in table:
            ctx.fail(rule, key, "is required", None)


def optional(ctx, rule, table, key, kind, default):
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kind):
        ctx.fail(rule, key, f"must be of type {kind.__name__}", value)
    return value


def string(ctx, rule, table, key):
    value = table[key]
    if not isinstance(value, str) or not value:
        ctx.fail(rule, key, "must be a non-empty string", value)
    return value


def string_list(ctx, rule, table, key, allow_empty=False):
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        ctx.fail(rule, key, "must be an array of non-empty strings", value)
    if not value and not allow_empty:
        ctx.fail(rule, key, "must name at least one class", value)
    return tuple(value)


def string_table(ctx, rule, table, key):
    value = table.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(v, str) and v for v in value.values()
    ):
        ctx.fail(rule, key, "must be a table of string values", value)
    return MappingProxyType(dict(value))


def is_plain(value):
    """Whether `value` is plain data: a string, number, boolean or array of them."""
    if isinstance(value, list):
        return all(is_plain(v) for v in value)
    return isinstance(value, (str, int, float, bool))
