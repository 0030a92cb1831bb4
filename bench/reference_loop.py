"""The reference: a plain PyTorch training loop the product's trainer is measured against,
and the greedy decoding that scores every model the same way.

About forty lines that anyone can check: AdamW, a one-cycle schedule, loss on the
answer only (the prompt and padding are masked), a fixed number of epochs.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any


def encode(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], int]:
    """Token ids of a conversation and where the answer starts (the final assistant turn)."""
    prompt = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=False
    )
    answer = messages[-1]["content"] + tokenizer.eos_token
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"], len(prompt_ids)


def train(model_dir: Path, train_file: Path, out_dir: Path, epochs: int, lr: float = 1e-3,
          batch_size: int = 32, seed: int = 0) -> Path:  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [json.loads(line) for line in train_file.read_text().splitlines() if line.strip()]
    examples = [encode(tokenizer, row["messages"]) for row in rows]
    steps = epochs * math.ceil(len(examples) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    order = random.Random(seed)
    model.train()
    for _ in range(epochs):
        order.shuffle(examples)
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for row, (tokens, answer_at) in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                labels[row, answer_at : len(tokens)] = torch.tensor(tokens[answer_at:])
            loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                         labels=labels).loss  # fmt: skip
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def answers(model_dir: Path, prompts: list[list[dict[str, Any]]], max_new_tokens: int = 64,
            batch_size: int = 50) -> list[str]:  # fmt: skip
    """Greedy answers to each prompt (its messages without the answer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            for m in prompts[start : start + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = generated[:, batch["input_ids"].shape[1] :]
        out += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out
