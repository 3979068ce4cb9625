"""Held-out evaluation: response-token loss and exact match by greedy decoding."""

from __future__ import annotations

import math
from statistics import fmean

import torch

from atmoe.demo.batching import collate, collate_prompts


@torch.no_grad()
def eval_loss(model, tokenizer, examples: list[dict], *, batch_size: int = 128) -> float:
    """Mean cross-entropy per response token (and <eos>) over ``examples``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(tokenizer, examples[i : i + batch_size])
        prompt_mask = batch.pop("prompt_mask")
        labels = batch.pop("labels")
        if hasattr(model, "last_routing_tensors"):
            # an AtMoEModel routes on the prompt only, as at inference (never on the answer)
            batch["routing_mask"] = prompt_mask
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((target != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy(model, tokenizer, examples: list[dict], *, batch_size: int = 128, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers (text up to <eos>) for the prompts of ``examples``."""
    model.eval()
    answers: list[str] = []
    for i in range(0, len(examples), batch_size):
        batch = collate_prompts(tokenizer, examples[i : i + batch_size])
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, batch["input_ids"].shape[1] :]:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


def exact_match(answers: list[str], examples: list[dict]) -> float:
    return sum(a.split() == ex["response"].split() for a, ex in zip(answers, examples)) / max(len(examples), 1)


def evaluate(model, tokenizer, examples: list[dict], *, batch_size: int = 128) -> dict:
    """{"eval_loss", "accuracy"} on ``examples``; both finite floats."""
    loss = eval_loss(model, tokenizer, examples, batch_size=batch_size)
    answers = greedy(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_new_tokens=max(len(ex["response"].split()) for ex in examples) + 2,
    )
    return {
        "eval_loss": loss if math.isfinite(loss) else float("nan"),
        "accuracy": exact_match(answers, examples),
        "samples": answers[:3],
    }


def _peft_alone(base, adapter_dir):
    """The base model with one adapter through PEFT itself (a deep copy of ``base``)."""
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def evaluate_methods(
    base, expert_dirs: dict, trained: dict, tokenizer, splits, *, console=None
) -> tuple[dict[str, dict], dict]:
    """Every method of the report on the held-out composite set ``splits.test``.

    ``trained`` maps each router method to its trained models, one per router seed; a router method is
    reported by the mean over its runs, routing accuracy included (the runs themselves in the extra
    details).

    The best single expert is chosen by eval loss on the validation split (``router_eval``), never on
    the test set. Returns ({method: {"eval_loss", "accuracy", "samples"} (+ "routing_accuracy" for the
    router methods)}, extra details).
    """
    from atmoe.demo.progress import progress_bar

    singles = [n for n in expert_dirs if n != "general"]
    results: dict[str, dict] = {}
    extra: dict = {}
    with progress_bar("evaluate methods", 6 + len(singles)) as advance:
        results["base"] = evaluate(base, tokenizer, splits.test)
        advance()
        validation = {}
        for name in singles:
            validation[name] = eval_loss(_peft_alone(base, expert_dirs[name]), tokenizer, splits.router_eval)
            advance()
        best = min(validation, key=validation.get)
        results["best_single_expert"] = evaluate(_peft_alone(base, expert_dirs[best]), tokenizer, splits.test)
        extra["best_single_expert"] = {
            "expert": best,
            "validation_eval_loss": validation,
            "chosen_on": "router_eval (validation), not test",
        }
        advance()
        results["general_only"] = evaluate(_peft_alone(base, expert_dirs["general"]), tokenizer, splits.test)
        extra["general_only"] = {"how": "the general adapter alone through PEFT (lambda = 0)"}
        advance()
        model = trained["atmoe"][0]  # forced weights: the router plays no part
        uniform = {name: 1.0 / len(model.expert_names) for name in model.expert_names}
        with model.forced_routing(uniform):
            results["uniform_mixture"] = evaluate(model, tokenizer, splits.test)
        extra["uniform_mixture"] = {
            "how": "the AT-MoE composition with forced weights 1/E on every expert; "
            f"lambda {model.atmoe_config.lam} and the general expert as composed"
        }
        advance()
        for method in ("flat_router", "shared_router", "atmoe"):
            results[method], extra[method] = router_runs(trained[method], tokenizer, splits.test)
            advance()
    for method, r in results.items():
        extra.setdefault(method, {})["samples"] = r.pop("samples")
    return results, extra


def router_runs(
    models: list,
    tokenizer,
    examples: list[dict],
    groups: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
) -> tuple[dict, dict]:
    """One router method's runs (one model per router seed) on ``examples``: (the means of eval loss,
    exact match and routing accuracy (``routing_accuracy`` with ``groups`` and ``names``), with the first
    run's samples; the per-run values)."""
    runs = [evaluate(m, tokenizer, examples) for m in models]
    details = {
        "eval_loss_per_seed": [r["eval_loss"] for r in runs],
        "accuracy_per_seed": [r["accuracy"] for r in runs],
        "routing_accuracy_per_seed": [routing_accuracy(m, tokenizer, examples, groups, names=names) for m in models],
        "how": f"mean over {len(runs)} router training run(s), seeds in order",
    }
    means = {
        "eval_loss": fmean(details["eval_loss_per_seed"]),
        "accuracy": fmean(details["accuracy_per_seed"]),
        "routing_accuracy": fmean(details["routing_accuracy_per_seed"]),
        "samples": runs[0]["samples"],
    }
    return means, details


def evaluate_layouts(
    trained: dict[str, list], layouts: dict, tokenizer, examples: list[dict], suite_groups: dict[str, tuple[str, ...]]
) -> dict[str, dict]:
    """Every group layout's router runs on ``examples``; routing accuracy is scored with the suite's
    groups (``suite_groups``: group -> suite expert names), whatever groups the layout routed with."""
    from atmoe.demo.progress import progress_bar

    group_of = {name: group for group, names in suite_groups.items() for name in names}
    out = {}
    with progress_bar("evaluate group layouts", len(trained)) as advance:
        for name, models in trained.items():
            means, details = router_runs(models, tokenizer, examples, group_of, names=layouts[name].source)
            means.pop("samples")
            out[name] = {**means, **details}
            advance()
    return out


@torch.no_grad()
def routing_accuracy(
    model,
    tokenizer,
    examples: list[dict],
    groups: dict[str, str] | None = None,
    *,
    names: dict[str, str] | None = None,
    batch_size: int = 128,
) -> float:
    """The share of ``examples`` whose top expert, among the experts of each intended expert's group
    (weights averaged over blocks, routing on the prompt), is the intended one: with the model's own
    groups (``groups`` None) this is ``atmoe.training.evaluate``'s routing accuracy. ``groups`` (suite
    expert -> group) scores a model with other groups, a group layout, by the suite's; ``names`` maps
    the model's expert names to suite expert names (the same names when None)."""
    groups = groups or dict(model.expert_groups)
    names = names or {n: n for n in model.expert_names}
    suite = [names[n] for n in model.expert_names]
    index = {name: i for i, name in enumerate(suite)}
    members = {g: [index[n] for n in suite if groups[n] == g] for g in set(groups.values())}
    model.eval()
    hits = 0
    for start in range(0, len(examples), batch_size):
        items = examples[start : start + batch_size]
        batch = collate(tokenizer, items)
        prompt_mask = batch.pop("prompt_mask")
        batch.pop("labels")
        model(**batch, routing_mask=prompt_mask)
        mean = torch.stack([w.mean(1) if w.dim() == 3 else w for _, w in model.last_routing_tensors()]).mean(0)
        for weights, ex in zip(mean.tolist(), items):
            hits += all(
                max(members[groups[intent]], key=weights.__getitem__) == index[intent] for intent in ex["intents"]
            )
    return hits / max(len(examples), 1)


def temperature_sweep(
    model, tokenizer, examples: list[dict], temperatures, *, trained_temperature: float, console=None
) -> list[dict]:
    """The trained AT-MoE routers evaluated at other softmax temperatures (not re-trained)."""
    from atmoe.demo.progress import progress_bar

    rows = []
    try:
        with progress_bar("temperature sweep", len(temperatures)) as advance:
            for tau in temperatures:
                model.set_temperature(tau)
                r = evaluate(model, tokenizer, examples)
                rows.append(
                    {
                        "temperature": tau,
                        "eval_loss": r["eval_loss"],
                        "accuracy": r["accuracy"],
                        "routing_accuracy": routing_accuracy(model, tokenizer, examples),
                    }
                )
                advance()
    finally:
        model.set_temperature(trained_temperature)
    return rows


def heatmap_examples(test: list[dict], suite, count: int = 3) -> list[dict]:
    """A few held-out examples with different intents (one per functional intent first)."""
    chosen, seen = [], set()
    for ex in test:
        key = ex["intents"][0]
        if key not in seen and len(ex["prompt"].split()) <= 10:
            chosen.append(ex)
            seen.add(key)
        if len(chosen) == count:
            break
    return chosen or test[:count]


@torch.no_grad()
def example_routings(model, tokenizer, examples: list[dict]) -> list[tuple[list[dict], str]]:
    """(per-block routing, greedy answer) of each example's prompt, run alone."""
    out = []
    for ex in examples:
        answer = greedy(model, tokenizer, [ex], max_new_tokens=len(ex["response"].split()) + 2)[0]
        out.append((model.last_routing(), answer))
    return out


def expert_own_accuracy(base, tokenizer, expert_dirs: dict, splits) -> dict[str, dict]:
    """Each expert alone (PEFT) on held-out data of its own single intent: do the experts know their skill?"""
    out = {}
    for name, folder in expert_dirs.items():
        data = splits.expert_eval.get(name) or [ex for v in splits.expert_eval.values() for ex in v]
        r = evaluate(_peft_alone(base, folder), tokenizer, data[:96])
        out[name] = {"eval_loss": r["eval_loss"], "accuracy": r["accuracy"]}
    return out


def oracle_routing(model, tokenizer, examples: list[dict], *, weight: float | None = None) -> dict:
    """A diagnostic, not a method: each example gets forced weights on its k intended experts in every
    block: 1/k by default (sum-to-one, what a shared router could output at best), or ``weight`` each.
    With experts placed on disjoint blocks, weight 1 in every block means full strength in each expert's
    own blocks (an expert has no delta elsewhere): what per-block routers can reach (group weight ~1 per
    block). Separates "the router chose badly" from "the experts do not compose"."""
    groups: dict[tuple, list[dict]] = {}
    for ex in examples:
        groups.setdefault(tuple(ex["intents"]), []).append(ex)
    loss_sum = acc_sum = 0.0
    for intents, items in groups.items():
        with model.forced_routing({name: weight if weight is not None else 1.0 / len(intents) for name in intents}):
            r = evaluate(model, tokenizer, items)
        loss_sum += r["eval_loss"] * len(items)
        acc_sum += r["accuracy"] * len(items)
    how = "1/k" if weight is None else f"{weight}"
    return {
        "eval_loss": loss_sum / len(examples),
        "accuracy": acc_sum / len(examples),
        "how": f"per-example forced weight {how} on each intended expert, every block (lambda and general as composed)",
    }
