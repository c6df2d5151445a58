"""A decoder model as ZeRO-3's parameter coordinator sees it: modules, their own parameters,
and what autograd does at each (``gather`` replays the coordinator over this tree)."""

from __future__ import annotations

import dataclasses

from pytest_vram import methods
from pytest_vram.spec import StepSpec

__all__ = ["Module", "modules_of"]


@dataclasses.dataclass(frozen=True, eq=False)
class Module:
    """A module as the coordinator sees it: its own parameters (``iter_params(recurse=False)``),
    each an index into the model's parameter sizes, and its submodules in the order the
    forward calls them. Compared by identity: equal-looking layers are different modules."""

    params: tuple[int, ...] = ()
    children: tuple[Module, ...] = ()
    # Its forward's autograd keeps a view of the gathered weight until its backward:
    # bitsandbytes' MatMul4Bit.forward saves the packed weight (ctx.tensors, a plain attribute
    # that checkpointing does not discard) when its input needs a gradient, and DeepSpeed's
    # release (free_param: param.data = torch.empty(0)) drops only its own reference.
    saves_weight: bool = False
    # Its own parameters need no gradient: fetched inside a checkpointed recompute, they stay
    # gathered for the backward module under way (fetch_sub_module -> update_recompute_parameters).
    frozen: bool = False
    # Its output needs a gradient: its pre-backward hook fetches it in backward
    # (PreBackwardFunctionForModule runs only on outputs autograd differentiates).
    grad_out: bool = True
    # Its input gets a gradient: its post-backward hook releases it
    # (PostBackwardFunctionModule counts the inputs that require grad).
    grad_in: bool = True
    # A checkpointed layer (transformers' GradientCheckpointingLayer, non-reentrant): its
    # backward runs its submodules' forwards again.
    checkpointed: bool = False

    def order(self, forward: bool) -> list[Module]:
        """The modules as their hooks fetch them: a module before its submodules, which the
        backward reaches in reverse."""
        kids = self.children if forward else tuple(reversed(self.children))
        return [self, *(m for kid in kids for m in kid.order(forward))]


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
        base = Module(
            own,
            saves_weight=bool(packed) and grad_in,
            frozen=lora,
            grad_out=grad_in or not lora,
            grad_in=grad_in,
        )
        if not lora:
            return base
        # peft's lora.Linear: its base_layer, the dropout, lora_A and lora_B. The wrapper
        # reads lora_A.weight's dtype before lora_A runs; DeepSpeed gathers it there and makes
        # it the wrapper's parameter too (ZeROOrderedDict.__getitem__ ->
        # register_external_parameter), fetched and released with the wrapper.
        a = param(rank * n_in)
        b = param(n_out * rank)
        dropout = Module(grad_out=grad_in, grad_in=grad_in)
        kids = (base, dropout, Module((a,), grad_in=grad_in), Module((b,)))
        return Module((a,), kids, grad_in=grad_in)

    # The first layer's query, key and value projections read the embedding's output, which
    # needs no gradient unless the embedding trains or checkpointing makes it need one
    # (enable_input_require_grads, as the step and transformers' Trainer call it).
    embedding_trains = method.trains is methods.Trains.ALL_WEIGHTS or spec.grad_ckpt

    def layer(first: bool) -> Module:
        grad_in = embedding_trains or not first
        norm = Module((param(hidden),), frozen=lora, grad_out=grad_in or not lora, grad_in=grad_in)
        attention = Module(
            children=(
                linear(hidden, heads * head_dim, bias, grad_in),
                linear(hidden, kv * head_dim, bias, grad_in),
                linear(hidden, kv * head_dim, bias, grad_in),
                linear(heads * head_dim, hidden),
            )
        )
        post_norm = Module((param(hidden),), frozen=lora)
        gate = linear(hidden, inter)
        up = linear(hidden, inter)
        down = linear(inter, hidden)
        mlp = Module(children=(gate, Module(), up, down))  # act_fn between gate and up
        kids = (norm, attention, post_norm, mlp)
        return Module(children=kids, grad_in=grad_in, checkpointed=spec.grad_ckpt)

    # The embedding reads token ids and the rotary embedding makes constant tables: neither
    # input gets a gradient, nor does the rotary tables' output.
    embedding = Module(
        (param(vocab * hidden),), frozen=lora, grad_out=embedding_trains, grad_in=False
    )
    rotary = Module(grad_out=False, grad_in=False)
    decoder = Module(
        children=(
            embedding,
            rotary,
            *(layer(i == 0) for i in range(layers)),
            Module((param(hidden),), frozen=lora),
        ),
        grad_in=False,
    )
    output = Module(embedding.params if tied else (param(vocab * hidden),), frozen=lora)
    root = Module(children=(decoder, output), grad_in=False)
    if lora:  # peft's PeftModelForCausalLM around its LoraModel
        root = Module(children=(Module(children=(root,), grad_in=False),), grad_in=False)
    return sizes, root
