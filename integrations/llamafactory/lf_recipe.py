"""A LLaMA-Factory recipe, run by LLaMA-Factory itself for two optimizer steps, for
``vram.measure``.

The recipes are LLaMA-Factory's example YAML files as it ships them (``qwen3_lora_sft.yaml``,
``qwen3_lora_sft_ds3.yaml``). Nothing is downloaded: ``local_keys`` replaces the Hub model by a
tiny Qwen3 with random weights, saved with a word-level tokenizer, and the two datasets
(``identity``, ``alpaca_en_demo``) by alpaca-format files of the same names registered in a
``dataset_info.json``, all made by ``make_workdir``; ``short_run_keys`` makes the run ``STEPS``
optimizer steps at CPU sizes. The rest of the recipe (LoRA rank 8 on every linear layer,
batch 1 with 8 steps of gradient accumulation, bf16, the qwen3_nothink template, the ZeRO-3
config of the ``_ds3`` variant) runs as written, through ``llamafactory.train.tuner.run_exp``
with ``VramCallback`` marking each optimizer step.

LLaMA-Factory is imported here, at module level: the worker imports this module when it
unpickles the measured call, before the meter starts, so LLaMA-Factory's import is not the
step's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml
from transformers import TrainerCallback

from pytest_vram.integrations import VramCallback
from pytest_vram.local_data import texts

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast


def _import_run_exp() -> Callable[..., None]:
    """``llamafactory.train.tuner.run_exp``. LLaMA-Factory 0.9.5 imports torchaudio at module
    level (``data/mm_plugin.py``), for audio inputs only. PyPI's torchaudio wheels are CUDA
    builds whose extension does not load beside a CPU torch (``libc10_cuda.so`` missing), so
    the tox env uninstalls them; where torchaudio cannot be imported, an empty module stands in
    for that one import statement and is taken out of ``sys.modules`` again, so that
    transformers and the others still see no torchaudio. A text recipe never reaches it; one
    that does fails on the missing attribute."""
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        broken = [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]
        for name in broken:
            del sys.modules[name]
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        try:
            from llamafactory.train.tuner import run_exp
        finally:
            del sys.modules["torchaudio"]
    else:
        from llamafactory.train.tuner import run_exp
    return run_exp  # type: ignore[no-any-return]


run_exp: Final = _import_run_exp()


HERE: Final = Path(__file__).parent
SFT: Final = HERE / "qwen3_lora_sft.yaml"
SFT_DS3: Final = HERE / "qwen3_lora_sft_ds3.yaml"
DS_CONFIGS: Final = HERE  # where the _ds3 recipe's deepspeed: file is found, by its name

VOCAB: Final = 2048
# Qwen3's chat tokens, which the recipe's template (qwen3_nothink) writes: the last ids.
SPECIAL: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ROWS: Final = 32  # per dataset: an optimizer step takes 8 rows (batch 1, accumulation 8) per rank
WORDS: Final = 24  # per instruction and per output; CUTOFF cuts the pair

# The tiny model the recipe's Qwen3 is replaced by: the Qwen3 architecture, 4 layers.
TINY_QWEN3: Final[dict[str, Any]] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}

CUTOFF: Final = 64
# Two optimizer steps: AdamW makes its state inside the first optimizer.step(), after that
# step's peak, so only from the second step on does a peak hold the state.
STEPS: Final = 2


def local_keys(workdir: Path) -> dict[str, Any]:
    """The recipe's keys that name the Hub: the model and the datasets' folder (``dataset:``
    stays, its names are registered there)."""
    return {"model_name_or_path": str(workdir / "model"), "dataset_dir": str(workdir / "data")}


def short_run_keys() -> dict[str, Any]:
    """What makes the recipe ``STEPS`` optimizer steps on a CPU: a short cutoff, no worker
    processes (two cores), no plot (matplotlib), no progress bar; without a GPU, the CPU."""
    import torch

    return {
        "max_steps": STEPS,
        "cutoff_len": CUTOFF,
        "preprocessing_num_workers": None,
        "dataloader_num_workers": 0,
        "plot_loss": False,
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
    }


def qwen3_word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCAB`` ids whose last ids are Qwen3's chat tokens: the
    words ``w0`` ... of ``pytest_vram.local_data.texts`` map to their own ids (one token each),
    the template's other words (``user``, ``assistant``) to ``w0``, the unknown id.

    Not ``local_data.word_tokenizer``: it registers ``w1`` and ``w2`` as special tokens, which a
    fast tokenizer matches inside words before splitting them, so ``w1722`` there encodes as
    ``w1`` (unknown) plus another unknown, and ``w2013`` as the end-of-text id plus one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = VOCAB - len(SPECIAL)
    vocab = {f"w{i}": i for i in range(words)} | {t: words + i for i, t in enumerate(SPECIAL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL))  # split out of "<|im_start|>user" and the like
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token=SPECIAL[0], eos_token=SPECIAL[2]
    )


def make_model(folder: Path) -> None:
    """A Qwen3 config.json with random weights and ``qwen3_word_tokenizer``, saved as a Hub
    model folder is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = qwen3_word_tokenizer()
    assert len(tokenizer) == VOCAB
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(**TINY_QWEN3)
    torch.manual_seed(0)
    make = AutoModelForCausalLM.from_config
    model = make(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.save_pretrained(folder)


def make_datasets(folder: Path) -> None:
    """The recipe's datasets by name, as alpaca-format files of word texts, registered in the
    ``dataset_info.json`` LLaMA-Factory reads from ``dataset_dir``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for seed, name in enumerate(("identity", "alpaca_en_demo")):
        words = texts(2 * ROWS, WORDS, VOCAB - len(SPECIAL), seed=1000 * seed)
        rows = [
            {"instruction": words[2 * i], "input": "", "output": words[2 * i + 1]}
            for i in range(ROWS)
        ]
        (folder / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
        info[name] = {"file_name": f"{name}.json"}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def recipe(path: str | Path, workdir: Path) -> dict[str, Any]:
    """The YAML recipe at ``path`` with ``local_keys`` and ``short_run_keys`` applied, as
    ``run_exp`` takes it; its ``deepspeed:`` file, if any, is the one of that name beside
    this module."""
    args: dict[str, Any] = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    args.update(local_keys(workdir))
    args.update(short_run_keys())
    if args.get("deepspeed"):
        args["deepspeed"] = str(DS_CONFIGS / Path(args["deepspeed"]).name)
    return args


def make_workdir(workdir: Path) -> Path:
    """The model and the datasets ``local_keys`` points at, made in ``workdir`` before the
    meter starts (making them is not the step); ``workdir``."""
    make_model(workdir / "model")
    make_datasets(workdir / "data")
    return workdir


class _KeepModel(TrainerCallback):
    """Keeps the trained model, which ``run_exp`` does not return."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model = kwargs.get("model")


def sft_step(path: str, workdir: str) -> torch.nn.Module | None:
    """Run the recipe at ``path`` through LLaMA-Factory's ``run_exp``, as ``llamafactory-cli
    train <path>`` runs it, each optimizer step marked for the meter; ``workdir`` holds what
    ``make_workdir`` made, the output and the datasets' cache go to a temporary folder. On
    several ranks (``vram.measure(..., ranks=N)``, the environment torchrun gives) the
    ``_ds3`` recipe runs DeepSpeed's ZeRO-3. Returns the trained model, for its counts."""
    import torch

    args = recipe(path, Path(workdir))
    if args.get("deepspeed") and not torch.cuda.is_available():
        import deepspeed

        # On a GPU, TrainingArguments starts DeepSpeed's communication; with use_cpu it does
        # not, and zero.Init would then see one rank (as in suites/user_stacks.py).
        deepspeed.init_distributed(dist_backend="gloo")
    kept = _KeepModel()
    with tempfile.TemporaryDirectory(prefix="llamafactory-out-") as out:
        args |= {"output_dir": out, "cache_dir": str(Path(out) / "cache")}
        run_exp(args, callbacks=[VramCallback(), kept])
    return kept.model
