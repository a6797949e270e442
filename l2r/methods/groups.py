"""The `task_b` config groups of the registered methods: `task_b.<method>` and its defaults.

`registry.register(name, group=...)` declares them; configs add them (`add_config_groups`) and
`l2r.histories.history_key` keeps each method's key to its own group. The table lives apart from
the registry because a cache key holds the source of every l2r module its code imports
(`l2r.keys`): through this module, which imports nothing, a Task-B key reads no method's code
but its own.
"""

from collections.abc import Mapping

import ml_collections

_DEFAULTS: dict[str, dict] = {}  # group (= method name) -> default fields, in registration order


def declare(name: str, defaults: Mapping | None) -> None:
    """Makes `defaults` (None: no group) the group `task_b.<name>` of the method `name`."""
    _DEFAULTS.pop(name, None)
    if defaults is not None:
        if isinstance(defaults, ml_collections.ConfigDict):
            defaults = defaults.to_dict()
        _DEFAULTS[name] = dict(defaults)


def names() -> tuple[str, ...]:
    """The `task_b` subgroups of every registered method, in registration order."""
    return tuple(_DEFAULTS)


def add_config_groups(task_b: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds to the `task_b` ConfigDict (in place; returned) the group of every registered method
    that it lacks, with the registered defaults; groups it has keep their values.

    Every shipped experiment config calls this when it is built, so a method registered before
    `get_config` (by importing the file that registers it) is configured like a built-in. A
    config built earlier, or loaded locked, gets the groups with
    `registry.add_config_groups(config.task_b)`.

    Raises:
      ValueError: a registered group's name is a `task_b` field that is not a group.
    """
    with task_b.unlocked():
        for name, defaults in _DEFAULTS.items():
            if name not in task_b:
                task_b[name] = ml_collections.ConfigDict(defaults)
            elif not isinstance(task_b[name], ml_collections.ConfigDict):
                raise ValueError(f"task_b.{name} is a field, not the config group of method "
                                 f"{name!r}; rename the method.")  # fmt: skip
    return task_b
