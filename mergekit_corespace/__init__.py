"""Core Space merging of LoRA adapters for mergekit (arXiv 2509.17786).

Installing the package registers ``merge_method: core_space`` with mergekit through
``mergekit_corespace.pth`` — lazily, so importing this package (or starting Python)
imports neither torch nor mergekit.
"""

__version__ = "0.1.0"
