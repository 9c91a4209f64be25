"""Model folders: what ExpertMap agrees to load, and loading the plain (un-offloaded) model.

ExpertMap loads only transformers' built-in architectures from safetensors: a folder that asks to
run its own code, holds only pickled weights or is quantized is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from expertmap.actors.adapters import adapter_for
from expertmap.actors.offloaded_experts import register_experts_implementation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelFolderError(ValueError):
    pass


def check_model_folder(folder: Path) -> dict:
    """Refuse folders that would run code: remote code or pickled weights."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map"):
        raise ModelFolderError(
            f"model folder {folder} asks to run its own code (auto_map in config.json); ExpertMap loads "
            "only transformers' built-in architectures and never runs code from a model folder"
        )
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = f" (found pickled weights {', '.join(pickles)})" if pickles else ""
        raise ModelFolderError(f"model folder {folder} has no safetensors weights{why}; ExpertMap loads only safetensors")
    return config


def load_plain_model(folder: Path, dtype: str = "auto", experts_implementation: str = "eager") -> nn.Module:
    """The un-offloaded reference model (used by tests and the lossless check)."""
    from transformers import AutoModelForCausalLM

    check_model_folder(Path(folder))
    kwargs = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
    model = AutoModelForCausalLM.from_pretrained(
        folder, experts_implementation=experts_implementation, use_safetensors=True, trust_remote_code=False, **kwargs
    )
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (runtimes then take token ids)."""
    from transformers import AutoTokenizer

    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(folder)


def open_model_folder(folder: Path):
    """(Hugging Face config, adapter) of a model folder that ExpertMap can serve, or a clear error."""
    from transformers import AutoConfig

    check_model_folder(folder)
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    adapter = adapter_for(hf_config)  # clear error for unsupported architectures
    if getattr(hf_config, "quantization_config", None):
        raise ModelFolderError(f"model folder {folder} is quantized; ExpertMap reads unquantized checkpoints only")
    register_experts_implementation()
    return hf_config, adapter
