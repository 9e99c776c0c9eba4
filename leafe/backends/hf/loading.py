"""What the hf backend checks and resolves before a model loads: the model's path (a directory or a
GGUF file), files that cannot load (one line naming the file, before transformers reads them), and
the device a `--device` value names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leafe.backends.base import BackendError
from leafe.errors import CorruptFile
from leafe.files import read_json


def resolve_model_path(path: str, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(directory, gguf file name or None); a path to a .gguf file is split into both."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, check_gguf(p).name
    if not p.exists():
        raise BackendError(f"model path {path} does not exist; pass a Hugging Face model directory or a .gguf file")
    if not p.is_dir():
        raise BackendError(f"model path {path} is a file, not a model directory or a .gguf file")
    if gguf_file is None and not (p / "config.json").exists():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, check_gguf(p / ggufs[0]).name
        raise BackendError(
            f"{path} has no config.json; pass a Hugging Face model directory (or a .gguf file with --gguf-file)"
        )
    if gguf_file is None:
        check_model_dir(p)
    elif (p / gguf_file).is_file():
        check_gguf(p / gguf_file)
    return p, gguf_file


def check_gguf(path: Path) -> Path:
    """`path` when it starts as every GGUF file does, else one line naming it."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CorruptFile(f"{path} is not a GGUF file (it does not start with 'GGUF'); is it the right file?")
    return path


#: The JSON files of a model directory that transformers reads, each one object.
MODEL_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "chat_template.json", "vocab.json",
              "model.safetensors.index.json")


def check_model_dir(directory: Path) -> None:
    """One line naming the file, before anything loads, for a model directory that cannot load: a JSON
    file of it that is not text or not a JSON object, or a safetensors file cut short (a copy or a
    download that stopped). Reads the JSON files and the safetensors headers, not the weights."""
    for name in MODEL_JSON:
        if (directory / name).is_file():
            read_json(directory / name)
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, and
    the data: the file must be as long as its header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise CorruptFile(f"{path} is not a safetensors file or is truncated ({size} bytes); copy it again")
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise CorruptFile(f"{path} is not a safetensors file (its header is not one); copy it again") from None
    if 8 + length + end > size:
        raise CorruptFile(f"{path} is truncated: {size} bytes of the {8 + length + end} its header gives; copy it again")


def pick_device(device: str) -> torch.device:
    """The device a `--device` value names (auto: the GPU when there is one); CUDA asked without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    return torch.device(device)
