"""Cache keys: each cached stage is keyed by exactly what it reads.

A stage (pre-training, meta-training, one method's Task-B runs) is reused only when its key
matches: the config fields it reads, the content digests of the data and upstream stages it
starts from, and the source of the l2r modules it executes (`source_digest`). The source part
follows imports from the stage's own modules through l2r, so an edit to a module a stage runs
changes its key, while a new file that nothing imports (a user's method, another pipeline)
changes none. A package's `__init__.py` counts only when a module imports a name from the
package itself rather than from one of its submodules.
"""

import ast
import functools
import hashlib
import importlib.util
import inspect
import json
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parent  # .../l2r
_PACKAGE = _ROOT.name


def _module_path(name: str) -> pathlib.Path | None:
    """The source file of the l2r module `name` (a package: its `__init__.py`), or None."""
    if name != _PACKAGE and not name.startswith(_PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    candidates = [_ROOT / "__init__.py"]
    if parts:
        candidates = [_ROOT.joinpath(*parts[:-1], parts[-1] + ".py"),
                      _ROOT.joinpath(*parts, "__init__.py")]  # fmt: skip
    for path in candidates:
        if path.is_file():
            return path
    return None


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The l2r modules that module `name` (at `path`) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:  # `from pkg import submodule` names the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if _module_path(sub) is not None else base)
    return {m for m in found if _module_path(m) is not None}


@functools.cache
def _closure(name: str) -> frozenset[str]:
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        path = _module_path(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        todo.extend(_imports(module, path))
    return frozenset(seen)


def modules_read(*names: str) -> list[str]:
    """The l2r modules `names` execute: themselves and every l2r module they import, sorted."""
    for name in names:
        if _module_path(name) is None:
            raise ValueError(f"{name!r} is not a module of {_PACKAGE}.")
    return sorted(set().union(*(_closure(n) for n in names)))


def source_digest(*names: str) -> str:
    """SHA-256 of the sources of `modules_read(*names)`."""
    h = hashlib.sha256()
    for module in modules_read(*names):
        h.update(module.encode() + b"\0" + _module_path(module).read_bytes() + b"\0")
    return h.hexdigest()


def user_sources(functions) -> dict[str, str]:
    """{module: SHA-256 of its source} of each module outside l2r that defines one of
    `functions` (a user's method or model file), for the keys of the stages that run them: an
    edit there makes a new key (l2r's own sources are in `source_digest`). A module without a
    file (a notebook's) counts by the source of those functions."""
    parts: dict[str, list[bytes]] = {}
    for f in functions:
        if f.__module__.partition(".")[0] == "l2r":
            continue
        path = getattr(sys.modules.get(f.__module__), "__file__", None)
        try:
            source = pathlib.Path(path).read_bytes() if path else inspect.getsource(f).encode()
        except (OSError, TypeError):  # No source to be had: the function's name stands in.
            source = f.__qualname__.encode()
        parts.setdefault(f.__module__, []).append(source)
    return {m: hashlib.sha256(b"\0".join(p)).hexdigest() for m, p in sorted(parts.items())}


def stage_key(**parts) -> str:
    """A 12-hex-digit key of JSON-able `parts` (config dicts, digests, numbers)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
