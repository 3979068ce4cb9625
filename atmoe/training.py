"""Router training: every expert and base weight frozen, only the routers (and a learned lambda) learn.

The loop runs on ``accelerate`` (device placement, mixed precision, ``accelerate launch`` for several
GPUs) and shows a rich progress bar with the loss and tokens/s on stderr. The language-model loss is
taken on response tokens only. When examples name their ``intents``, an auxiliary routing loss (see
``routing_loss``) teaches each block's inside-group weights to pick the intended expert of each group;
the split between groups is left to the language-model loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from atmoe.config import TrainConfig
from atmoe.data import Encoded, Example, check_intents, collate, encode_example
from atmoe.errors import UsageError
from atmoe.freeze import freeze_all_but_routers
from atmoe.routing import group_totals


def lr_factor(schedule: str, warmup_ratio: float, total_steps: int):
    """The learning-rate multiplier of optimizer step ``step`` (0-based) as a function: a linear warm-up
    from 0 over ``warmup_ratio`` of the steps, then ``schedule`` (cosine or linear decay to 0, or constant).
    A decayed rate makes the router the run ends on a settled one, not wherever the last noisy step left it."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainResult:
    """What a run produced: final metrics, per-epoch history, and the router weights (CPU tensors)."""

    metrics: dict
    history: list[dict]
    router_state: dict[str, torch.Tensor]


def routing_loss(model, intent_mask: torch.Tensor) -> torch.Tensor:
    """Inside-group cross-entropy of the intended experts, averaged over blocks; 0 without intents.

    For each intended expert e: -log(w_e / sum over e' in g(e) of w_e'), i.e. -log b[g(e), m(e)] for
    the grouped router (the same ratio for the flat one). Intents say which expert of a group is
    right, not how a block should split its weight between groups: that is the language-model
    loss's to decide, block by block. intent_mask: [B, E], 1 on the intended experts. Token routing
    averages the weights over tokens first.
    """
    has_intent = intent_mask.sum(-1) > 0  # [B]
    if not bool(has_intent.any()):
        return intent_mask.new_zeros(())
    intended = intent_mask[has_intent]  # [B', E]
    groups = model.expert_group_index.to(intended.device)  # [E]
    losses = []
    for _, expert_weights in model.last_routing_tensors():
        if expert_weights.dim() == 3:  # token routing: [B, T, E] -> [B, E]
            expert_weights = expert_weights.mean(1)
        weights = expert_weights[has_intent].float()  # [B', E]
        totals = group_totals(weights, groups, model.n_groups)  # [B', N_G]
        inside = weights / totals[:, groups].clamp_min(1e-12)  # [B', E]  b[g(e), m(e)]
        log_inside = torch.log(inside.clamp_min(1e-9))  # [B', E]
        losses.append((-(intended * log_inside).sum(-1) / intended.sum(-1)).mean())
    return torch.stack(losses).mean()


def _encode_all(tokenizer, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    return [encode_example(tokenizer, example, max_length=max_length) for example in examples]


def _routing_hits(model, intent_mask: torch.Tensor) -> tuple[int, int]:
    """Examples whose top expert, in every intended group (weights averaged over blocks), is intended."""
    tensors = model.last_routing_tensors()
    mean_weights = torch.stack([w.mean(1) if w.dim() == 3 else w for _, w in tensors]).mean(0)  # [B, E]
    groups = [model.expert_groups[name] for name in model.expert_names]
    hits = total = 0
    for row in range(intent_mask.shape[0]):
        intended = {i for i in range(intent_mask.shape[1]) if intent_mask[row, i] > 0}
        if not intended:
            continue
        total += 1
        ok = True
        for expert in intended:
            members = [i for i, g in enumerate(groups) if g == groups[expert]]
            top = max(members, key=lambda i: float(mean_weights[row, i]))
            ok &= top == expert
        hits += int(ok)
    return hits, total


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    device: torch.device | str | None = None,
) -> dict:
    """Token-weighted response loss and routing accuracy (when intents exist) of ``model`` on ``examples``."""
    check_intents(examples, model.expert_names)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    expert_index = {name: i for i, name in enumerate(model.expert_names)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = _encode_all(tokenizer, examples, max_length)
    was_training = model.training
    model.eval()
    total_loss = total_tokens = hits = with_intents = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_token_id=pad, expert_index=expert_index)
        batch = {k: v.to(device) for k, v in batch.items()}
        intent_mask = batch.pop("intent_mask")
        out = model(**batch, routing_mask=_prompt_mask(batch))
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(out.loss) * tokens
        total_tokens += tokens
        h, t = _routing_hits(model, intent_mask)
        hits += h
        with_intents += t
    model.train(was_training)
    metrics = {"loss": total_loss / max(total_tokens, 1), "tokens": int(total_tokens)}
    if with_intents:
        metrics["routing_accuracy"] = hits / with_intents
    return metrics


def _prompt_mask(batch: dict) -> torch.Tensor:
    """[B, T] mask of prompt tokens: routing pools over the prompt, as it does at inference."""
    return (batch["attention_mask"].bool() & (batch["labels"] == -100)).long()


def train_router(
    model,
    tokenizer,
    train: Sequence[Example],
    eval: Sequence[Example] | None = None,
    config: TrainConfig | None = None,
    *,
    calibrate: bool = True,
    progress: bool = True,
    console=None,
) -> TrainResult:
    """Train ``model``'s routers in place on ``train``; evaluate on ``eval`` before and after.

    ``model`` is an ``AtMoEModel`` over a causal language model. With ``calibrate`` (a fresh router;
    off when warm-starting from a trained one) a first pass over the training prompts sets each
    block's router-input standardisation. Deterministic for a given seed on a given device. Returns
    the metrics and the router weights to store.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = config or TrainConfig()
    check_intents(train, model.expert_names)
    if eval:
        check_intents(eval, model.expert_names)
    set_seed(config.seed)
    accelerator = Accelerator(
        cpu=config.device == "cpu",
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
    )
    if config.device not in (None, "cpu"):
        model.to(config.device)
    freeze_all_but_routers(model)
    params = model.router_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    expert_index = {name: i for i, name in enumerate(model.expert_names)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = _encode_all(tokenizer, train, config.max_length)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        encoded,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=lambda items: collate(items, pad_token_id=pad, expert_index=expert_index),
    )
    optimizer_steps = config.epochs * math.ceil(len(loader) / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.schedule, config.warmup_ratio, optimizer_steps)
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    inner = accelerator.unwrap_model(model)
    device = accelerator.device
    use_routing_loss = config.routing_loss_weight > 0 and any(e.intents for e in train)

    if calibrate:
        _calibrate(model, inner, loader, accelerator, progress=progress, console=console)
    init_examples = None
    if config.init == "prompts":
        if not calibrate:
            raise UsageError(
                "--init prompts starts the routers afresh: name the composition, not a router to warm-start"
            )
        from atmoe.prompt_init import init_from_prompts

        init_examples = init_from_prompts(inner, loader)
    eval_before = (
        evaluate(inner, tokenizer, eval, batch_size=config.batch_size, max_length=config.max_length, device=device)
        if eval
        else None
    )
    history: list[dict] = []
    total_steps = config.epochs * len(loader)
    started = time.perf_counter()
    tokens_seen = 0
    with _progress(progress, console) as bar:
        task = bar.add_task("router", total=total_steps, stats="") if bar else None
        for epoch in range(config.epochs):
            model.train()
            epoch_loss = epoch_lm = 0.0
            epoch_batches = 0
            for batch in loader:
                with accelerator.accumulate(model):
                    intent_mask = batch.pop("intent_mask")
                    out = model(**batch, routing_mask=_prompt_mask(batch))
                    loss = out.loss
                    lm_loss = float(loss.detach())
                    if use_routing_loss:
                        loss = loss + config.routing_loss_weight * routing_loss(inner, intent_mask)
                    accelerator.backward(loss)
                    if config.max_grad_norm and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                tokens_seen += int(batch["attention_mask"].sum())
                epoch_loss += float(loss.detach())
                epoch_lm += lm_loss
                epoch_batches += 1
                if bar:
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.update(
                        task,
                        advance=1,
                        stats=f"loss {lm_loss:.4f} {tokens_seen / elapsed:.0f} tok/s",
                        description=f"router epoch {epoch + 1}/{config.epochs}",
                    )
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": epoch_loss / max(epoch_batches, 1),
                    "train_lm_loss": epoch_lm / max(epoch_batches, 1),
                }
            )
    elapsed = time.perf_counter() - started
    inner.eval()
    metrics: dict = {
        "train_loss": history[-1]["train_lm_loss"],
        "steps": total_steps,
        "train_tokens": tokens_seen,
        "tokens_per_second": tokens_seen / max(elapsed, 1e-9),
        "seconds": elapsed,
    }
    if init_examples is not None:
        metrics["init_examples"] = init_examples  # example prompts per expert behind its starting column
    if eval:
        after = evaluate(
            inner, tokenizer, eval, batch_size=config.batch_size, max_length=config.max_length, device=device
        )
        metrics["eval_loss_before"] = eval_before["loss"]
        metrics["eval_loss"] = after["loss"]
        if "routing_accuracy" in after:
            metrics["routing_accuracy"] = after["routing_accuracy"]
            metrics["routing_accuracy_before"] = eval_before.get("routing_accuracy")
    elif any(e.intents for e in train):
        metrics["train_routing_accuracy"] = evaluate(
            inner, tokenizer, train, batch_size=config.batch_size, max_length=config.max_length, device=device
        ).get("routing_accuracy")
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in inner.router_state_dict().items()}
    return TrainResult(metrics=metrics, history=history, router_state=state)


@torch.no_grad()
def _calibrate(model, inner, loader, accelerator, *, progress: bool, console) -> None:
    """One pass over the training prompts, no gradients: the routers' input standardisation."""
    model.eval()
    with (
        inner.calibrating_router_inputs(reduce=lambda t: accelerator.reduce(t, "sum")),
        _progress(progress, console) as bar,
    ):
        task = bar.add_task("router inputs", total=len(loader), stats="") if bar else None  # no loss here
        for batch in loader:
            batch = {k: v for k, v in batch.items() if k != "intent_mask"}
            model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], routing_mask=_prompt_mask(batch)
            )
            if bar:
                bar.update(task, advance=1)


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def progress_bar(console=None):
    """The toolkit's one rich progress bar (stderr): label, bar, n/total, a ``stats`` field, time.

    Router training shows loss and tokens/s in ``stats``; the demo its own step's figures."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),  # loss and speed of training steps; empty for calibration
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
    )


def _progress(enabled: bool, console):
    return progress_bar(console) if enabled else _NoProgress()
