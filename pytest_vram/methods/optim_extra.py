"""Memory-saving optimizers from other libraries: transformers' Adafactor, bitsandbytes' 8-bit
AdamW (plain and paged), GaLore, BAdam, LOMO and AdaLomo.

Each is built through its library as the library documents it; the classes here only say how
to call it, where its state lives, and what it cannot run with. None of these libraries but
transformers is a dependency of pytest-vram: without one, ``unsupported`` says which to install.
Two need CUDA inside the library itself (AdaLomo, GaLore's 8-bit AdamW): ``unsupported`` names
the call. ``notes(optimizer)`` says, after the steps, what a result should mention.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, final

from pytest_vram import methods, zoo
from pytest_vram.errors import installed, missing_library
from pytest_vram.methods import LlamaFactoryRow, Optimizer, OptionValue, Trains, state_tensors
from pytest_vram.methods.optim import DEFAULT_IMPLEMENTATION, IMPLEMENTATIONS, trainable

if TYPE_CHECKING:
    import torch

    from pytest_vram.spec import StepSpec

_BNB_8BIT_MAPS: Final = (
    "bitsandbytes' 8-bit optimizers build their quantization maps from tensor values at the "
    "first step (functional.create_dynamic_map: torch.linspace(...).tolist()); fake tensors "
    "hold no values"
)


def _needs_cuda(device: str, call: str) -> str | None:
    if device.split(":")[0] == "cuda":
        return None
    return f"{call}, which needs CUDA; this meter runs on {device!r}"


class _Library(Optimizer):
    """An optimizer from a library that may be missing: (module, pip name) pairs it imports."""

    requires: tuple[tuple[str, str], ...] = ()
    # DeepSpeed wraps plain torch optimizers here; none of these is one.
    runs_under_zero = False
    zero_state = None
    torch_class = None
    repeats_backward = False

    def unsupported(self, spec: StepSpec, device: str) -> str | None:
        for module, dist in self.requires:
            if not installed(module):
                return missing_library(dist, dist, needed_by=f"{self.name} needs")
        return None

    def notes(self, optimizer: Any) -> tuple[str, ...]:
        """What the result should say about this run, read off the optimizer after the steps."""
        return ()


@final
class Adafactor(_Library):
    """transformers Adafactor with an explicit lr: factored second moment (a row and a column
    vector per 2-D param, fp32), no first moment unless ``beta1`` > 0."""

    name = "adafactor"
    repeats_backward = True
    options: Mapping[str, OptionValue] = {
        "lr": 1e-3,
        "scale_parameter": False,
        "relative_step": False,
        "warmup_init": False,
        "beta1": 0.0,  # 0 means None: no exp_avg
    }
    fake_meter_blocker = None
    llama_factory_row = None

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any:
        from transformers.optimization import Adafactor

        relative = spec.optimizer_option("relative_step")
        return Adafactor(  # type: ignore[no-untyped-call]
            trainable(model),
            lr=None if relative else spec.optimizer_option("lr"),  # Adafactor refuses both
            scale_parameter=spec.optimizer_option("scale_parameter"),
            relative_step=relative,
            warmup_init=spec.optimizer_option("warmup_init"),
            beta1=spec.optimizer_option("beta1") or None,
        )

    def incompatible(self, spec: StepSpec) -> str | None:
        if spec.optimizer_option("warmup_init") and not spec.optimizer_option("relative_step"):
            return "adafactor warmup_init=True needs relative_step=True (transformers Adafactor)"
        return None


class _AdamW8bit(_Library):
    """bitsandbytes 8-bit AdamW: uint8 exp_avg/exp_avg_sq with an fp32 absmax per 256-element
    block and two shared 256-entry fp32 quantization maps, for tensors with at least
    ``min_8bit_size`` elements; smaller tensors keep fp32 state."""

    options: Mapping[str, OptionValue] = {"lr": 1e-4, "weight_decay": 0.0, "min_8bit_size": 4096}
    requires = (("bitsandbytes", "bitsandbytes"),)
    paged = False
    fake_meter_blocker = _BNB_8BIT_MAPS
    llama_factory_row = None

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any:
        from bitsandbytes.optim.adamw import AdamW8bit, PagedAdamW8bit

        cls = PagedAdamW8bit if self.paged else AdamW8bit
        return cls(
            trainable(model),
            lr=spec.optimizer_option("lr"),
            weight_decay=spec.optimizer_option("weight_decay"),
            min_8bit_size=spec.optimizer_option("min_8bit_size"),
        )

    def notes(self, optimizer: Any) -> tuple[str, ...]:
        if not self.paged:
            return ()
        paged = [t for t in self.state_tensors(optimizer) if getattr(t, "is_paged", False)]
        if not paged:
            return (
                "paged-adamw-8bit: no state tensor is paged; bitsandbytes pages only CUDA "
                "tensors of at least 1e5 elements (on CPU it warns 'Paged optimizers are not "
                "supported on CPU' and keeps all state in ordinary tensors, as adamw-8bit)",
            )
        nbytes = sum(t.untyped_storage().nbytes() for t in paged)
        return (
            f"paged-adamw-8bit: {len(paged)} state tensors ({nbytes} bytes) are in CUDA unified "
            "memory (cudaMallocManaged), outside torch's allocator and its peak counters",
        )


@final
class AdamW8bit(_AdamW8bit):
    name = "adamw-8bit"


@final
class PagedAdamW8bit(_AdamW8bit):
    """As adamw-8bit; on CUDA the state of tensors >= 1e5 elements is in unified memory."""

    name = "paged-adamw-8bit"
    paged = True


class _GaLore(_Library):
    """GaLore: the gradients of 2-D linear weights are projected to ``rank`` before AdamW; its
    state is the low-rank moments plus each projector's ``ortho_matrix`` (found by the default
    walk, through the projector's attributes). On fp32 weights the projector is a slice of the
    whole SVD factor, which it keeps alive (bf16/fp16 weights get a rank-sized copy)."""

    options: Mapping[str, OptionValue] = {
        "lr": 1e-4,
        "weight_decay": 0.0,
        "rank": 16,  # LLaMA-Factory's galore_rank
        "update_proj_gap": 200,
        "scale": 0.25,  # GaLore README
        "proj_type": "std",
    }
    requires: tuple[tuple[str, str], ...] = (("galore_torch", "galore-torch"),)
    llama_factory_row = LlamaFactoryRow.FREEZE_LORA

    def param_groups(self, model: torch.nn.Module, spec: StepSpec) -> list[dict[str, Any]]:
        """As LLaMA-Factory (galore_target=all): the trainable 2-D weights of every linear
        layer but the output head get GaLore; the other trainable params are a plain group."""
        import torch

        head = model.get_output_embeddings()  # type: ignore[operator]
        galore = [
            p
            for module in model.modules()
            if isinstance(module, torch.nn.Linear) and module is not head
            for p in module.parameters()
            if p.requires_grad and p.ndim == 2
        ]
        ids = {id(p) for p in galore}
        rest = [p for p in trainable(model) if id(p) not in ids]
        projection = {k: spec.optimizer_option(k) for k in ("rank", "update_proj_gap", "scale")}
        projection["proj_type"] = spec.optimizer_option("proj_type")
        return [{"params": rest}, {"params": galore, **projection}]

    def incompatible(self, spec: StepSpec) -> str | None:
        if methods.METHODS[spec.method].trains not in (Trains.ALL_WEIGHTS, Trains.SOME_WEIGHTS):
            return (
                "GaLore projects the gradients of the model's own weight matrices (full or "
                f"freeze training); {spec.method} trains adapters or virtual tokens, where it "
                "projects nothing or re-projects already low-rank LoRA matrices into more state "
                "(LLaMA-Factory refuses LoRA with GaLore)"
            )
        return None


@final
class GaLoreAdamW(_GaLore):
    name = "galore-adamw"
    repeats_backward = True  # it projects in the optimizer step, not in backward
    fake_meter_blocker = None

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(
            self.param_groups(model, spec),
            lr=spec.optimizer_option("lr"),
            weight_decay=spec.optimizer_option("weight_decay"),
            no_deprecation_warning=True,
        )


@final
class GaLoreAdamW8bit(_GaLore):
    name = "galore-adamw-8bit"
    requires = (("galore_torch", "galore-torch"), ("bitsandbytes", "bitsandbytes"))
    fake_meter_blocker = _BNB_8BIT_MAPS

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any:
        from galore_torch import GaLoreAdamW8bit

        return GaLoreAdamW8bit(
            self.param_groups(model, spec),
            lr=spec.optimizer_option("lr"),
            weight_decay=spec.optimizer_option("weight_decay"),
        )

    def unsupported(self, spec: StepSpec, device: str) -> str | None:
        return super().unsupported(spec, device) or _needs_cuda(
            device, "galore_torch GaLoreAdamW8bit.step calls torch.cuda.synchronize()"
        )


@final
class BAdam(_Library):
    """badam BlockOptimizer over torch AdamW, one decoder layer per block (BAdam's README
    prefixes ``model.layers.{i}.``). Only the active block trains: BAdam sets requires_grad,
    keeps an fp32 copy of the block's params and steps AdamW on those copies, which count as
    optimizer state. Embeddings, final norm and head stay frozen, as BAdam's default. With a
    LoRA method only the active block's LoRA params train (BAdam's LoRA mode)."""

    name = "badam"
    options: Mapping[str, OptionValue] = {
        "lr": 1e-4,
        "weight_decay": 0.0,
        "switch_block_every": 50,  # LLaMA-Factory's badam_switch_interval
        "switch_mode": "ascending",  # ascending, descending, random, fixed
        "start_block": -1,  # -1: the switch mode's own start
    }
    requires = (("badam", "badam"),)
    fake_meter_blocker = None
    llama_factory_row = LlamaFactoryRow.FREEZE_LORA

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any:
        import torch
        from badam import BlockOptimizer

        names = {id(module): name for name, module in model.named_modules()}
        layers = model.get_decoder().layers  # type: ignore[operator]
        start = spec.optimizer_option("start_block")
        base = torch.optim.AdamW(
            trainable(model),
            lr=spec.optimizer_option("lr"),
            weight_decay=spec.optimizer_option("weight_decay"),
            foreach=IMPLEMENTATIONS[DEFAULT_IMPLEMENTATION]["foreach"],  # torch's GPU choice
        )
        return BlockOptimizer(
            base_optimizer=base,
            named_parameters_list=list(model.named_parameters()),
            block_prefix_list=[[f"{names[id(layer)]}."] for layer in layers],
            switch_block_every=spec.optimizer_option("switch_block_every"),
            switch_mode=spec.optimizer_option("switch_mode"),
            start_block=None if start < 0 else start,
            verbose=0,
        )

    def state_tensors(self, optimizer: Any) -> Iterable[torch.Tensor]:
        yield from state_tensors(optimizer.base_optimizer.state)
        yield from optimizer.param_idx2hp.values()  # fp32 copies of the active block

    def notes(self, optimizer: Any) -> tuple[str, ...]:
        notes = [
            "badam: BlockOptimizer.step turns the block's gradients into fp32 copies and frees "
            "them before it returns, so at the peak they count as activations"
        ]
        if optimizer.global_step >= optimizer.switch_block_every - 1:
            notes.append(
                "badam: a block switch freed the optimizer state during the measured steps; "
                "state live at the peak then counts as activations"
            )
        return tuple(notes)

    def incompatible(self, spec: StepSpec) -> str | None:
        modes = ("ascending", "descending", "random", "fixed")
        mode = spec.optimizer_option("switch_mode")
        if mode not in modes:
            return f"badam switch_mode={mode!r} must be one of {', '.join(modes)}"
        start = spec.optimizer_option("start_block")
        if mode == "fixed" and start < 0:
            return "badam switch_mode='fixed' needs start_block (BlockOptimizer sets none)"
        config = zoo.MODELS[spec.model].config
        layers = config.get("text_config", config)["num_hidden_layers"]
        if start >= layers:
            return f"badam start_block={start} must be below the {layers} decoder layers"
        # Its LoRA mode finds the params whose names contain "lora".
        if methods.METHODS[spec.method].trains not in (Trains.ALL_WEIGHTS, Trains.LORA):
            return (
                "BAdam's BlockOptimizer sets requires_grad itself, one decoder layer at a time "
                "(all of its params, or only its LoRA params when names contain 'lora'), "
                f"which would override what {spec.method} trains"
            )
        return None


class _Lomo(_Library):
    """Fused update inside backward: each param is updated and its gradient dropped as soon as
    the next one arrives, so no gradients are stored and ``step`` is never called. (Its loss
    scaler only starts for an fp16 loss; transformers' loss is fp32 even for fp16 models.)"""

    options: Mapping[str, OptionValue] = {"lr": 1e-3, "weight_decay": 0.0}
    requires = (("lomo_optim", "lomo-optim"),)
    library_class: str  # Lomo or AdaLomo: the same constructor
    fake_meter_blocker = None
    llama_factory_row = None

    def backward_step(self, optimizer: Any, loss: torch.Tensor, spec: StepSpec) -> None:
        optimizer.fused_backward(loss, spec.optimizer_option("lr"))

    def zero_grad(self, optimizer: Any) -> None:
        """Nothing to clear: fused_backward leaves no gradient behind."""

    def build(self, model: torch.nn.Module, spec: StepSpec) -> Any:
        import lomo_optim

        return getattr(lomo_optim, self.library_class)(
            model,
            lr=spec.optimizer_option("lr"),
            weight_decay=spec.optimizer_option("weight_decay"),
        )


@final
class Lomo(_Lomo):
    """lomo_optim Lomo (plain SGD): no optimizer state."""

    name = "lomo"
    library_class = "Lomo"


@final
class AdaLomo(_Lomo):
    """lomo_optim AdaLomo: Adafactor-like factored fp32 second moment, allocated in __init__
    for every param (trainable or not) and kept in attributes, not in ``state``."""

    name = "adalomo"
    library_class = "AdaLomo"

    def state_tensors(self, optimizer: Any) -> Iterable[torch.Tensor]:
        for table in (optimizer.exp_avg_sq, optimizer.exp_avg_sq_row, optimizer.exp_avg_sq_col):
            yield from table.values()

    def unsupported(self, spec: StepSpec, device: str) -> str | None:
        return super().unsupported(spec, device) or _needs_cuda(
            device, "lomo_optim AdaLomo.__init__ allocates its state with .cuda()"
        )


REGISTER = [
    Adafactor(),
    AdamW8bit(),
    PagedAdamW8bit(),
    GaLoreAdamW(),
    GaLoreAdamW8bit(),
    BAdam(),
    Lomo(),
    AdaLomo(),
]
