"""An independent reference for the merge math, written from the papers in numpy (float64).

It imports nothing from ``mergekit_corespace``: tests compare the package's merges — through
``mergekit-yaml`` or its functions — with this code, so that a bug made in the package is
not also made in its oracle. Only the conventions the package documents are shared (README,
"Merge parameters"): per-adapter weights wₜ scale each task, λ scales the merged delta,
null directions are cut relative to the largest singular value, and DARE's masks are
torch's uniform draws from a generator seeded by the weight's name (the one thing numpy
cannot reproduce, so torch draws them here).

Factors are ``(B, A)`` with PEFT's scale folded into ``B`` (``ΔWₜ = Bₜ Aₜ``).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# ---------------------------------------------------------------------------------------
# Linear algebra


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD without its null directions: ``σ > max(shape)·eps·σ₁`` (numpy's rank rule)."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0], s[:0], vt[:0]
    kept = int((s > max(matrix.shape) * np.finfo(np.float64).eps * s[0]).sum())
    return u[:, :kept], s[:kept], vt[:kept]


def orthogonalised(matrix: np.ndarray) -> np.ndarray:
    """Polar factor ``U Vᵀ``: the nearest matrix with orthonormal columns (or rows)."""
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    return u @ vt


def best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


# ---------------------------------------------------------------------------------------
# Spaces: the task matrices of one module, and the way back to a weight delta


def core_space(factors):
    """Core Space (arXiv 2509.17786 §3): bases from the stacked factors, R×R cores."""
    u_b = svd(np.hstack([b for b, _ in factors]))[0]
    v_a = svd(np.vstack([a for _, a in factors]))[2]
    tasks = [u_b.T @ b @ a @ v_a.T for b, a in factors]
    return tasks, lambda merged: u_b @ merged @ v_a


def knots_space(factors, scale_tasks: bool = True):
    """KnOTS (arXiv 2410.19735 §3): one SVD of [ΔW₁ … ΔW_T]; task t is its block Vₜ of
    the right singular vectors, times S when ``scale_tasks``."""
    n = factors[0][1].shape[1]
    u, s, vt = svd(np.hstack([b @ a for b, a in factors]))
    blocks = [vt[:, t * n : (t + 1) * n] for t in range(len(factors))]
    if scale_tasks:
        return [s[:, None] * v for v in blocks], lambda merged: u @ merged
    return blocks, lambda merged: u @ (s[:, None] * merged)


def full_space(factors):
    return [b @ a for b, a in factors], lambda merged: merged


SPACES = {"core": core_space, "knots": knots_space, "full": full_space}


# ---------------------------------------------------------------------------------------
# Inner methods: T same-shaped tasks and their weights in, one matrix out


def task_arithmetic(tasks, weights):
    return sum(w * x for x, w in zip(tasks, weights))


def mean(tasks, weights):
    return task_arithmetic(tasks, weights) / sum(weights)


def top_magnitudes(task: np.ndarray, density: float) -> np.ndarray:
    """The ``max(1, ⌊density·size⌋)`` largest magnitudes of ``task``, the rest zeroed."""
    keep = max(1, int(density * task.size))
    threshold = np.sort(np.abs(task), axis=None)[::-1][keep - 1]
    return np.where(np.abs(task) >= threshold, task, 0.0)


def sign_elected_mean(scaled, weights):
    """TIES' last two steps: the sign of the summed mass per entry, then the weighted mean
    of the tasks that agree with it (``Σ wₜXₜ / Σ wₜ`` over agreeing tasks; 0 if none)."""
    elected = np.sign(sum(scaled))
    numerator = np.zeros_like(scaled[0])
    denominator = np.zeros_like(scaled[0])
    for y, w in zip(scaled, weights):
        agrees = (np.sign(y) == elected) & (y != 0)
        numerator += np.where(agrees, y, 0.0)
        denominator += np.where(agrees, w, 0.0)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 0.0)


def ties(tasks, weights, density, thresholds=None):
    """TIES (arXiv 2306.01708): trim, elect signs by mass, disjoint mean. ``thresholds``:
    one magnitude per task instead of the per-matrix top-k (a trim over all modules)."""
    if thresholds is None:
        trimmed = [top_magnitudes(x, density) for x in tasks]
    else:
        trimmed = [np.where(np.abs(x) >= t, x, 0.0) for x, t in zip(tasks, thresholds)]
    return sign_elected_mean([w * x for x, w in zip(trimmed, weights)], weights)


def dare_seed(random_seed: int | None, weight_name: str) -> int:
    """The documented seed of a weight's masks: sha256 of ``"{seed}:{name}"``, 63 bits."""
    digest = hashlib.sha256(f"{random_seed or 0}:{weight_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_masks(shape, count: int, density: float, seed: int) -> list[np.ndarray]:
    """One keep-mask per task, drawn one after another from one generator per weight."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = [torch.rand(shape, generator=generator, dtype=torch.float64) for _ in range(count)]
    return [draw.numpy() < density for draw in draws]


def dare(tasks, weights, density, seed):
    """DARE (arXiv 2311.03099): drop with probability 1 − density, rescale, add up."""
    if density >= 1:
        return task_arithmetic(tasks, weights)
    masks = dare_masks(tasks[0].shape, len(tasks), density, seed)
    return task_arithmetic([x * m / density for x, m in zip(tasks, masks)], weights)


def dare_ties(tasks, weights, density, seed):
    if density < 1:
        masks = dare_masks(tasks[0].shape, len(tasks), density, seed)
        tasks = [x * m / density for x, m in zip(tasks, masks)]
    return sign_elected_mean([w * x for x, w in zip(tasks, weights)], weights)


def tsv(tasks, weights, budget):
    """TSV-M (arXiv 2412.00081): each task's top ⌊budget·min(shape)/T⌋ singular triplets,
    the concatenated singular vectors made orthonormal, the singular values kept."""
    k = math.floor(budget * min(tasks[0].shape) / len(tasks))
    parts = [svd(w * x) for x, w in zip(tasks, weights)]
    u = np.hstack([p[0][:, :k] for p in parts])
    s = np.concatenate([p[1][:k] for p in parts])
    vt = np.vstack([p[2][:k] for p in parts])
    return orthogonalised(u) @ np.diag(s) @ orthogonalised(vt)


def cart(tasks, weights, rank_ratio, alpha):
    """CART (arXiv 2412.12153): the mean plus α times each centred task's best rank-k."""
    centre = mean(tasks, weights)
    k = math.ceil(rank_ratio * min(centre.shape))
    return centre + alpha * sum(w * best_rank(x - centre, k) for x, w in zip(tasks, weights))


def iso_c(tasks, weights):
    """Iso-C (arXiv 2502.04959): the sum's singular vectors, all at their mean value."""
    u, s, vt = svd(task_arithmetic(tasks, weights))
    return s.mean() * (u @ vt) if s.size else np.zeros_like(tasks[0])


def iso_cts(tasks, weights, common_fraction):
    """Iso-CTS (arXiv 2502.04959): the sum's top directions plus, per task, the top
    directions of what they leave unexplained; orthonormalised, one flat spectrum."""
    scaled = [w * x for x, w in zip(tasks, weights)]
    u, s, vt = svd(sum(scaled))
    rank, count = s.size, len(tasks)
    per_task = round((rank - int(rank * common_fraction)) / count)
    common = rank - per_task * count
    lefts, values, rights = [u[:, :common]], [s[:common]], [vt[:common]]
    if per_task:
        outside = np.eye(u.shape[0]) - u[:, :common] @ u[:, :common].T
        for y in scaled:
            ut, st, vtt = svd(outside @ y)
            lefts.append(ut[:, :per_task])
            values.append(st[:per_task])
            rights.append(vtt[:per_task])
    flat = np.concatenate(values).mean()
    return flat * orthogonalised(np.hstack(lefts)) @ orthogonalised(np.vstack(rights))


def merged_delta(
    factors,
    weights,
    parameters: dict,
    space: str,
    *,
    random_seed: int | None = None,
    weight_name: str = "",
    thresholds=None,
) -> np.ndarray:
    """One module's merged ΔW: ``λ · back(inner(tasks))`` with the documented defaults."""
    p = {
        "lambda": 1.0,
        "density": {"ties": 0.7}.get(parameters["merge"], 0.1),
        "tsv_budget": 1.0,
        "cart_rank_ratio": 0.04,
        "cart_alpha": 0.1,
        "iso_common_fraction": 0.8,
        "knots_scale_tasks": True,
        **parameters,
    }
    factors = [(np.asarray(b, np.float64), np.asarray(a, np.float64)) for b, a in factors]
    if space == "knots":
        tasks, back = knots_space(factors, p["knots_scale_tasks"])
    else:
        tasks, back = SPACES[space](factors)
    seed = dare_seed(random_seed, weight_name)
    inner = {
        "ta": lambda: task_arithmetic(tasks, weights),
        "mean": lambda: mean(tasks, weights),
        "ties": lambda: ties(tasks, weights, p["density"], thresholds),
        "dare": lambda: dare(tasks, weights, p["density"], seed),
        "dare_ties": lambda: dare_ties(tasks, weights, p["density"], seed),
        "tsv": lambda: tsv(tasks, weights, p["tsv_budget"]),
        "cart": lambda: cart(tasks, weights, p["cart_rank_ratio"], p["cart_alpha"]),
        "iso_c": lambda: iso_c(tasks, weights),
        "iso_cts": lambda: iso_cts(tasks, weights, p["iso_common_fraction"]),
    }[p["merge"]]
    return p["lambda"] * back(inner())


def module_tasks(factors, space: str, scale_tasks: bool = True) -> list[np.ndarray]:
    """The task matrices of one module in ``space`` (for a global trim's magnitudes)."""
    factors = [(np.asarray(b, np.float64), np.asarray(a, np.float64)) for b, a in factors]
    if space == "knots":
        return knots_space(factors, scale_tasks)[0]
    return SPACES[space](factors)[0]
