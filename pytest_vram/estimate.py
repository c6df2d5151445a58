"""``pytest-vram estimate``: one training step traced on the fake meter, beside the published
rules of thumb (DeepSpeed's estimator, LLaMA-Factory's table) and why each differs.

MODEL is a zoo name or the path of a Hugging Face ``config.json``; the step is the real
``run_step`` under ``FakeMeter``, so every tensor the step holds is counted, without weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal, final

from pytest_vram import errors, references, zoo
from pytest_vram.errors import SpecError
from pytest_vram.result import GIB, MemoryResult, gib
from pytest_vram.spec import StepSpec

__all__ = [
    "DeepSpeedFigure",
    "Estimate",
    "add_arguments",
    "base_params",
    "command",
    "config_shape",
    "deepspeed_figure",
    "estimate",
    "zoo_entry",
]

_WHY_TRACE: Final = (
    "every tensor live at the step's peak: weights, gradients, optimizer state and the "
    "activations of this batch and sequence, as the step allocates them"
)
_WHY_DEEPSPEED: Final = (
    "model states only (fp16 params and grads, fp32 master and Adam state; every parameter "
    "trained): no activations or temporaries; its CPU figure has a x1.5 safety factor"
)
_WHY_TABLE: Final = (
    "a rule of thumb by method, bits and model size: no batch, sequence or optimizer term; "
    "GB as printed"
)


def config_shape(path: Path) -> zoo.ModelShape:
    """A zoo shape from a Hugging Face ``config.json``: its model_type and all other fields."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"model {str(path)!r}: not a readable config.json: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise SpecError(f"model {str(path)!r}: a config.json needs a string 'model_type'")
    model_type: str = data.pop("model_type")
    import transformers
    from transformers.models.auto import modeling_auto

    kind: Literal["causal-lm", "vision-language"]
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "causal-lm"
    elif model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        kind = "vision-language"
    else:
        raise SpecError(
            f"model {str(path)!r}: model_type {model_type!r} has no causal-LM or image-text "
            f"model in transformers {transformers.__version__}"
        )
    try:  # the fields themselves, checked now rather than mid-trace
        config = transformers.AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # TypeError, ValueError, huggingface_hub's StrictDataclassError
        raise SpecError(f"model {str(path)!r}: {exc}") from None
    # transformers only logs this one; the embedding's padding_idx then fails an assert.
    pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        raise SpecError(
            f"model {str(path)!r}: pad_token_id={pad} is outside the vocabulary "
            f"(vocab_size={vocab}); set it below vocab_size or to null"
        )
    return zoo.ModelShape(model_type, data, notes=f"from {path}", kind=kind)


@contextlib.contextmanager
def zoo_entry(model: str) -> Iterator[str]:
    """The zoo name to put in a spec for MODEL. A config.json is entered in ``zoo.MODELS`` under
    its path while the block runs: specs, methods and stages all look shapes up there."""
    if model in zoo.MODELS:
        yield model
        return
    path = Path(model)
    if not path.is_file():
        known = ", ".join(sorted(zoo.MODELS))
        raise SpecError(
            f"unknown model {model!r}: neither a zoo model nor a config.json file; known: {known}"
        )
    with zoo.registered(model, config_shape(path)):
        yield model


@final
@dataclasses.dataclass(frozen=True)
class DeepSpeedFigure:
    """One line of DeepSpeed's estimator table: per GPU and per CPU (node), in bytes."""

    function: str
    options: str
    gpu_bytes: int
    cpu_bytes: int
    total_params: int
    largest_layer_params: int | None  # ZeRO-3 only
    gpus_per_node: int
    nodes: int = 1


def deepspeed_figure(
    spec: StepSpec, total_params: int, largest_layer_params: int
) -> DeepSpeedFigure | str:
    """DeepSpeed's estimate for the spec's stage and offload, or why it has none.

    ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` print a table of every offload
    option and return None; each line is computed by the function called here. Ranks are GPUs
    on one node; zero_init is 0, since pytest-vram builds the whole model on each rank.
    """
    if spec.zero not in (2, 3):
        what = "this step runs without DeepSpeed" if spec.zero is None else f"not {spec.zero}"
        return f"DeepSpeed's estimators cover ZeRO-2 and ZeRO-3; {what}"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed: pip install 'pytest-vram[zero]'"
    opt = spec.offload in ("optimizer", "both")
    par = spec.offload in ("param", "both")
    device = {True: "cpu", False: "none"}
    # deepspeed logs its accelerator choice to stdout on import: keep stdout for the report.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero import stage3, stage_1_and_2
    if spec.zero == 2:
        cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node=spec.ranks, num_nodes=1, cpu_offload=opt
        )
        return DeepSpeedFigure(
            "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs",
            f"offload_optimizer={device[opt]}",
            gpu,
            cpu,
            total_params,
            None,
            spec.ranks,
        )
    if par and not opt:
        return (
            "DeepSpeed's ZeRO-3 estimator has no line for offload_param without offload_optimizer"
        )
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        total_params,
        largest_layer_params,
        num_gpus_per_node=spec.ranks,
        num_nodes=1,
        cpu_offload=opt,
        cpu_offload_params=par,
        zero_init=False,
    )
    return DeepSpeedFigure(
        "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs",
        f"offload_param={device[par]}, offload_optimizer={device[opt]}, zero_init=0",
        gpu,
        cpu,
        total_params,
        largest_layer_params,
        spec.ranks,
    )


def base_params(name: str, attention: str = "sdpa") -> tuple[int, int]:
    """Parameters of the base model and of its largest module (DeepSpeed's "largest layer"),
    counted on the meta device: shapes only, in about a second for 32B. Built with the step's
    ``attention``: a model without sdpa (Gemma2) cannot be built with it at all."""
    import torch

    model = zoo.build_model(name, torch.bfloat16, "meta", attention)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@final
@dataclasses.dataclass(frozen=True)
class Estimate:
    spec: StepSpec
    result: MemoryResult  # the fake meter's step; with zero set, its per-rank ZeRO simulation
    base_params: int
    deepspeed: DeepSpeedFigure | str  # a figure, or why there is none
    llama_factory: references.TableValue | None
    capacity_bytes: int | None = None

    @property
    def simulated(self) -> bool:
        return self.spec.zero is not None

    @property
    def headroom_bytes(self) -> int | None:
        if self.capacity_bytes is None:
            return None
        return self.capacity_bytes - self.result.peak_bytes

    def capacity_line(self) -> str | None:
        headroom = self.headroom_bytes
        if headroom is None or self.capacity_bytes is None:
            return None
        cap = f"capacity {gib(self.capacity_bytes):.2f} GiB"
        if headroom >= 0:
            return f"{cap}: FITS, {gib(headroom):.2f} GiB to spare"
        return f"{cap}: OUT OF MEMORY predicted by {gib(-headroom):.2f} GiB"

    def lines(self) -> Iterator[str]:
        r = self.result
        yield f"{self.spec.label}: one training step on the fake meter (shapes, no weights)"
        if self.simulated:
            yield f"  ZeRO-{self.spec.zero} per rank (max over {self.spec.ranks} ranks)"
        for name, nbytes in r.breakdown.rows():
            yield f"  {name:<29}{gib(nbytes):>10.2f} GiB"
        yield f"  {'peak':<29}{r.peak_gib:>10.2f} GiB"
        if r.host_offload_bytes:
            yield f"  {'offloaded to host':<29}{gib(r.host_offload_bytes):>10.2f} GiB"
        yield f"  params: {r.total_params:,} ({r.trainable_params:,} trained)"
        for note in r.notes:
            yield f"  note: {note}"
        yield "compared with"
        where = " per rank" if self.simulated else ""
        yield f"  pytest-vram trace      {r.peak_gib:.2f} GiB peak{where}"
        yield f"      {_WHY_TRACE}"
        ds = self.deepspeed
        if isinstance(ds, str):
            yield f"  DeepSpeed estimator    n/a: {ds}"
        else:
            yield (
                f"  DeepSpeed estimator    {gib(ds.gpu_bytes):.2f} GiB per GPU, "
                f"{gib(ds.cpu_bytes):.2f} GiB per CPU ({ds.options}; {ds.gpus_per_node} GPU/node)"
            )
            yield f"      {_WHY_DEEPSPEED}"
        table = self.llama_factory
        if table is None:
            yield "  LLaMA-Factory table    n/a: no row for this method, optimizer and precision"
        else:
            yield f"  LLaMA-Factory table    {table.gb:.4g} GB ({table.where})"
            yield f"      {_WHY_TABLE}"
            yield f"      source: {references.LLAMA_FACTORY_SOURCE}"
        capacity = self.capacity_line()
        if capacity:
            yield capacity

    def to_dict(self) -> dict[str, Any]:
        ds = self.deepspeed
        table = self.llama_factory
        headroom = self.headroom_bytes
        return {
            "result": self.result.to_dict(),
            "zero_simulation": "per-rank" if self.simulated else None,
            "base_params": self.base_params,
            "columns": {
                "pytest_vram": {"peak_bytes": self.result.peak_bytes, "why": _WHY_TRACE},
                "deepspeed": (
                    {"unavailable": ds}
                    if isinstance(ds, str)
                    else {**dataclasses.asdict(ds), "why": _WHY_DEEPSPEED}
                ),
                "llama_factory": (
                    {"unavailable": "no row for this method, optimizer and precision"}
                    if table is None
                    else {
                        "gb": table.gb,
                        "method": table.row.method,
                        "bits": table.row.bits,
                        "column_b": table.column,
                        "source": references.LLAMA_FACTORY_SOURCE,
                        "why": _WHY_TABLE,
                    }
                ),
            },
            "capacity": (
                None
                if headroom is None
                else {
                    "capacity_bytes": self.capacity_bytes,
                    "fits": headroom >= 0,
                    "headroom_bytes": headroom,
                    "message": self.capacity_line(),
                }
            ),
        }


def estimate(
    spec: StepSpec, capacity_bytes: int | None = None, notes: tuple[str, ...] = ()
) -> Estimate:
    """Trace ``spec`` on the fake meter (its model must be in ``zoo.MODELS``: see zoo_entry);
    ``notes`` go first in the result's notes."""
    from pytest_vram.meters.fake import FakeMeter
    from pytest_vram.step import run_step

    reason = FakeMeter.unsupported(spec)
    if reason:
        raise errors.Unsupported(reason)
    # With zero set, run_step traces the step without DeepSpeed and lays it out per rank.
    result = run_step(spec, FakeMeter())
    if notes:
        result = dataclasses.replace(result, notes=(*notes, *result.notes))
    base, largest = base_params(spec.model, spec.attention)
    return Estimate(
        spec=spec,
        result=result,
        base_params=base,
        deepspeed=deepspeed_figure(spec, base, largest),
        llama_factory=references.llama_factory(spec.method, spec.optimizer, spec.precision, base),
        capacity_bytes=capacity_bytes,
    )


_SPEC_ARGS: Final = (
    "method",
    "optimizer",
    "precision",
    "batch",
    "seq",
    "attention",
    "zero",
    "offload",
    "ranks",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None: StepSpec's own defaults apply, and it validates every value.
    parser.add_argument("model", help="a zoo model name, or the path of a Hugging Face config.json")
    parser.add_argument("--method", help="training method (default full)")
    parser.add_argument("--optimizer", help="optimizer (default adamw)")
    parser.add_argument("--precision", help="fp32, bf16, fp16, amp-bf16, amp-fp16 (default bf16)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 128)")
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    parser.add_argument(
        "--attention",
        help="sdpa or eager (default: sdpa, or eager for a model without sdpa, with a note)",
    )
    parser.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0-3")
    parser.add_argument("--offload", help="with --zero: none, optimizer, param, both")
    parser.add_argument("--ranks", type=int, help="with --zero: processes (GPUs on one node)")
    parser.add_argument(
        "--capacity-gb",
        type=float,
        help="device memory in GiB: print FITS or OUT OF MEMORY (exit status 1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def command(args: argparse.Namespace) -> int:
    """Run ``pytest-vram estimate``: 0; 1 when --capacity-gb predicts out of memory; 2 when it
    cannot estimate (a bad model or spec, a model transformers cannot build, a step the fake
    meter cannot trace), with one line on stderr and no traceback."""
    from pytest_vram import quiet

    quiet.install(command=True)
    try:
        result = _estimate(args)
    except Exception as exc:  # every way out is one line and status 2, not a traceback
        print(f"pytest-vram estimate: {_one_line(exc, args.model)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(result.lines()))
    headroom = result.headroom_bytes
    return 1 if headroom is not None and headroom < 0 else 0


def _estimate(args: argparse.Namespace) -> Estimate:
    kwargs = {name: getattr(args, name) for name in _SPEC_ARGS if getattr(args, name) is not None}
    capacity: float | None = args.capacity_gb
    if capacity is not None and not capacity > 0:
        raise SpecError(f"--capacity-gb={capacity!r} must be > 0")
    capacity_bytes = None if capacity is None else int(capacity * GIB)
    with zoo_entry(args.model) as name:
        notes: tuple[str, ...] = ()
        if "attention" not in kwargs:
            # Not asked for: the one transformers itself falls back to, said in the notes,
            # rather than a refusal of a choice the user did not make.
            why = zoo.sdpa_missing(name)
            kwargs["attention"] = "eager" if why else "sdpa"
            notes = (f"attention eager, not the default sdpa: {why}",) if why else ()
        spec = StepSpec.from_kwargs(model=name, grad_ckpt=args.grad_ckpt, **kwargs)
        return estimate(spec, capacity_bytes, notes)


def _one_line(exc: Exception, model: str) -> str:
    """A refusal's message on one line; else the package whose frame raised, type, first line."""
    from pytest_vram.errors import Unsupported

    if isinstance(exc, (SpecError, Unsupported)):
        return " ".join(str(exc).split())
    tb, where = exc.__traceback__, "pytest_vram"
    while tb is not None:  # to the innermost frame: transformers', torch's
        where, tb = tb.tb_frame.f_globals.get("__name__", where), tb.tb_next
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"model {model!r}: {where.partition('.')[0]} raised {type(exc).__name__}: {first}"
