"""Each loaded model.py imports its own modules (the python and convoy_python backends).

Triton gives every python model its own stub process with the model's version
directory on sys.path, so `import helper` in model.py finds the helper.py beside
it and no other. Convoy runs every model in one process, whose sys.modules is
shared: a `helper` cached there under its bare name by one model is what the
next model, or the next version of the same model, would run.

So each loaded model.py gets a ModelNamespace:

- the modules of its directory load under a private package, `_convoy_model_<n>`
  (model.py itself as `_convoy_model_<n>.model`), never under their bare names;
  dataclasses, pickle and typing still find them in sys.modules by their own name;
- the code loaded from the directory runs with its own `__builtins__`, whose
  `__import__` maps the directory's top-level names into that package. The import
  statement takes `__import__` from the builtins of the code that executes it, so
  `import helper` resolves per model at load and at request time (inside
  execute()), on any thread, with no process-wide state switched per call. A
  meta path finder alone cannot tell which model is importing, and swapping
  sys.path or sys.modules entries races between threads;
- while the model loads (its module body, then its constructor or initialize),
  and only on the loading thread, a bare-name import by other code (pickle,
  joblib or torch.load naming `helper.Class`) finds the version's module, as
  Triton's sys.path would let it. Those aliases leave sys.modules when the load
  ends; loads hold one lock meanwhile, so python models load one at a time;
- close() takes the package and everything under it out of sys.modules.

Not covered: `importlib.import_module("helper")` in model code, bare-name imports by
other code at request time (pickle.loads of a helper's class inside execute()),
and a bare name that the process had already imported before the load, which
other code keeps resolving to that module.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import os
import sys
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

PREFIX = "_convoy_model_"

_registry_lock = threading.Lock()  # _namespaces, the finder on sys.meta_path, purges
_load_lock = threading.Lock()  # one load at a time: its bare-name aliases are process-wide
_numbers = itertools.count()
_namespaces: dict[str, ModelNamespace] = {}
_loading: tuple[ModelNamespace, int] | None = None  # and the loading thread's id


class ModelNamespace:
    """The modules of one loaded model.py: its directory's, under a private package."""

    def __init__(self, directory: Path, process_wide: Collection[str] = ()) -> None:
        """`process_wide`: names that always resolve as the process resolves them,
        even where the directory holds a file of that name."""
        self.directory = str(directory)
        self.package = f"{PREFIX}{next(_numbers)}"
        self.builtins: dict[str, Any] = {**builtins.__dict__, "__import__": self._import}
        self._process_wide = frozenset(process_wide)
        self._owned: dict[str, bool] = {}
        self._aliases: list[tuple[str, ModuleType]] = []
        spec = importlib.machinery.ModuleSpec(self.package, None, is_package=True)
        spec.submodule_search_locations = [self.directory]
        package = importlib.util.module_from_spec(spec)
        with _registry_lock:
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            _namespaces[self.package] = self
            sys.modules[self.package] = package

    @contextmanager
    def loading(self) -> Iterator[None]:
        """The window in which the model loads: bare names of its directory's modules
        resolve to this namespace on this thread (see the module's docstring)."""
        global _loading
        with _load_lock:
            _loading = (self, threading.get_ident())
            try:
                yield
            finally:
                _loading = None
                for name, module in self._aliases:
                    if sys.modules.get(name) is module:
                        sys.modules.pop(name, None)
                self._aliases.clear()

    def load_model(self, model_path: Path) -> ModuleType:
        """Execute the model file as `<package>.<its stem>`; raises what its body raises."""
        stem = model_path.name.partition(".")[0]
        name = f"{self.package}.{stem if stem.isidentifier() else 'model'}"
        loader = _SourceLoader(name, str(model_path), self.builtins)
        spec = importlib.util.spec_from_file_location(name, model_path, loader=loader)
        if spec is None:
            raise ImportError(f"cannot import {model_path}", path=str(model_path))
        module = importlib.util.module_from_spec(spec)
        # Registered under its own name, as an import would: @dataclass (with postponed
        # annotations), pickle and typing look the class's module up in sys.modules.
        sys.modules[name] = module
        try:
            loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module

    def owns(self, name: str) -> bool:
        """Whether the top-level module `name` is this directory's."""
        owned = self._owned.get(name)
        if owned is None:
            owned = self._owned[name] = self._find_owned(name)
        return owned

    def close(self) -> None:
        """Forget this namespace's modules: a later load imports them afresh. Objects
        the model still holds keep theirs; a new import of them fails."""
        prefix = self.package + "."
        with _registry_lock:
            _namespaces.pop(self.package, None)
            for name in [n for n in list(sys.modules) if n.startswith(prefix)]:
                sys.modules.pop(name, None)
            sys.modules.pop(self.package, None)
            # The finders the import system cached for the directory (and its packages'
            # directories) go too: they keep listings of the files they saw.
            for key in list(sys.path_importer_cache):
                if key == self.directory or key.startswith(self.directory + os.sep):
                    sys.path_importer_cache.pop(key, None)

    def _find_owned(self, name: str) -> bool:
        if name in self._process_wide or not name.isidentifier():
            return False
        # As with the directory first on sys.path: built-in and frozen modules (sys, os)
        # are found before any path entry.
        if name in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(name):
            return False
        spec = importlib.machinery.PathFinder.find_spec(name, [self.directory])
        if spec is None:
            return False
        if spec.loader is not None:
            return True  # a module or a package beside model.py comes first, as it did
        # A directory without __init__.py (maybe just data) only counts where nothing
        # else is importable by that name, as a namespace package portion on sys.path.
        return (
            name not in sys.stdlib_module_names
            and importlib.machinery.PathFinder.find_spec(name) is None
        )

    def _import(
        self,
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> ModuleType:
        """`__import__` for the code of this namespace."""
        head = name.partition(".")[0]
        if level == 0 and self.owns(head):
            owned = f"{self.package}.{name}"
            module = builtins.__import__(owned, globals, locals, fromlist or (), 0)
            self._alias_while_loading(name)
            # `import helper.sub` binds the top-level module: here the package's child.
            return module if fromlist else getattr(module, head)
        return builtins.__import__(name, globals, locals, fromlist or (), level)

    def _alias_while_loading(self, name: str) -> None:
        """`name` and its parents under their bare names too, while this namespace loads
        on this thread: C code (the pickle module's) imports through the caller's
        `__import__`, then looks the bare name up in sys.modules."""
        loading = _loading
        if loading is None or loading[0] is not self or loading[1] != threading.get_ident():
            return
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            bare = ".".join(parts[:end])
            module = sys.modules.get(f"{self.package}.{bare}")
            if module is not None and bare not in sys.modules:
                sys.modules[bare] = module
                self._aliases.append((bare, module))

    def _private_spec(
        self, fullname: str, path: Sequence[str] | None
    ) -> importlib.machinery.ModuleSpec | None:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _SourceLoader(fullname, str(spec.origin), self.builtins)
        return spec


class _SourceLoader(importlib.machinery.SourceFileLoader):
    """Runs a module of a namespace with the namespace's builtins."""

    def __init__(self, fullname: str, path: str, builtins: dict[str, Any]) -> None:
        super().__init__(fullname, path)
        self._builtins = builtins

    def exec_module(self, module: ModuleType) -> None:
        module.__dict__["__builtins__"] = self._builtins
        super().exec_module(module)

    def get_code(self, fullname: str) -> CodeType:
        # Compiled from the source at each load: no __pycache__ written into the model
        # repository, and no stale bytecode where a changed file kept its size and mtime
        # second (a redeploy within the second, or a copy that preserves times).
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


class _Alias(importlib.abc.Loader):
    """A bare name, imported by other code while a model loads: the namespace's module."""

    def __init__(self, namespace: ModelNamespace, target: str) -> None:
        self._namespace = namespace
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        # The import system hands back what sys.modules holds under the name once
        # exec_module returns: the namespace's module, not this placeholder.
        found = importlib.import_module(self._target)
        sys.modules[module.__name__] = found
        self._namespace._aliases.append((module.__name__, found))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the modules of the namespaces, and the loading model's bare names."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        head = fullname.partition(".")[0]
        if head.startswith(PREFIX):
            namespace = _namespaces.get(head)
            return None if namespace is None else namespace._private_spec(fullname, path)
        loading = _loading
        if loading is None or loading[1] != threading.get_ident():
            return None
        namespace = loading[0]
        if not namespace.owns(head):
            return None
        return importlib.util.spec_from_loader(
            fullname, _Alias(namespace, f"{namespace.package}.{fullname}")
        )


_FINDER = _Finder()
