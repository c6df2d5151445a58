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
from typing import Any, Final

from pytest_vram import methods
from pytest_vram.spec import StepSpec

__all__ = ["Gathered", "Knobs", "Module", "gathered", "gathered_bytes", "modules_of"]

_DEFAULT_PREFETCH: Final = 50_000_000
_DEFAULT_MAX_LIVE: Final = 1_000_000_000
_DEFAULT_REUSE: Final = 1_000_000_000
_DEFAULT_PERSISTENCE: Final = 100_000


@dataclasses.dataclass(frozen=True)
class Module:
    """A module as the coordinator sees it: its own parameters (``iter_params(recurse=False)``),
    each an index into the model's parameter sizes, and its submodules in the order the
    forward calls them."""

    params: tuple[int, ...] = ()
    children: tuple[Module, ...] = ()
    # Its forward's autograd keeps a view of the gathered weight until its backward:
    # bitsandbytes' MatMul4Bit.forward saves the packed weight (ctx.tensors) when its input
    # needs a gradient, and DeepSpeed's release (free_param: param.data = torch.empty(0)) drops
    # only its own reference.
    saves_weight: bool = False

    def order(self, forward: bool) -> list[Module]:
        """The modules as their hooks fetch them: a module before its submodules, which the
        backward reaches in reverse."""
        kids = self.children if forward else tuple(reversed(self.children))
        return [self, *(m for kid in kids for m in kid.order(forward))]


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The ``zero_optimization`` settings the coordinator runs by."""

    prefetch_bucket_size: int = _DEFAULT_PREFETCH
    max_live_parameters: int = _DEFAULT_MAX_LIVE
    max_reuse_distance: int = _DEFAULT_REUSE
    persistence_threshold: int = _DEFAULT_PERSISTENCE

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> Knobs:
        zero: Mapping[str, Any] = (config or {}).get("zero_optimization", {})

        def number(key: str, default: int) -> int:
            try:
                return int(float(zero.get(key, default)))
            except (TypeError, ValueError):  # "auto" left in: DeepSpeed's default
                return default

        return cls(
            number("stage3_prefetch_bucket_size", _DEFAULT_PREFETCH),
            number("stage3_max_live_parameters", _DEFAULT_MAX_LIVE),
            number("stage3_max_reuse_distance", _DEFAULT_REUSE),
            number("stage3_param_persistence_threshold", _DEFAULT_PERSISTENCE),
        )


@dataclasses.dataclass(frozen=True)
class Gathered:
    """Gathered bytes at the moments of a step that can hold ZeRO-3's peak."""

    forward: int  # the most held in the forward before the output projection's fetch
    backward_start: int  # after the backward's first fetch and its prefetch


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
        self, sizes: Sequence[tuple[int, int]], order: Sequence[Module], knobs: Knobs, ranks: int
    ):
        self.sizes = sizes
        self.order = order
        self.knobs = knobs
        self.ranks = ranks
        # Parameters of at most stage3_param_persistence_threshold elements persist
        # (DeepSpeedZeRoOffload.mark_persistent_parameters): never partitioned, nothing to gather.
        self.persist = {i for i, (n, _) in enumerate(sizes) if n <= knobs.persistence_threshold}
        self.available: set[int] = set()
        # Each gathered parameter's data: a sequential gather's buffer from the gather on, a
        # coalesced one's copy from its wait on.
        self.held: dict[int, int] = {}
        self.saved = 0  # released parameters' data that autograd still holds
        self.saving: set[int] = set()
        self.inflight: dict[int, _Handle] = {}
        self.handles: list[_Handle] = []
        self.n_available = 0
        self.active: dict[int, set[int]] = collections.defaultdict(set)
        # reset_step: the fetch queue is the recorded trace, module by module, parameters in
        # ds_id order, each with the step it is used at (record_parameters).
        self.queue = collections.deque(
            (p, step) for step, m in enumerate(order) for p in sorted(set(m.params))
        )
        self.fetched_for: dict[int, float] = collections.defaultdict(lambda: -1e10)
        self.step = 0

    def bytes(self) -> int:
        flats = sum(h.flat for h in self.handles if h.waiting)
        return flats + sum(self.held.values()) + self.saved

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

    def fetch(self, module: Module) -> None:
        """``_fetch_sub_module_impl`` with a complete trace."""
        params = set(module.params) - self.persist
        self._all_gather(params)
        for p in params:
            self.active[p].add(self.step)
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

    def release(self, module: Module, fetched_at: int) -> None:
        """``release_sub_module``: a parameter stays gathered while used again within
        ``stage3_max_reuse_distance`` elements of the trace (``__params_to_release``)."""
        release = {p for p in module.params if p not in self.persist}
        release = {p for p in release if self.fetched_for[p] <= self.step}
        traversed = 0
        for m in self.order[self.step :]:
            if traversed >= self.knobs.max_reuse_distance:
                break
            for p in m.params:
                release.discard(p)
                traversed += self.sizes[p][0]
        for p in module.params:
            self.active[p].discard(fetched_at)
            if p in release and p in self.available and not self.active[p]:
                self.available.discard(p)
                held = self.held.pop(p)
                if p in self.saving:
                    self.saving.discard(p)
                    self.saved += held
                self.n_available -= self.sizes[p][0]


def gathered(sizes: Sequence[tuple[int, int]], model: Module, knobs: Knobs, ranks: int) -> Gathered:
    """Replay the coordinator over the forward and the start of the backward of a step whose
    trace was recorded the step before, as every step after the second is. ``sizes``: each
    parameter's elements and bytes per element; ``model``: the root module."""
    c = _Coordinator(sizes, [*model.order(True), *model.order(False)], knobs, ranks)
    most = 0
    output = False
    last = c.order[len(c.order) // 2 - 1]  # the forward's last module: the output projection

    def forward(m: Module) -> None:
        # _pre_forward_module_hook fetches; _post_forward_module_hook releases once the
        # module's own submodules have run.
        nonlocal most, output
        at = c.step
        c.fetch(m)
        if m.saves_weight:
            c.saving.update(m.params)
        output = output or m is last
        if not output:
            most = max(most, c.bytes())
        for kid in m.children:
            forward(kid)
        c.release(m, at)

    forward(model)
    # The backward's pre-backward hooks fetch down to the last module the forward ran (the
    # output projection), whose gradient is the first to arrive.
    backward = model.order(False)
    for m in backward:
        c.fetch(m)
        if not m.children:
            break
    return Gathered(forward=most, backward_start=c.bytes())


def modules_of(spec: StepSpec, w: int) -> tuple[list[tuple[int, int]], Module | None]:
    """A decoder model's parameters and its module tree, from its config: the embedding, each
    layer's norms, attention and MLP projections (with peft's adapters as their own modules
    under LoRA, and packed 4-bit base weights under QLoRA), the final norm and the output
    projection. None for a model without a known config."""
    from pytest_vram import zoo

    try:
        config = zoo.build_config(spec.model)
    except Exception:  # noqa: BLE001  # not a zoo model: nothing to replay
        return [], None
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 0)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    if not (hidden and inter and vocab and layers and heads):
        return [], None
    kv = int(getattr(text, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(text, "head_dim", 0) or hidden // heads)
    bias = bool(getattr(text, "attention_bias", False))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    method = methods.METHODS[spec.method]
    lora = method.trains is methods.Trains.LORA
    rank = int(spec.method_option("rank")) if lora else 0
    packed = method.base_weight_bits
    sizes: list[tuple[int, int]] = []

    def param(numel: int, item: int = w) -> int:
        sizes.append((numel, item))
        return len(sizes) - 1

    def linear(n_in: int, n_out: int, with_bias: bool = False, grad_in: bool = True) -> Module:
        if packed:  # bitsandbytes packs the weight into uint8 storage
            weight = param(n_in * n_out * packed // 8, 1)
        else:
            weight = param(n_in * n_out)
        own = (weight, param(n_out)) if with_bias else (weight,)
        base = Module(own, saves_weight=bool(packed) and grad_in)
        if not lora:
            return base
        # peft's lora.Linear: its base_layer, the dropout, lora_A and lora_B. The wrapper
        # reads lora_A.weight's dtype before lora_A runs; DeepSpeed gathers it there and makes
        # it the wrapper's parameter too (ZeROOrderedDict.__getitem__ ->
        # register_external_parameter), fetched and released with the wrapper.
        a = param(rank * n_in)
        b = param(n_out * rank)
        return Module((a,), (base, Module(), Module((a,)), Module((b,))))

    # The first layer's query, key and value projections read the embedding's output, which
    # needs no gradient unless the embedding trains or checkpointing makes it need one
    # (enable_input_require_grads, as the step and transformers' Trainer call it).
    embedding_trains = method.trains is methods.Trains.ALL_WEIGHTS or spec.grad_ckpt

    def layer(first: bool) -> Module:
        norm = Module((param(hidden),))
        grad_in = embedding_trains or not first
        attention = Module(
            children=(
                linear(hidden, heads * head_dim, bias, grad_in),
                linear(hidden, kv * head_dim, bias, grad_in),
                linear(hidden, kv * head_dim, bias, grad_in),
                linear(heads * head_dim, hidden),
            )
        )
        post_norm = Module((param(hidden),))
        gate = linear(hidden, inter)
        up = linear(hidden, inter)
        down = linear(inter, hidden)
        mlp = Module(children=(gate, Module(), up, down))  # act_fn between gate and up
        return Module(children=(norm, attention, post_norm, mlp))

    embedding = param(vocab * hidden)
    decoder = Module(
        children=(
            Module((embedding,)),
            Module(),  # the rotary embedding
            *(layer(i == 0) for i in range(layers)),
            Module((param(hidden),)),
        )
    )
    output = Module((embedding,) if tied else (param(vocab * hidden),))
    root = Module(children=(decoder, output))
    if lora:  # peft's PeftModelForCausalLM around its LoraModel
        root = Module(children=(Module(children=(root,)),))
    return sizes, root


def gathered_bytes(spec: StepSpec, w: int, config: Mapping[str, Any] | None) -> Gathered | None:
    """ZeRO-3's gathered bytes for ``spec`` run with ``config``; None for a model whose
    modules are not known."""
    sizes, root = modules_of(spec, w)
    if root is None:
        return None
    return gathered(sizes, root, Knobs.of(config), spec.ranks)
