"""Training the demo's experts as PEFT LoRA adapters, through PEFT itself, as a user would."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atmoe.demo.batching import collate
from atmoe.demo.progress import progress_bar

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertSpec:
    """LoRA shape and training budget of one expert."""

    r: int = 8
    alpha: int = 16
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    layers: tuple[int, ...] | None = None  # blocks the adapter touches (PEFT layers_to_transform); None = all


def train_lora(
    base, tokenizer, train: list[dict], out_dir: Path, spec: ExpertSpec, *, seed: int = 0, label: str = "expert"
) -> dict:
    """``get_peft_model(LoraConfig(...))`` on a copy of the loaded ``base`` (left untouched, so one load
    serves every expert), a plain AdamW loop on the response tokens of ``train``, then
    ``save_pretrained(safe_serialization=True)`` into ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    placement = {} if spec.layers is None else {"layers_to_transform": list(spec.layers), "layers_pattern": "layers"}
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
        **placement,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    model.train()
    start, losses = time.perf_counter(), []
    with progress_bar(label, spec.steps) as advance:
        for _ in range(spec.steps):
            batch = collate(tokenizer, rng.sample(train, min(spec.batch_size, len(train))))
            batch.pop("prompt_mask")
            loss = model(**batch).loss
            loss.backward()
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            advance(loss=losses[-1])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tail = losses[-10:]
    return {"final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start, "examples": len(train)}
