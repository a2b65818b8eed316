"""The mergekit side of the plugin, one job per file.

- ``registration``: the registry entries (``core_space``, ``knots``, ``full_space``).
- ``internals``: the only file that touches mergekit internals — each one named in
  ``INTERNALS``, version-checked, then patched.
- ``validation``: checks of a whole merge configuration, before anything is planned.
- ``run``: one validated run — its adapters, the base checkpoint's names and shapes —
  and how it plans each weight.
- ``tasks``: the graph tasks mergekit executes: one weight's merge, the global TIES pass.
- ``adapter_output``: the merge written as one PEFT adapter instead of a model.
- ``staging``: output written in full, or not at all.

Nothing here is imported at interpreter start; :mod:`mergekit_corespace._hook` imports
``internals`` when mergekit is imported.
"""
