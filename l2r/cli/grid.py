"""The grid of a sweep: `--sweep=<field>=<v1>,<v2>,...` flags parsed against a config (each
value to its field's type, tuples in parentheses) and their cartesian product (`settings`).
Every field and value is checked here, before anything runs."""

import difflib
import itertools

import ml_collections

EXAMPLE = "--sweep=task_b.learning_rate=0.05,0.1"


class SweepError(ValueError):
    """A --sweep flag or a swept setting is invalid; the message says how to fix it."""


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside parentheses / brackets: "(1,2),(3,4)" -> ["(1,2)", "(3,4)"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


_SCALARS = (bool, int, float, str)
_EXAMPLES = {bool: "true,false", int: "1,2", float: "0.1,1", str: "a,b", tuple: "(a,b),(c,)"}


def _scalar(text: str, kind: type):
    """`text` as a `kind` scalar; ValueError when it is not one."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    return kind(text)  # int("1.5") and float("x") raise ValueError.


def parse_value(key: str, text: str, current):
    """`text` parsed to the type of the field's `current` value.

    Scalars (bool, int, float, str) parse as themselves; tuple fields take "(a,b)" and their
    items parse to the type of the current first item.

    Raises:
      SweepError: naming the field, its type and a valid example.
    """
    kind = type(current)
    if not isinstance(current, (tuple, list)) and kind not in _SCALARS:
        raise SweepError(
            f"--sweep: field {key} holds a {kind.__name__} ({current!r}), which a sweep cannot "
            "set; sweep bool, int, float, str or tuple fields."
        )
    try:
        if kind in _SCALARS:
            return _scalar(text, kind)
        inner = text.strip()
        if inner[:1] in "([" and inner[-1:] in ")]":
            inner = inner[1:-1]
        item_kind = type(current[0]) if current and type(current[0]) in _SCALARS else str
        return kind(_scalar(item, item_kind) for item in _split_top_level(inner) if item)
    except ValueError:
        example = _EXAMPLES.get(kind, _EXAMPLES[tuple])
        raise SweepError(
            f"--sweep: {text!r} is not a valid value for {key} (type {kind.__name__}, now "
            f"{current!r}); give {kind.__name__} values, e.g. --sweep={key}={example}."
        ) from None


def _field(config: ml_collections.ConfigDict, key: str):
    """The current value of dotted field `key`, or a SweepError naming what is wrong."""
    node, path = config, []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            raise SweepError(
                f"--sweep: {'.'.join(path)} is a value, not a group, so {key} does not exist."
            )
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            where = f"group {'.'.join(path)}" if path else "the config"
            hint = f" Did you mean {'.'.join([*path, close[0]])}?" if close else ""
            raise SweepError(
                f"--sweep: no field {key!r}: {where} has no {part!r}; its fields are "
                f"{', '.join(sorted(node.keys()))}.{hint}"
            )
        node = node[part]
        path.append(part)
    if isinstance(node, ml_collections.ConfigDict):
        raise SweepError(
            f"--sweep: {key} is a group of fields, not a field; sweep one of "
            f"{', '.join(f'{key}.{k}' for k in sorted(node.keys()))}."
        )
    return node


def parse_sweeps(config: ml_collections.ConfigDict, specs) -> list[tuple[str, list]]:
    """Parses `--sweep` flags against `config`.

    Args:
      config: the base experiment config.
      specs: strings "<field>=<v1>,<v2>,...".

    Returns:
      [(field, [values parsed to the field's type])], in flag order.

    Raises:
      SweepError: a malformed flag, an unknown field or group, a value of the wrong type, or a
        field swept twice.
    """
    if not specs:
        raise SweepError(f"Nothing to sweep: give at least one --sweep, e.g. {EXAMPLE}.")
    sweeps, seen = [], set()
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SweepError(
                f"--sweep={spec!r} is not <field>=<v1>,<v2>,...; write e.g. {EXAMPLE}."
            )
        if key in seen:
            raise SweepError(f"--sweep: {key} is swept twice; give all its values in one flag.")
        seen.add(key)
        current = _field(config, key)
        texts = _split_top_level(values)
        if any(not t for t in texts):
            raise SweepError(f"--sweep={spec!r} has an empty value; write e.g. {EXAMPLE}.")
        sweeps.append((key, [parse_value(key, t, current) for t in texts]))
    return sweeps


def settings(sweeps: list[tuple[str, list]]) -> list[dict]:
    """The cartesian product of the swept values, the last field varying fastest."""
    keys = [k for k, _ in sweeps]
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in sweeps))
    ]
