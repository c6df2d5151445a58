"""Models of the user's own: a ``config.json``, a folder holding one, or a Hub id.

A spec names such a model by a key ``<name>@<hash>``: ``name`` is the folder, file or
repository the config came from, ``hash`` the first 8 hex digits of the SHA-256 of the
config's canonical JSON. The label stays readable and stable across machines (no temporary
path), and two different configs never share a baseline entry. The spec carries the config
itself (``StepSpec.model_config``), so the worker child, a ZeRO rank and a baseline file can
rebuild the shape without the file. Weights are random; nothing but a Hub id's
``config.json`` is ever fetched, and only when the Hub is online.

Torch-free: the pytest process reads the JSON at collection; transformers checks the fields
where the model is built (``zoo.build_config``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Final

from pytest_vram import zoo
from pytest_vram.errors import SpecError

__all__ = [
    "KEY",
    "canonical",
    "checked",
    "is_key",
    "locate",
    "read",
    "register",
    "shape",
    "zoo_names",
]

# Written by every save, and say nothing about memory: kept out of the hash.
_IGNORED: Final = ("_name_or_path", "transformers_version")
KEY: Final = re.compile(r"^(?P<name>[A-Za-z0-9._+-]+)@(?P<hash>[0-9a-f]{8})$")
_HUB_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def zoo_names() -> list[str]:
    """The zoo's own models, without the configs this process has entered since."""
    return sorted(name for name in zoo.MODELS if not is_key(name))


def is_key(value: object) -> bool:
    return isinstance(value, str) and KEY.match(value) is not None


def canonical(data: dict[str, Any]) -> str:
    """The config as the hash and the spec see it: sorted keys, no whitespace."""
    kept = {k: v for k, v in data.items() if k not in _IGNORED}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "model"


def _hub_config(value: str) -> Path:
    """The ``config.json`` of a Hub repository: from the local cache, or fetched when the Hub
    is online (``HF_HUB_OFFLINE=1``, which pytest-vram's cases run with, allows the cache only)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(value, "config.json"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(
            f"model {value!r}: not a file or folder here, and no config.json for it as a Hub id "
            f"({first})"
        ) from None


def locate(value: str) -> tuple[str, Path]:
    """(name for the key, the config.json to read)."""
    path = Path(value).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise SpecError(f"model {value!r}: the folder holds no config.json")
        return path.resolve().name, config
    if path.is_file():
        named = path.resolve().parent.name if path.name == "config.json" else path.stem
        return named, path
    if _HUB_ID.match(value):
        return value.rsplit("/", 1)[1], _hub_config(value)
    known = ", ".join(zoo_names())
    raise SpecError(
        f"unknown model {value!r}; known: {known}; or a config.json, a folder holding one, or "
        "a Hub id (owner/name)"
    )


def checked(value: str, data: object) -> dict[str, Any]:
    """A config.json's content as the user's file gives it: an object with a string
    ``model_type`` and no remote code; a ``SpecError`` names ``value`` otherwise."""
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise SpecError(f"model {value!r}: a config.json needs a string 'model_type'")
    if "auto_map" in data:
        # transformers would import the repository's own modeling code (trust_remote_code);
        # without it, the model_type's class of transformers is built, silently
        auto_map = data["auto_map"]
        named = ", ".join(map(str, auto_map)) if isinstance(auto_map, dict) else repr(auto_map)
        raise SpecError(
            f"model {value!r}: its config.json asks for remote code (auto_map: {named}), which "
            f"pytest-vram never runs: remove auto_map to measure the stock "
            f"{data['model_type']!r} architecture of transformers"
        )
    return data


def read(value: str) -> tuple[str, str]:
    """(key, canonical config) of the model ``value`` refers to; a ``SpecError`` names it."""
    name, path = locate(value)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"model {value!r}: not a readable config.json: {exc}") from None
    text = canonical(checked(value, data))
    return f"{_name(name)}@{_digest(text)}", text


def shape(key: str, text: str) -> zoo.ModelShape:
    data = json.loads(text)
    model_type = data.pop("model_type")
    # The image-text models are the ones with a vision tower; transformers decides the class
    # (and refuses a model_type it has no model for) where the model is built.
    kind: zoo.ModelKind = "vision-language" if "vision_config" in data else "causal-lm"
    return zoo.ModelShape(model_type, data, notes=f"from a config ({key})", kind=kind)


def register(key: str, text: str) -> None:
    """Enter the config's shape in ``zoo.MODELS`` under ``key`` (once per process)."""
    match = KEY.match(key)
    if match is None:
        raise SpecError(f"model={key!r} with a model_config must be a key <name>@<8 hex digits>")
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:  # TypeError: not even text
        raise SpecError(f"model_config of {key!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise SpecError(f"model_config of {key!r} needs a string 'model_type'")
    text = canonical(data)
    if _digest(text) != match["hash"]:
        raise SpecError(
            f"model_config does not match model={key!r} (its hash is {_digest(text)}): "
            "a hand-edited baseline? refresh it"
        )
    if key not in zoo.MODELS:
        zoo.enter(key, shape(key, text))
