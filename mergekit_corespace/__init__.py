"""Core Space merging of LoRA adapters for mergekit (arXiv 2509.17786).

Installing the package registers ``merge_method: core_space`` (and ``knots``,
``full_space``) with mergekit through ``mergekit_corespace.pth`` — lazily, so importing
this package (or starting Python) imports neither torch nor mergekit.
"""

__version__ = "0.1.0"
__all__ = ["merge_adapters", "tune"]


def __getattr__(name: str):
    if name == "merge_adapters":  # imported on first use: it pulls in torch and mergekit
        from mergekit_corespace.api import merge_adapters

        return merge_adapters
    if name == "tune":
        from mergekit_corespace.tune import tune

        return tune
    raise AttributeError(f"module 'mergekit_corespace' has no attribute {name!r}")
