"""Lazy registration with mergekit, run from ``mergekit_corespace.pth`` at interpreter start.

mergekit has no plugin discovery: a merge method must be in its registry before
``MergePlanner`` looks the name up. Importing mergekit eagerly at start-up would
cost seconds in every Python process, so this module only installs a meta-path
finder (standard library only) that runs our glue right after the watched mergekit
modules finish executing (duck-typed finder and loader: importing importlib.abc alone
would triple the cost of this hook):

- ``mergekit.merge_methods`` -> register ``core_space`` in the registry;
- ``mergekit.merge``         -> route core-space runs through our planner
  (see :mod:`mergekit_corespace.glue.internals`).
"""

from __future__ import annotations

import importlib
import sys
import warnings

_GLUE_PACKAGE = "mergekit_corespace.glue"
_GLUE = "mergekit_corespace.glue.internals"
# module name -> name of the function in the glue module to call once it is imported
_WATCHED = {
    "mergekit.merge_methods": "register_methods",
    "mergekit.merge": "patch_merge_pipeline",
}


def _is_initializing(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    return module is not None and bool(getattr(spec, "_initializing", False))


def _run_glue(module_name: str) -> None:
    if any(_is_initializing(name) for name in list(sys.modules) if name.startswith(_GLUE_PACKAGE)):
        return  # the glue is importing mergekit itself; it attaches when it finishes
    try:
        glue = importlib.import_module(_GLUE)
        # Pass the module object: `import mergekit.merge` would fail until its import returns.
        getattr(glue, _WATCHED[module_name])(sys.modules[module_name])
    except Exception as error:  # never break stock mergekit because of the plugin
        warnings.warn(
            f"mergekit-corespace could not attach to {module_name}: {error}",
            RuntimeWarning,
            stacklevel=2,
        )


class _RunAfterExec:
    """Delegates to the real loader, then runs the glue for the module."""

    def __init__(self, loader, module_name: str):
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run_glue(self._module_name)

    def __getattr__(self, name):  # resource readers, get_source, ...
        return getattr(self._loader, name)


class _PostImportFinder:
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunAfterExec(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Install the finder once; run the glue at once for modules already imported."""
    if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for module_name in _WATCHED:
        if module_name in sys.modules and not _is_initializing(module_name):
            _run_glue(module_name)
