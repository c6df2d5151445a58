"""``pytest-vram estimate MODEL [options]``: its arguments, the command, and its text and JSON
output. What is estimated, and how, is ``estimate``; this module only asks and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, Final

from pytest_vram import references
from pytest_vram.device_profile import GPUS, DeviceProfile
from pytest_vram.errors import SpecError, Unsupported
from pytest_vram.estimate import Estimate, estimate_model
from pytest_vram.result import gib
from pytest_vram.units import format_bytes, format_pair, parse_size

__all__ = ["add_arguments", "capacity_line", "command", "json_object", "text_lines"]

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
_NO_TABLE_ROW: Final = "no row for this method, optimizer and precision"

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
    for what, example in (("method", "r=64"), ("optimizer", "implementation=fused")):
        parser.add_argument(
            f"--{what}-option",
            action="append",
            default=[],
            type=_option,
            metavar="KEY=VALUE",
            help=f"an option of the {what}, e.g. {example}; repeatable. VALUE is read as JSON "
            'where it parses (64, 0.1, true, ["q_proj"]), else as text',
        )
    parser.add_argument(
        "--attention",
        help="sdpa or eager (default: sdpa, or eager for a model without sdpa, with a note)",
    )
    parser.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0-3")
    parser.add_argument("--offload", help="with --zero: none, optimizer, param, both")
    parser.add_argument("--ranks", type=int, help="with --zero: processes (GPUs on one node)")
    parser.add_argument(
        "--capacity-gb",
        help="device memory: a number of GiB (24) or a size with its unit, as the marker's "
        "capacity_gb= ('24GiB', '512MiB'); print FITS or OUT OF MEMORY (exit status 1)",
    )
    parser.add_argument(
        "--gpu-model",
        help=f"the GPU to predict nvidia-smi's figure for, which sets torch's cuBLAS workspace: "
        f"{', '.join(GPUS)} (default: an unnamed pre-Hopper GPU)",
    )
    parser.add_argument(
        "--cuda-context-mib",
        type=_mib,
        help="MiB of the CUDA context per process (default 426, a bare context as published)",
    )
    parser.add_argument(
        "--nccl-mib",
        type=_mib,
        help="MiB of NCCL's buffers per GPU with --ranks 2 or more (default 544 for 2, 688 more)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB >= 0")
    return value


def command(args: argparse.Namespace) -> int:
    """Run ``pytest-vram estimate``: 0; 1 when --capacity-gb predicts out of memory; 2 when it
    cannot estimate (a bad model or spec, a model transformers cannot build, a step the fake
    meter cannot trace), with one line on stderr and no traceback."""
    from pytest_vram import deferred_compile, quiet

    quiet.install(command=True)
    deferred_compile.install()
    try:
        result = _estimate(args)
    except Exception as exc:  # every way out is one line and status 2, not a traceback
        print(f"pytest-vram estimate: {_one_line(exc, args.model)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_object(result), indent=2, sort_keys=True))
    else:
        print("\n".join(text_lines(result)))
    headroom = result.headroom_bytes
    return 1 if headroom is not None and headroom < 0 else 0


def _estimate(args: argparse.Namespace) -> Estimate:
    fields = {name: getattr(args, name) for name in _SPEC_ARGS if getattr(args, name) is not None}
    for what in ("method", "optimizer"):
        given = getattr(args, f"{what}_option")
        if given:
            fields[f"{what}_options"] = dict(given)
    capacity_bytes = None if args.capacity_gb is None else _capacity(args.capacity_gb)
    device = DeviceProfile.named(
        args.gpu_model, os.environ, context_mib=args.cuda_context_mib, nccl_mib=args.nccl_mib
    )
    _freeze_libraries()
    return estimate_model(args.model, capacity_bytes, device, grad_ckpt=args.grad_ckpt, **fields)


def _freeze_libraries() -> None:
    """Import what every trace needs, then freeze it (``frozen_heap``): this command is one
    short process, and its trace's full collections would otherwise walk all of it."""
    import transformers.modeling_utils  # noqa: F401  # every model's base: most of the objects

    import pytest_vram.meters.fake  # noqa: F401
    import pytest_vram.step  # noqa: F401
    from pytest_vram import frozen_heap

    # Its first import froze what was alive then; in a process that calls main() more than
    # once (tests), this freezes what came since.
    frozen_heap.freeze_objects()


def _capacity(text: str) -> int:
    """Bytes of ``--capacity-gb``: a bare number is GiB, as ``capacity_gb=2`` in a marker; a
    string there needs its unit, and every word of a command line is a string."""
    try:
        number: object = float(text)
    except ValueError:
        return parse_size("--capacity-gb", text)
    return parse_size("--capacity-gb", number)


def _one_line(exc: Exception, model: str) -> str:
    """A refusal's message on one line; else the package whose frame raised, type, first line."""
    if isinstance(exc, (SpecError, Unsupported)):
        return " ".join(str(exc).split())
    tb, where = exc.__traceback__, "pytest_vram"
    while tb is not None:  # to the innermost frame: transformers', torch's
        where, tb = tb.tb_frame.f_globals.get("__name__", where), tb.tb_next
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"model {model!r}: {where.partition('.')[0]} raised {type(exc).__name__}: {first}"


# -- output ------------------------------------------------------------------------------------


def capacity_line(est: Estimate) -> str | None:
    """FITS or OUT OF MEMORY against --capacity-gb; None without a capacity."""
    headroom = est.headroom_bytes
    if headroom is None or est.capacity_bytes is None:
        return None
    # digits enough that a capacity and a peak that differ never read the same
    cap, peak = format_pair(est.capacity_bytes, est.result.peak_bytes)
    if headroom >= 0:
        return f"capacity {cap}: FITS, {format_bytes(headroom)} to spare (peak {peak})"
    return f"capacity {cap}: OUT OF MEMORY predicted by {format_bytes(-headroom)} (peak {peak})"


def text_lines(est: Estimate) -> Iterator[str]:
    r = est.result
    yield f"{est.spec.label}: one training step on the fake meter (shapes, no weights)"
    if est.simulated:
        yield f"  ZeRO-{est.spec.zero} per rank (max over {est.spec.ranks} rank{'s' * (est.spec.ranks != 1)})"
    for name, nbytes in r.breakdown.rows():
        yield f"  {name:<29}{gib(nbytes):>10.2f} GiB"
    yield f"  {'peak':<29}{r.peak_gib:>10.2f} GiB"
    yield from _device_lines(est)
    if r.host_offload_bytes:
        yield f"  {'offloaded to host':<29}{gib(r.host_offload_bytes):>10.2f} GiB"
    yield f"  params: {r.total_params:,} ({r.trainable_params:,} trained)"
    for note in r.notes:
        yield f"  note: {note}"
    yield "compared with"
    where = " per rank" if est.simulated else ""
    yield f"  pytest-vram trace      {r.peak_gib:.2f} GiB peak{where}"
    yield f"      {_WHY_TRACE}"
    ds = est.deepspeed
    if isinstance(ds, str):
        yield f"  DeepSpeed estimator    n/a: {ds}"
    else:
        yield (
            f"  DeepSpeed estimator    {gib(ds.gpu_bytes):.2f} GiB per GPU, "
            f"{gib(ds.cpu_bytes):.2f} GiB per CPU ({ds.options}; {ds.gpus_per_node} GPU/node)"
        )
        yield f"      {_WHY_DEEPSPEED}"
    table = est.llama_factory
    if table is None:
        yield f"  LLaMA-Factory table    n/a: {_NO_TABLE_ROW}"
    else:
        yield f"  LLaMA-Factory table    {table.gb:.4g} GB ({table.where})"
        yield f"      {_WHY_TABLE}"
        yield f"      source: {references.LLAMA_FACTORY_SOURCE}"
    capacity = capacity_line(est)
    if capacity:
        yield capacity


def _device_lines(est: Estimate) -> Iterator[str]:
    """What the GPU would report: the caching allocator simulated over the trace, with what
    the device holds besides (``device_profile``)."""
    counts = est.device_bytes
    if est.device is None or counts is None:
        return
    allocated, reserved, nvml = counts
    yield f"  predicted on {est.device.name}{' per rank' if est.simulated else ''}"
    if allocated is not None and reserved is not None:
        yield f"    {'allocated':<27}{gib(allocated):>10.2f} GiB"
        yield f"    {'reserved':<27}{gib(reserved):>10.2f} GiB"
        conf = est.result.environment.get("PYTORCH_CUDA_ALLOC_CONF", "default settings")
        how = f"the caching allocator over this trace ({conf})"
    else:
        how = "the storage peak (a lower bound: the allocator is not simulated per rank)"
    yield f"    {'nvidia-smi':<27}{gib(nvml):>10.2f} GiB"
    yield f"      {how}, with {est.device.describe(est.spec.ranks).partition(': ')[2]}"


def json_object(est: Estimate) -> dict[str, Any]:
    ds = est.deepspeed
    table = est.llama_factory
    headroom = est.headroom_bytes
    return {
        "result": est.result.to_dict(),
        "zero_simulation": "per-rank" if est.simulated else None,
        "device": _device_object(est),
        "base_params": est.base_params,
        "columns": {
            "pytest_vram": {"peak_bytes": est.result.peak_bytes, "why": _WHY_TRACE},
            "deepspeed": (
                {"unavailable": ds}
                if isinstance(ds, str)
                else {**dataclasses.asdict(ds), "why": _WHY_DEEPSPEED}
            ),
            "llama_factory": (
                {"unavailable": _NO_TABLE_ROW}
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
                "capacity_bytes": est.capacity_bytes,
                "fits": headroom >= 0,
                "headroom_bytes": headroom,
                "message": capacity_line(est),
            }
        ),
    }


def _device_object(est: Estimate) -> dict[str, Any] | None:
    counts = est.device_bytes
    if est.device is None or counts is None:
        return None
    allocated, reserved, nvml = counts
    return {
        **est.device.to_dict(est.spec.ranks),
        "allocated_bytes": allocated,
        "reserved_bytes": reserved,
        "nvml_bytes": nvml,
    }
