"""Random-weight checkpoints with the shapes of real MoE models (a few layers), saved with
transformers' own ``save_pretrained`` (safetensors), for benchmarks of memory and real copies."""

from __future__ import annotations

from pathlib import Path

#: name -> (family, config fields). Expert sizes are the real models' (from their config.json).
SHAPES: dict[str, tuple[str, dict]] = {
    # Mixtral-8x7B: hidden 4096, expert FFN 14336 (one expert 352 MB in bf16), 8 experts, top-2
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                     num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8)),
    # Qwen3-30B-A3B: hidden 2048, expert FFN 768 (one expert 9.4 MB in bf16), 128 experts, top-8
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                                        num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128)),
    # 297 MiB in 12 layers: the shard-memory benchmark's default (bench/results/shard_memory)
    "medium": ("mixtral", dict(hidden_size=256, intermediate_size=1024, num_local_experts=16,
                               num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4)),
    # small enough for a CPU test of the same code path
    "tiny": ("mixtral", dict(hidden_size=64, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                             num_attention_heads=4, num_key_value_heads=2)),
}  # fmt: skip


def make_random_checkpoint(folder: Path, shape: str, layers: int, vocab: int = 4096, seed: int = 0) -> int:
    """Save a random bf16 model of ``shape`` with ``layers`` decoder layers; returns its bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    family, fields = SHAPES[shape]
    cfg = AutoConfig.for_model(family, vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=1024,
                               tie_word_embeddings=False, **fields)  # fmt: skip
    torch.manual_seed(seed)  # a benchmark's own model: seeding is the script's business
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None  # fixed-length runs
    model.save_pretrained(folder)
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
