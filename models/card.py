"""Measure the bundled model and write its model card (README.md, PNG figures, card.json).

    python models/card.py --workload FILE [--model models/expertmap-moe-tiny] [--per-category 60]

Figures: the loss curve (from training_log.json), held-out loss against a unigram baseline,
per-layer expert-usage entropy, per-category expert-usage histograms over a prompt workload
(``--workload``, required: a JSONL file of {id, category, turns}; the card was made with the
`dev_mix` workload), and how far apart the categories' usage is
(Jensen-Shannon divergence) next to the same architecture at random initialisation and next to
the noise floor (two disjoint halves of the same category).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from expertmap.actors.defaults import BUNDLED_MODEL

logger = logging.getLogger("expertmap.card")

MAX_PROMPT_TOKENS = 256


def load_prompts(path: Path, per_category: int) -> dict[str, list[str]]:
    by_cat: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if len(by_cat[rec["category"]]) < per_category:
            by_cat[rec["category"]].append(rec["turns"][0])
    return dict(sorted(by_cat.items()))


@torch.no_grad()
def usage_counts(model, tokenizer, prompts: list[str], top_k: int) -> np.ndarray:
    """[P, L, J] top-k selection counts of each prompt's prefill."""
    out = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :MAX_PROMPT_TOKENS]
        logits = model(input_ids=ids, output_router_logits=True).router_logits  # L x [T, J]
        counts = []
        for lg in logits:
            top = lg.float().topk(top_k, dim=-1).indices  # [T, k]
            counts.append(torch.bincount(top.flatten(), minlength=lg.shape[-1]).numpy())
        out.append(np.stack(counts))
    return np.stack(out).astype(np.float64)


def normalise(counts: np.ndarray) -> np.ndarray:
    return counts / counts.sum(axis=-1, keepdims=True)


def entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1)
    return -(p * np.log2(p)).sum(axis=-1)


def jsd_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = (p + q) / 2
    return entropy_bits(m) - (entropy_bits(p) + entropy_bits(q)) / 2


def category_analysis(counts_by_cat: dict[str, np.ndarray]) -> dict:
    cats = list(counts_by_cat)
    usage = {c: normalise(v.sum(axis=0)) for c, v in counts_by_cat.items()}  # [L, J]
    n = len(cats)
    jsd = np.zeros((n, n))
    for i, a in enumerate(cats):
        for j, b in enumerate(cats):
            jsd[i, j] = jsd_bits(usage[a], usage[b]).mean()  # mean over layers
    # noise floor: two disjoint halves (odd/even prompts) of the same category
    halves = [
        jsd_bits(normalise(v[0::2].sum(axis=0)), normalise(v[1::2].sum(axis=0))).mean()
        for v in counts_by_cat.values()
        if len(v) >= 4
    ]
    off = jsd[~np.eye(n, dtype=bool)]
    total = normalise(sum(v.sum(axis=0) for v in counts_by_cat.values()))  # [L, J]
    return {
        "categories": cats,
        "usage": {c: u.tolist() for c, u in usage.items()},
        "jsd_matrix_bits": jsd.tolist(),
        "jsd_between_categories_mean_bits": float(off.mean()),
        "jsd_between_categories_min_bits": float(off.min()),
        "jsd_between_categories_max_bits": float(off.max()),
        "jsd_within_category_halves_mean_bits": float(np.mean(halves)),
        "per_layer_entropy_bits": entropy_bits(total).tolist(),
        "per_layer_max_expert_share": total.max(axis=-1).tolist(),
    }


def verdict(trained: dict) -> str:
    ratio = trained["jsd_between_categories_mean_bits"] / trained["jsd_within_category_halves_mean_bits"]
    if ratio >= 2:
        return "The trained model's routing depends on the input category well beyond sampling noise."
    return "The trained model's category differences are NOT clearly above sampling noise at this sample size."


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in log["steps"]]
    ce = [s["ce"] for s in log["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, ce, lw=0.8, label="training cross entropy (batch)")
    ax.axhline(log["val_loss_mean"], color="C2", ls="--", label=f"held-out loss {log['val_loss_mean']:.2f}")
    ax.axhline(log["unigram_val_loss"], color="C3", ls=":", label=f"unigram baseline {log['unigram_val_loss']:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_ylim(0, max(ce[0] if ce else 10, log["unigram_val_loss"]) + 0.5)
    ax.legend()
    ax.set_title(f"{path.parent.name}: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_usage(trained: dict, random: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = trained["categories"]
    cols = 3
    rows = math.ceil(len(cats) / cols) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.0 * rows))
    for ax, c in zip(axes.flat, cats):
        u = np.array(trained["usage"][c])  # [L, J]
        im = ax.imshow(u, aspect="auto", cmap="viridis", vmin=0, vmax=max(3.2 / u.shape[1], u.max()))
        ax.set_title(f"{c}: expert usage (trained)")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    for ax in list(axes.flat)[len(cats) : -2]:
        ax.axis("off")
    for ax, (name, res) in zip(list(axes.flat)[-2:], (("trained", trained), ("random init", random))):
        im = ax.imshow(np.array(res["jsd_matrix_bits"]), cmap="magma", vmin=0, vmax=max(0.05, np.max(trained["jsd_matrix_bits"])))
        ax.set_xticks(range(len(cats)), cats, rotation=60, fontsize=7)
        ax.set_yticks(range(len(cats)), cats, fontsize=7)
        ax.set_title(f"JSD between categories ({name}), bits")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CARD = """# {name}

{intro} It is a real `{cls}` (transformers' own class), trained here from
scratch on a 14.6 MB corpus of public prose, code and math (docs/bundled-model.md in the ExpertMap
repository lists its sources), with a byte-level BPE tokenizer trained on the same text.

| | |
| --- | --- |
| architecture | {family}: {layers} decoder layers, hidden {hidden}, {heads} heads ({kv} KV heads), {experts} routed experts per layer of FFN size {ffn}{shared}, top-{top_k}, tied embeddings |
| parameters | {params:.2f} M ({expert_params:.2f} M in routed experts); {size_mb:.1f} MB safetensors, {dtype} |
| tokenizer | byte-level BPE, {vocab} tokens, trained on the training split only; chat template `<|role|>` ... `<|eos|>` |
| training | {steps} steps x {batch} x {seq} tokens = {seen:.1f} M tokens ({epochs:.1f} passes over {avail:.1f} M), {minutes:.0f} min on 2 CPU cores |
| load balancing | per-layer Switch-style balance loss (coefficient {bal}), averaged over layers, + router z-loss |

Reproduce: `python models/train.py --corpus CORPUS {train_flags} --out models/{name}`
then `python models/card.py --workload dev_mix.jsonl --model models/{name}` (this card
and its figures), or `make train-model MODEL={name} CORPUS=... WORKLOAD=...`.

## Loss

![loss curve](loss_curve.png)

Held-out text (the last 2% of every corpus file, never trained on): **{val:.3f} nats/token**
against **{unigram:.3f}** for a unigram model of the training text (add-one smoothed), i.e.
{gain:.0%} lower. Per file:

| file | held-out loss |
| --- | ---: |
{per_file}

It is a tiny model: its text is fluent-looking locally and wrong globally. It exists to route
like a real MoE, not to answer questions.

## Routing

Measured over the first prompt of up to {per_cat} prompts per category of
`{workload}` (prefill, up to {max_tokens} tokens each, top-{top_k}
selections counted).

Per-layer expert-usage entropy (max {max_entropy:.0f} bits = perfectly even) and the largest
share one expert takes in a layer:

| layer | {layer_header} |
| --- | {layer_rule} |
| entropy, trained (bits) | {ent_trained} |
| entropy, random init (bits) | {ent_random} |
| top expert share, trained | {share_trained} |

Lowest layer entropy: {min_entropy_share:.2f} of the maximum; experts never selected in any
category: {dead}.

How far apart the categories' expert usage is (Jensen-Shannon divergence of the per-layer usage
distributions, averaged over layers, in bits):

| | trained | random init |
| --- | ---: | ---: |
| between categories, mean | {jsd_mean:.4f} | {jsd_mean_r:.4f} |
| between categories, min / max | {jsd_min:.4f} / {jsd_max:.4f} | {jsd_min_r:.4f} / {jsd_max_r:.4f} |
| noise floor: two halves of one category | {jsd_half:.4f} | {jsd_half_r:.4f} |

Between-category divergence over the noise floor: **{ratio_floor:.1f}x** for the trained model,
{ratio_floor_r:.1f}x at random initialisation (where routing follows token identity, so categories
with different vocabularies differ too). {verdict}

![per-category expert usage](category_usage.png)
"""


FAMILY = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}
INTRO = {
    "mixtral": "The small Mixture-of-Experts language model that ships with ExpertMap, so that everything "
    "runs\noffline on a CPU: few large experts, top-2, like Mixtral.",
    "qwen2_moe": "The fine-grained Mixture-of-Experts model that ships with ExpertMap beside expertmap-moe-tiny:\n"
    "many small routed experts, top-4, and a gated shared expert, the shape of Qwen1.5-MoE.",
}
#: train.py flags the card does not repeat (paths, or the same for every bundled model).
_NOT_REPEATED = {"corpus", "out", "max_steps", "seed"}


def train_flags(args: dict) -> str:
    """train.py's flags as the training log recorded them, for the card's reproduce line."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k not in _NOT_REPEATED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL,
                    help="the model folder to measure and write the card into (default: the bundled model)")
    ap.add_argument("--workload", type=Path, default=None,
                    help="JSONL prompt workload of {id, category, turns} (required; not part of the project)")
    ap.add_argument("--per-category", type=int, default=60, help="prompts per category (default 60)")
    args = ap.parse_args()
    if args.workload is None or not args.workload.is_file():
        what = "--workload FILE is required" if args.workload is None else f"--workload {str(args.workload)!r} is not a file"
        raise SystemExit(f"card.py: error: {what} (a JSONL prompt workload, e.g. dev_mix.jsonl; the project does not ship it)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, experts_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cfg = model.config
    random_model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()
    prompts = load_prompts(args.workload, args.per_category)
    trained_counts, random_counts = {}, {}
    for cat, texts in tqdm(prompts.items(), desc="categories"):
        trained_counts[cat] = usage_counts(model, tokenizer, texts, cfg.num_experts_per_tok)
        random_counts[cat] = usage_counts(random_model, tokenizer, texts, cfg.num_experts_per_tok)
    trained = category_analysis(trained_counts)
    random = category_analysis(random_counts)
    log = json.loads((args.model / "training_log.json").read_text())
    plot_loss(log, args.model / "loss_curve.png")
    plot_usage(trained, random, args.model / "category_usage.png")
    (args.model / "card.json").write_text(json.dumps({"trained": trained, "random_init": random}, indent=1))

    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    ffn = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    shared = getattr(cfg, "shared_expert_intermediate_size", None)
    usage_all = sum(c.sum(axis=0) for c in trained_counts.values())  # [L, J] selections over every category
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    L = cfg.num_hidden_layers
    fmt = lambda xs, f: " | ".join(f.format(x) for x in xs)  # noqa: E731
    tr = log["args"]
    card = CARD.format(
        name=args.model.name, intro=INTRO.get(cfg.model_type, ""), cls=type(model).__name__,
        family=FAMILY.get(cfg.model_type, cfg.model_type), dtype=str(cfg.dtype).removeprefix("torch."),
        shared=f" plus one gated shared expert of FFN size {shared}" if shared else "",
        train_flags=train_flags(tr), min_entropy_share=min(trained["per_layer_entropy_bits"]) / math.log2(num_experts),
        dead=int((usage_all == 0).sum()),
        layers=L, hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv=cfg.num_key_value_heads,
        experts=num_experts, ffn=ffn, top_k=cfg.num_experts_per_tok,
        params=n_params / 1e6, expert_params=expert_params / 1e6,
        size_mb=(args.model / "model.safetensors").stat().st_size / 1e6, vocab=len(tokenizer),
        steps=log["train_steps"], batch=tr["batch"], seq=tr["seq"], seen=log["train_tokens_seen"] / 1e6,
        epochs=log["train_tokens_seen"] / log["train_tokens_available"], avail=log["train_tokens_available"] / 1e6,
        minutes=log["train_seconds"] / 60, bal=tr["balance_coef"],
        val=log["val_loss_mean"], unigram=log["unigram_val_loss"], gain=1 - log["val_loss_mean"] / log["unigram_val_loss"],
        per_file="\n".join(f"| {k} | {v:.3f} |" for k, v in log["val_loss_per_file"].items()),
        per_cat=args.per_category, max_tokens=MAX_PROMPT_TOKENS, max_entropy=math.log2(num_experts),
        layer_header=" | ".join(str(i) for i in range(L)), layer_rule=" | ".join("---:" for _ in range(L)),
        ent_trained=fmt(trained["per_layer_entropy_bits"], "{:.2f}"),
        ent_random=fmt(random["per_layer_entropy_bits"], "{:.2f}"),
        share_trained=fmt(trained["per_layer_max_expert_share"], "{:.0%}"),
        jsd_mean=trained["jsd_between_categories_mean_bits"], jsd_mean_r=random["jsd_between_categories_mean_bits"],
        jsd_min=trained["jsd_between_categories_min_bits"], jsd_max=trained["jsd_between_categories_max_bits"],
        jsd_min_r=random["jsd_between_categories_min_bits"], jsd_max_r=random["jsd_between_categories_max_bits"],
        jsd_half=trained["jsd_within_category_halves_mean_bits"],
        jsd_half_r=random["jsd_within_category_halves_mean_bits"],
        ratio_floor=trained["jsd_between_categories_mean_bits"] / trained["jsd_within_category_halves_mean_bits"],
        ratio_floor_r=random["jsd_between_categories_mean_bits"] / random["jsd_within_category_halves_mean_bits"],
        verdict=verdict(trained), workload=args.workload.name,
    )  # fmt: skip
    (args.model / "README.md").write_text(card)
    logger.info("wrote %s", args.model / "README.md")


if __name__ == "__main__":
    main()
