"""ZeRO-3's gathered parameters through a step, replayed as DeepSpeed 0.19's coordinator runs.

``PartitionedParameterCoordinator`` (deepspeed/runtime/zero/partitioned_param_coordinator.py)
gathers each module's partitioned parameters before its forward and backward
(``fetch_sub_module``), prefetches the next ones in the trace it recorded on the previous step,
and releases them after (``release_sub_module``) unless they are used again soon. What that
holds at each module decides ZeRO-3's peak as much as the activations do; this replays it over
the module sequence of a decoder model (``modules_of``) and reports the gathered bytes at the
moments ``simulation`` pairs with the traced activations. Sizes are bytes per rank.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_vram.spec import StepSpec
from pytest_vram.zero.modules import Module, modules_of
from pytest_vram.zero.sim_terms import ZeroKnobs

__all__ = ["Gathered", "Module", "gathered", "gathered_bytes", "modules_of", "persistent"]


@dataclasses.dataclass(frozen=True)
class Gathered:
    """Gathered bytes at the moments of a step that can hold ZeRO-3's peak."""

    forward: int  # the most held in the forward before the output projection's fetch
    backward_start: int  # after the backward's first fetch and its prefetch
    # The most held from the first checkpointed layer's recompute to the end of backward; 0
    # without checkpointing.
    recompute: int = 0
    # Persistent parameters, whole on every rank beside their partitions: never gathered or
    # released, so not in the moments above.
    persistent: int = 0


def persistent(sizes: Sequence[tuple[int, int]], knobs: ZeroKnobs) -> set[int]:
    """The parameters DeepSpeed keeps whole on every rank
    (``DeepSpeedZeRoOffload.mark_persistent_parameters``): at most
    ``stage3_param_persistence_threshold`` elements each, in the model's order, while their
    total stays within ``stage3_model_persistence_threshold``."""
    kept: set[int] = set()
    total = 0
    for i, (n, _) in enumerate(sizes):
        if n + total > knobs.model_persistence_threshold:
            continue
        if n <= knobs.persistence_threshold:
            kept.add(i)
            total += n
    return kept


@dataclasses.dataclass
class _Handle:
    """An all-gather in flight or done: ``_all_gather_sequential`` (one parameter, its buffer
    is the parameter's data) or ``_all_gather_dtype`` (several: one flat buffer, split into a
    copy per parameter by ``AllGatherCoalescedHandle.wait``; the flat buffer lives as long as
    the handle, which the inflight registry holds until its last parameter is fetched)."""

    params: tuple[int, ...]
    flat: int
    waiting: set[int]  # parameters still in the inflight registry under this handle
    complete: bool = False


class _Coordinator:
    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        order: Sequence[Module],
        knobs: ZeroKnobs,
        ranks: int,
    ):
        self.sizes = sizes
        self.order = order
        self.knobs = knobs
        self.ranks = ranks
        # Persistent parameters are always available: nothing to gather or release.
        self.persist = persistent(sizes, knobs)
        self.available: set[int] = set()
        # Each gathered parameter's data: a sequential gather's buffer from the gather on, a
        # coalesced one's copy from its wait on.
        self.held: dict[int, int] = {}
        # Released parameters' data that autograd still holds, until their module's backward.
        self.saved: dict[int, int] = {}
        self.saving: set[int] = set()
        self.inflight: dict[int, _Handle] = {}
        self.handles: list[_Handle] = []
        self.n_available = 0
        # ds_active_sub_modules: the modules (by identity) each parameter is fetched for.
        self.active: dict[int, set[int]] = collections.defaultdict(set)
        # __active_backward_submodules, in the order their backward fetched them, and each
        # one's ds_recompute_parameters.
        self.in_backward: dict[int, Module] = {}
        self.recomputed: dict[int, set[int]] = collections.defaultdict(set)
        # reset_step: the fetch queue is the recorded trace, module by module, parameters in
        # ds_id order, each with the step it is used at (record_parameters).
        self.queue = collections.deque(
            (p, step) for step, m in enumerate(order) for p in sorted(set(m.params))
        )
        self.fetched_for: dict[int, float] = collections.defaultdict(lambda: -1e10)
        self.step = 0

    def bytes(self) -> int:
        flats = sum(h.flat for h in self.handles if h.waiting)
        return flats + sum(self.held.values()) + sum(self.saved.values())

    def _partition(self, p: int) -> int:
        return math.ceil(self.sizes[p][0] / self.ranks)

    def _all_gather(self, params: set[int]) -> None:
        """``__all_gather_params_`` -> ``all_gather_coalesced``: one parameter alone gathers
        into its own buffer, several into one flat buffer per dtype."""
        todo = sorted(p for p in params if p not in self.available and p not in self.inflight)
        if not todo:
            return
        self.n_available += sum(self.sizes[p][0] for p in todo)
        if len(todo) == 1:
            groups = [todo]
        else:
            by_dtype: dict[int, list[int]] = collections.defaultdict(list)
            for p in todo:
                by_dtype[self.sizes[p][1]].append(p)
            groups = list(by_dtype.values())
        for group in groups:
            sequential = len(todo) == 1
            item = self.sizes[group[0]][1]
            flat = 0 if sequential else sum(self._partition(p) for p in group) * self.ranks * item
            h = _Handle(tuple(group), flat, set(group))
            self.handles.append(h)
            for p in group:
                self.inflight[p] = h
                if sequential:  # the gather buffer, padded to a multiple of the ranks
                    self.held[p] = self._partition(p) * self.ranks * item

    def _wait(self, h: _Handle) -> None:
        if h.complete:
            return
        h.complete = True
        for p in h.params:
            n, item = self.sizes[p]
            self.available.add(p)
            if h.flat:  # torch.cat of the partitions: the parameter's own size
                self.held[p] = n * item

    def fetch(self, module: Module, forward: bool = True, recompute: bool = False) -> None:
        """``fetch_sub_module`` -> ``_fetch_sub_module_impl`` with a complete trace."""
        if not forward:
            self.in_backward.setdefault(id(module), module)
        params = set(module.params) - self.persist
        self._all_gather(params)
        for p in set(module.params):
            self.active[p].add(id(module))
            # A frozen parameter fetched by a checkpointed layer's recompute (a forward inside
            # backward: _current_graph_task_id() != -1) stays for the backward module under
            # way, which releases it (update_recompute_parameters).
            if recompute and module.frozen and self.in_backward:
                owner = next(reversed(self.in_backward.values()))
                self.recomputed[id(owner)].add(p)
                self.active[p].add(id(owner))
        for p in params:
            h = self.inflight.pop(p, None)
            if h is not None:
                h.waiting.discard(p)
                self._wait(h)
        self.handles = [h for h in self.handles if h.waiting]
        not_fetched = {p for p in module.params if self.fetched_for[p] < self.step}
        discarded = 0
        while self.queue and discarded < len(not_fetched):
            p, step = self.queue.popleft()
            self.fetched_for[p] = step
            discarded += 1
        if self.knobs.prefetch_bucket_size > 0:
            budget = min(
                self.knobs.max_live_parameters - self.n_available, self.knobs.prefetch_bucket_size
            )
            prefetch: set[int] = set()
            numel = 0
            while self.queue and numel < budget:
                p, step = self.queue.popleft()
                todo = p not in self.persist and p not in self.available and p not in self.inflight
                self.fetched_for[p] = max(self.fetched_for[p], step)
                if todo and p not in prefetch:
                    prefetch.add(p)
                    numel += self.sizes[p][0]
            self._all_gather(prefetch)
        self.step += 1

    def release(self, module: Module, forward: bool = True) -> None:
        """``release_sub_module``: a parameter stays gathered while used again within
        ``stage3_max_reuse_distance`` elements of the trace (``__params_to_release``); after
        a backward, the parameters its recompute fetched go too."""
        own = set(module.params)
        release = {p for p in own - self.persist if self.fetched_for[p] <= self.step}
        traversed = 0
        # Indexed, not sliced: the walk stops within the reuse distance, where a slice would
        # copy the rest of the trace at every release.
        for i in range(self.step, len(self.order)):
            if traversed >= self.knobs.max_reuse_distance:
                break
            m = self.order[i]
            for p in m.params:
                release.discard(p)
                traversed += self.sizes[p][0]
        if not forward:
            recomputed = self.recomputed.pop(id(module), set())
            release |= recomputed - self.persist
            own |= recomputed
            self.in_backward.pop(id(module), None)
            # Its autograd node has run: the views it kept of its weights go with it.
            if module.saves_weight:
                for p in module.params:
                    self.saved.pop(p, None)
        for p in own:
            self.active[p].discard(id(module))
            if p in release and p in self.available and not self.active[p]:
                self.available.discard(p)
                held = self.held.pop(p)
                if p in self.saving:
                    self.saving.discard(p)
                    self.saved[p] = self.saved.get(p, 0) + held
                self.n_available -= self.sizes[p][0]


def _steps(model: Module) -> list[tuple[str, Module]]:
    """The step's hook calls in order: ("fetch" | "release", module) in the forward; in the
    backward "fetch-b" / "release-b", and a checkpointed layer's recompute ("fetch-r" /
    "release-r") at its first leaf's backward."""
    calls: list[tuple[str, Module]] = []

    def forward(m: Module, tag: str = "") -> None:
        # _pre_forward_module_hook fetches; _post_forward_module_hook releases once the
        # module's own submodules have run.
        calls.append(("fetch" + tag, m))
        for kid in m.children:
            forward(kid, tag)
        calls.append(("release" + tag, m))

    def recompute(layer: Module) -> None:
        # torch.utils.checkpoint (non-reentrant) runs the layer's forward again when backward
        # first unpacks a tensor it saved, and stops once the last saved tensor is made
        # again (_StopRecomputationError): inside the last leaf with weights, whose
        # post-forward hooks, and its ancestors', never run.
        start = len(calls)
        for kid in layer.children:
            forward(kid, "-r")
        last = max(
            i
            for i in range(start, len(calls))
            if calls[i][0] == "fetch-r" and calls[i][1].params and not calls[i][1].children
        )
        del calls[last + 1 :]

    pending: list[Module] = []

    def backward(m: Module) -> None:
        if not m.grad_out:
            return
        calls.append(("fetch-b", m))
        if m.checkpointed:
            pending.append(m)
        if pending and not m.children:
            recompute(pending.pop())
        for kid in reversed(m.children):
            backward(kid)
        if m.grad_in:
            calls.append(("release-b", m))

    forward(model)
    backward(model)
    return calls


def gathered(
    sizes: Sequence[tuple[int, int]], model: Module, knobs: ZeroKnobs, ranks: int
) -> Gathered:
    """Replay the coordinator over a step whose trace was recorded the step before, as every
    step after the second is. ``sizes``: each parameter's elements and bytes per element;
    ``model``: the root module."""
    calls = _steps(model)
    c = _Coordinator(sizes, [m for call, m in calls if call.startswith("fetch")], knobs, ranks)
    forward_most = 0
    backward_start = 0
    recompute_most = 0
    output = False
    started = False
    recomputing = False
    last = [m for call, m in calls if call == "fetch"][-1]  # the output projection
    for call, m in calls:
        if call.startswith("fetch"):
            c.fetch(m, forward=call != "fetch-b", recompute=call == "fetch-r")
        else:
            c.release(m, forward=call != "release-b")
        if call == "fetch":
            if m.saves_weight:
                c.saving.update(m.params)
            output = output or m is last
            if not output:
                forward_most = max(forward_most, c.bytes())
        # The backward's pre-backward hooks fetch down to the last module the forward ran (the
        # output projection), whose gradient is the first to arrive.
        if call == "fetch-b" and not m.children and not started:
            started = True
            backward_start = c.bytes()
        recomputing = recomputing or call == "fetch-r"
        if recomputing:
            recompute_most = max(recompute_most, c.bytes())
    return Gathered(
        forward=forward_most,
        backward_start=backward_start,
        recompute=recompute_most,
        persistent=sum(n * item for i, (n, item) in enumerate(sizes) if i in c.persist),
    )


def gathered_bytes(spec: StepSpec, w: int, config: Mapping[str, Any] | None) -> Gathered | None:
    """ZeRO-3's gathered bytes for ``spec`` run with ``config``; None for a model whose
    modules are not known."""
    sizes, root = modules_of(spec, w)
    if root is None:
        return None
    return gathered(sizes, root, ZeroKnobs.of(3, config), spec.ranks)
