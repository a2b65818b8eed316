"""The base model loaded once, and each point put into it: its merged weights written into
the loaded base (what ``mergekit-yaml`` writes), or its merged adapter put on with PEFT
(what ``mergekit-corespace-lora`` writes), then scored on every task."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from mergekit_corespace.evaluate import Task
from mergekit_corespace.pipeline import SpaceCache
from mergekit_corespace.tune.grid import point_key
from mergekit_corespace.tune.plan import Plan

LOG = logging.getLogger(__package__)  # one logger for the tuner: mergekit_corespace.tune


class Session:
    """The base model, loaded once, with one point's merged weights in it, or one adapter
    on it at a time (the task references are always adapters)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.model = None  # the PeftModel, once the first adapter is on
        self.active: str | None = None
        self.count = 0
        self._base = None
        self.spaces = SpaceCache()  # core and KnOTS spaces, shared by every point
        self.score_as = plan.score_as
        self._merged = None  # the last point's merge, before λ
        self._merged_key: str | None = None

    def _base_model(self):
        if self._base is None:
            from transformers import AutoModelForCausalLM

            self._base = AutoModelForCausalLM.from_pretrained(
                self.plan.base_path,
                revision=self.plan.base_revision,
                dtype=self.plan.dtype or "auto",
            )
            self._base.to(self.plan.device).eval()
        return self._base

    def _swap(self, add: Callable[[Any, str], None]) -> None:
        """Put a new adapter on (``add(model, name)``), then delete the previous one: the
        PeftModel always holds an adapter, and the base weights are not changed."""
        self.count += 1
        name = f"point{self.count}"
        add(self.model, name)
        self.model.set_adapter(name)
        if self.active is not None:
            self.model.delete_adapter(self.active)
        self.active = name
        self.model.eval()

    def _apply(self, export) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        # As PeftModel.from_pretrained loads the written adapter: LoRA layers made, then
        # upcast to float32 on a half-precision base (autocast_adapter_dtype), then the
        # tensors copied in (a weight saved whole: into its copy in the base's dtype).
        # Assigning them instead (low_cpu_mem_usage) would keep LoRA in the base's dtype.
        tensors = {name: tensor.to(self.plan.device) for name, tensor in export.tensors.items()}

        def add(model, name):
            if model is None:
                self.model = PeftModel(self._base_model(), export.config, adapter_name=name)
            else:
                model.add_adapter(name, export.config)
            set_peft_model_state_dict(self.model, tensors, adapter_name=name)

        self._swap(add)

    def reference(self, task: Task) -> float:
        """The task's own adapter alone, loaded from disk by PEFT, on ``task`` (a task of
        the plan, or its held-out part)."""
        from peft import PeftModel

        directory = self.plan.own_adapters[task.name]

        def add(model, name):
            if model is None:
                self.model = PeftModel.from_pretrained(
                    self._base_model(), directory, adapter_name=name
                )
            else:
                model.load_adapter(directory, adapter_name=name)

        self._swap(add)
        return self.plan.evaluations(self.model, [task])[task.name].score

    def _plain_base(self):
        """The loaded base with no adapter on it: loaded again once an adapter was on (an
        adapter that saved a tied weight whole leaves it untied when taken off)."""
        if self.model is not None:
            self._base = self.model = self.active = None
        return self._base_model()

    def _put(self, weights) -> None:
        """Overwrite the loaded base's weights with ``(name, tensor)`` pairs."""
        import torch

        parameters = dict(self._plain_base().named_parameters())
        with torch.no_grad():
            for name, weight in weights:
                parameters[name].copy_(weight)

    def _scored_as_model(self, merged) -> bool:
        """Whether every weight of this merge is a parameter of its own in the loaded base;
        one that is not (tied to another, or named otherwise) is scored as an adapter."""
        parameters = dict(self._plain_base().named_parameters())  # tied ones: once
        stray = [n for n in [*merged.deltas, *merged.saved] if n not in parameters]
        if stray:
            LOG.warning(
                "%s is not a parameter of its own in the loaded model: points are scored as "
                "the merged adapter instead",
                stray[0],
            )
        return not stray

    def put(self, point: Mapping[str, Any]) -> tuple[Any, float, float]:
        """The model with ``point``'s merge in it, and the seconds spent merging and putting
        the merge in. A point that differs from the previous one only in λ reuses its merge
        (λ scales the merged delta last: bit for bit a fresh merge), unless an adapter
        saved a weight whole, which holds its λ."""
        from mergekit_corespace.glue.adapter_output import factored_merge, merged_weights

        started = time.perf_counter()
        lambda_ = point.get("lambda")
        if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)):
            lambda_ = None
        key = point_key({k: v for k, v in point.items() if k != "lambda" or lambda_ is None})
        if self._merged is None or self._merged_key != key or self._merged.saved:
            self._merged = None  # the previous merge's memory, freed before the next
            config = self.plan.config_of(point)
            merge = merged_weights if self.score_as == "model" else factored_merge
            merged = merge(config, self.plan.options, spaces=self.spaces)
            if self.score_as == "model" and not self._scored_as_model(merged):
                self.score_as = "adapter"
                self._base = self.model = self.active = None  # reloaded unchanged
                merged = factored_merge(config, self.plan.options, spaces=self.spaces)
            self._merged, self._merged_key = merged, key
        merged = self._merged
        scale = None if merged.saved else lambda_
        if self.score_as == "model":
            merged_at = time.perf_counter()
            self._put(merged.weights(scale, self.plan.device))
            model = self._base_model()
        else:
            adapter = merged.adapter(scale)
            merged_at = time.perf_counter()
            self._apply(adapter.export)
            model = self.model
        return model, merged_at - started, time.perf_counter() - merged_at

    def close(self) -> None:
        if self.model is not None and self.active is not None:
            self.model.delete_adapter(self.active)
        self.model = self.active = self._merged = None
