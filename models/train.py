"""Train the bundled MoE model (tokenizer + Mixtral-architecture checkpoint) on a text corpus.

Runs on a 2-core CPU in under an hour:

    python models/train.py --corpus DIR --out models/expertmap-moe-tiny

``--corpus`` (required) is a folder of UTF-8 .txt files; the bundled model was trained on a
14.6 MB corpus of public prose, code and math that is not part of the project
(docs/bundled-model.md lists its sources).

What it does, in order:
1. Splits every corpus file into train (first 98%) and held-out validation (last 2%) text.
2. Trains a byte-level BPE tokenizer (the `tokenizers` library) on the train text only.
3. Trains a `MixtralForCausalLM` (real transformers class) with next-token cross entropy plus a
   load-balancing loss computed *per layer* (Switch-Transformer style, averaged over layers).
   transformers' built-in aux loss pools the router logits of all layers before balancing, which
   leaves single layers skewed; balancing each layer is what real MoE training does.
4. Writes the checkpoint (safetensors), the tokenizer, and `training_log.json` (loss curve,
   validation loss, unigram baseline) next to it. `models/card.py` turns that into the model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from expertmap.actors.defaults import BUNDLED_MODEL

logger = logging.getLogger("expertmap.train")

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VAL_FRACTION = 0.02


def split_corpus(corpus_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Return ({file: train text}, {file: held-out text}); the held-out part is each file's tail."""
    train, val = {}, {}
    for path in sorted(corpus_dir.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        cut = int(len(text) * (1 - VAL_FRACTION))
        cut = text.rfind("\n", 0, cut) + 1 or cut  # cut on a line boundary
        train[path.stem], val[path.stem] = text[:cut], text[cut:]
    if not train:
        raise SystemExit(f"no *.txt files in corpus folder {corpus_dir}")
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_files(tokenizer, texts: dict[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for name, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out[name] = np.asarray(ids, dtype=np.int32)
    return out


def unigram_baseline(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int) -> float:
    """Cross entropy (nats/token) of held-out text under add-one-smoothed train unigram counts."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style balance loss J * sum_j f_j * P_j, computed per layer, averaged over layers."""
    losses = []
    for logits in router_logits:  # each [T, J]
        probs = logits.float().softmax(dim=-1)  # [T, J]
        num_experts = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices  # [T, k]
        frac = F.one_hot(top, num_experts).float().sum(dim=1).mean(dim=0) / top_k  # [J]
        losses.append(num_experts * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).pow(2).mean() for lg in router_logits]).mean()


ARCHITECTURES = ("mixtral", "qwen2_moe")


def build_model(vocab_size: int, args):
    """A fresh model of the chosen family: Mixtral (top-k of few large experts) or Qwen2-MoE
    (many small routed experts plus one gated shared expert, as in Qwen1.5-MoE)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.0,  # we balance per layer ourselves (see per_layer_balance_loss)
        output_router_logits=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if args.arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(intermediate_size=args.expert_hidden, num_local_experts=args.experts,
                               rope_theta=10000.0, **common)
        return MixtralForCausalLM(config)
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        intermediate_size=args.shared_expert_hidden,  # the (unused) dense MLP size; no layer is dense
        moe_intermediate_size=args.expert_hidden,
        shared_expert_intermediate_size=args.shared_expert_hidden,
        num_experts=args.experts,
        **common,
    )
    return Qwen2MoeForCausalLM(config)


def sample_batch(stream: np.ndarray, batch: int, seq: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - seq - 1, size=batch)
    return torch.from_numpy(np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def evaluate(model, val: dict[str, np.ndarray], seq: int, max_windows: int) -> dict[str, float]:
    model.eval()
    per_file = {}
    for name, ids in val.items():
        n = min(max_windows, (len(ids) - 1) // seq)
        total, count = 0.0, 0
        for i in range(n):
            x = torch.from_numpy(ids[i * seq : (i + 1) * seq + 1].astype(np.int64))[None]
            logits = model(input_ids=x[:, :-1]).logits
            total += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            count += seq
        per_file[name] = total / max(count, 1)
    model.train()
    return per_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None, help="folder of UTF-8 .txt training files (required)")
    ap.add_argument("--out", type=Path, default=BUNDLED_MODEL,
                    help="folder to write the tokenizer, checkpoint and training log into")
    ap.add_argument("--arch", choices=ARCHITECTURES, default="mixtral",
                    help="model family: mixtral (the bundled expertmap-moe-tiny) or qwen2_moe (expertmap-moe-fine)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--expert-hidden", type=int, default=256, help="each routed expert's intermediate size")
    ap.add_argument("--shared-expert-hidden", type=int, default=128,
                    help="qwen2_moe only: the shared expert's intermediate size")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance-coef", type=float, default=0.02)
    ap.add_argument("--z-coef", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the written checkpoint (training is float32 either way)")
    args = ap.parse_args()
    if args.corpus is None or not args.corpus.is_dir():
        what = "--corpus DIR is required" if args.corpus is None else f"--corpus {str(args.corpus)!r} is not a folder"
        raise SystemExit(f"train.py: error: {what} (the training corpus: a folder of .txt files; the project does not ship it)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    train_text, val_text = split_corpus(args.corpus)
    t0 = time.time()
    tokenizer = train_tokenizer(list(train_text.values()), args.vocab)
    logger.info("tokenizer trained in %.0fs (vocab %d)", time.time() - t0, len(tokenizer))
    train_ids = encode_files(tokenizer, train_text)
    val_ids = encode_files(tokenizer, val_text)
    stream = np.concatenate(list(train_ids.values()))
    val_all = np.concatenate(list(val_ids.values()))
    logger.info("train tokens %d, held-out tokens %d", len(stream), len(val_all))
    unigram = unigram_baseline(stream, val_all, len(tokenizer))

    model = build_model(len(tokenizer), args)
    model.config._experts_implementation = "grouped_mm"
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model parameters: %.2fM", n_params / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 200

    # folders by name only: the log ships with the model and names no machine's paths
    log = {"args": {k: v.name if isinstance(v, Path) else str(v) for k, v in vars(args).items()}, "steps": []}
    budget_s = args.minutes * 60
    start = time.time()
    step = 0
    est_steps = args.max_steps
    bar = tqdm(total=int(budget_s), unit="s", desc="training")
    model.train()
    while step < args.max_steps and time.time() - start < budget_s:
        elapsed = time.time() - start
        # cosine schedule over the *time* budget, linear warm-up over steps
        frac = min(1.0, elapsed / budget_s)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(stream, args.batch, args.seq, rng)
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
        bal = per_layer_balance_loss(out.router_logits, args.top_k)
        z = router_z_loss(out.router_logits)
        loss = ce + args.balance_coef * bal + args.z_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            log["steps"].append(
                {"step": step, "t": round(time.time() - start, 1), "ce": ce.item(), "balance": bal.item(), "lr": lr}
            )
            bar.set_postfix(step=step, ce=f"{ce.item():.3f}", bal=f"{bal.item():.3f}")
        bar.n = int(min(budget_s, time.time() - start))
        bar.refresh()
    bar.close()
    del est_steps
    logger.info("trained %d steps in %.0fs", step, time.time() - start)

    val_loss = evaluate(model, val_ids, args.seq, max_windows=40)
    tokens_seen = step * args.batch * args.seq
    log.update(
        {
            "train_steps": step,
            "train_tokens_seen": tokens_seen,
            "train_tokens_available": int(len(stream)),
            "train_seconds": round(time.time() - start, 1),
            "val_loss_per_file": val_loss,
            "val_loss_mean": float(np.mean(list(val_loss.values()))),
            "unigram_val_loss": unigram,
            "parameters": n_params,
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.config._experts_implementation = None
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    logger.info("saved to %s; held-out loss %.3f vs unigram %.3f", args.out, log["val_loss_mean"], unigram)


if __name__ == "__main__":
    main()
