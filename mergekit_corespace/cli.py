"""``mergekit-corespace``: ``mergekit-yaml`` with explicit registration.

Same arguments and options as ``mergekit-yaml``; the fallback for environments that
skip ``.pth`` files (where ``core_space`` would otherwise be unknown to mergekit).
"""

from __future__ import annotations


def main() -> None:
    from mergekit_corespace.method import install

    install()  # before run_yaml binds mergekit.merge.run_merge
    from mergekit.scripts.run_yaml import main as run_yaml

    run_yaml(prog_name="mergekit-corespace")
