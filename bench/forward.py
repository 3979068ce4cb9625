"""Forward, decode and router-training speed of AT-MoE against the base model, PEFT and X-LoRA.

One run builds a Llama-shaped model with random weights and E random LoRA experts (r on all seven
linear modules) and times, round-robin so that machine noise hits every variant alike:

- prefill: one forward of a [batch, seq] batch (no cache);
- decode: batch-1 greedy steps with a KV cache after a prompt, in ms per token;
- train step: AT-MoE forward + backward + AdamW step on the router parameters only; for the base, a
  forward + backward of the same batch with every base weight trainable (the reference step);
  X-LoRA the same on its classifier.

Variants: the base model; AT-MoE (routers live, sequence routing); PEFT LoRA with all E adapters
active (its per-adapter loop); PEFT X-LoRA (its classifier pass then the scaled pass; it refuses a KV
cache, so it has no decode figure). Each figure is printed as a ratio to the base model and written
with the raw times to bench/results/forward-<device>.json.

    .venv/bin/python bench/forward.py                  # CPU default: hidden 512, 4 layers, E=8, r=8
    python bench/forward.py --device cuda [--compile]   # DESIGN.md section 6: 1.1B shape, E=16, r=16, bf16

The CPU default uses a 4096-token vocabulary so that the LM head (identical in every variant) does
not hide the layers' cost in so small a model (--vocab 32000 for Llama's); CUDA uses 32000.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from atmoe.model import AtMoEModel

CPU_DEFAULTS = dict(
    hidden=512,
    layers=4,
    intermediate=1376,
    heads=8,
    kv_heads=8,
    vocab=4096,
    experts=8,
    rank=8,
    batch=4,
    seq=128,
    dtype="float32",
    repeats=5,
    decode_tokens=32,
    prompt=128,
)
CUDA_DEFAULTS = dict(
    hidden=2048,
    layers=22,
    intermediate=5632,
    heads=32,
    kv_heads=4,
    vocab=32000,
    experts=16,
    rank=16,
    batch=4,
    seq=1024,
    dtype="bfloat16",
    repeats=10,
    decode_tokens=64,
    prompt=128,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for key in CPU_DEFAULTS:
        kind = str if key == "dtype" else int
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"default {CPU_DEFAULTS[key]} (cpu) / {CUDA_DEFAULTS[key]} (cuda)",
        )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: quieter on a shared box)")
    parser.add_argument("--compile", action="store_true", help="torch.compile base and mixture alike")
    parser.add_argument("--skip-peft", action="store_true", help="leave out PEFT with all adapters active")
    parser.add_argument("--skip-xlora", action="store_true", help="leave out PEFT X-LoRA (slow on a CPU)")
    parser.add_argument("--xlora-repeats", type=int, default=2, help="repetitions for X-LoRA (slow)")
    parser.add_argument("--skip-train", action="store_true", help="leave out the training steps")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/forward-<device>.json)"
    )
    args = parser.parse_args(argv)
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_base(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq + args.decode_tokens + args.prompt),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def make_experts(base: torch.nn.Module, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, dict]:
    """E random in-memory experts, split into four groups (functional, domain, style, extra)."""
    from atmoe.testing import make_random_adapter

    names = [f"expert{i}" for i in range(args.experts)]
    group_names = ["functional", "domain", "style", "extra"][: max(1, min(4, args.experts))]
    groups: dict[str, dict] = {g: {} for g in group_names}
    for i, name in enumerate(names):
        adapter = make_random_adapter(base, r=args.rank, target_modules=TARGETS, seed=100 + i, name=name, dtype=dtype)
        groups[group_names[i % len(group_names)]][name] = adapter
    return groups


def make_atmoe(base, groups):
    from atmoe import build_atmoe

    model = build_atmoe(copy.deepcopy(base), groups)
    generator = torch.Generator().manual_seed(7)  # live routers, away from the even start
    model.load_router_state_dict(
        {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in model.router_state_dict().items()}
    )
    return model.eval()


def make_peft_all_active(base, groups, args):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    adapters = [a for members in groups.values() for a in members.values()]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(TARGETS), lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=adapters[0].name)
    for adapter in adapters[1:]:
        model.add_adapter(adapter.name, copy.deepcopy(config))
    for adapter in adapters:
        set_peft_model_state_dict(model, adapter.tensors, adapter_name=adapter.name)
    model.base_model.set_adapter([a.name for a in adapters])
    return model.eval()


def make_xlora(base, groups, args, workdir: Path):
    from peft import XLoraConfig, get_peft_model

    from atmoe.adapters import save_adapter

    adapters = [a for members in groups.values() for a in members.values()]
    # peft 0.21 names the loaded adapters "0".."N-1" internally; other keys fail at the first forward
    paths = {str(i): str(save_adapter(a, workdir / f"xlora{i}")) for i, a in enumerate(adapters)}
    model_copy = copy.deepcopy(base)
    model_copy.config.use_cache = False  # X-LoRA refuses a KV cache
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=args.hidden, adapters=paths, xlora_depth=1)
    model = get_peft_model(model_copy, config).to(args.device)
    return model.eval()


def round_robin(calls: dict[str, Callable[[], None]], repeats: dict[str, int], device: str) -> dict[str, list[float]]:
    """Seconds of each call, variants interleaved; one untimed warm-up call each first."""
    for call in calls.values():
        call()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(max(repeats.values())):
        for name, call in calls.items():
            if round_index >= repeats[name]:
                continue
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def prefill_call(model, ids, mask):
    def call():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    return call


def decode_call(model, prompt, tokens, device, result: list[float]):
    """Prefill untimed, then ``tokens`` greedy decode steps with the cache, timed; appends s/token."""

    def call():
        mask = torch.ones(1, prompt.shape[1] + tokens, dtype=torch.long, device=device)
        # a mixture holds the prompt's routing over the decode steps, as its generate() does
        request = model.request(attention_mask=mask[:, : prompt.shape[1]]) if isinstance(model, AtMoEModel) else None
        with torch.no_grad(), request or contextlib.nullcontext():
            out = model(input_ids=prompt, attention_mask=mask[:, : prompt.shape[1]], use_cache=True)
            past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
            synchronize(device)
            start = time.perf_counter()
            for i in range(tokens):
                length = prompt.shape[1] + i + 1
                out = model(input_ids=step, attention_mask=mask[:, :length], past_key_values=past, use_cache=True)
                past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
            synchronize(device)
            result.append((time.perf_counter() - start) / tokens)

    return call


def train_call(model, ids, params, optimizer=None):
    def call():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            for param in params:
                param.grad = None

    return call


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft is not installed: PEFT and X-LoRA left out", file=sys.stderr)
        args.skip_peft = args.skip_xlora = True
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads) if args.device == "cpu" else None
    dtype = getattr(torch, args.dtype)
    device = args.device
    base = make_base(args, dtype)
    groups = make_experts(base, args, dtype)

    from atmoe import freeze_all_but_routers

    variants: dict[str, torch.nn.Module] = {"base": base, "atmoe": make_atmoe(base, groups)}
    if not args.skip_peft:
        variants["peft_all_active"] = make_peft_all_active(base, groups, args)
    workdir = Path(tempfile.mkdtemp(prefix="atmoe-bench-"))
    if not args.skip_xlora:
        variants["xlora"] = make_xlora(base, groups, args, workdir)
    if args.compile:
        variants = {name: (torch.compile(m) if name in ("base", "atmoe") else m) for name, m in variants.items()}

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    mask = torch.ones_like(ids)
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=generator).to(device)
    repeats = {name: (min(args.repeats, args.xlora_repeats) if name == "xlora" else args.repeats) for name in variants}
    results: dict[str, dict[str, float | None]] = {name: {} for name in variants}

    print(f"prefill: batch {args.batch} x {args.seq} tokens ...", file=sys.stderr)
    times = round_robin({n: prefill_call(m, ids, mask) for n, m in variants.items()}, repeats, device)
    for name in variants:
        results[name]["prefill_ms"] = 1e3 * statistics.median(times[name])

    print(f"decode: batch 1, prompt {args.prompt}, {args.decode_tokens} tokens ...", file=sys.stderr)
    decoders = {n: m for n, m in variants.items() if n != "xlora"}
    per_token: dict[str, list[float]] = {n: [] for n in decoders}
    round_robin(
        {n: decode_call(m, prompt, args.decode_tokens, device, per_token[n]) for n, m in decoders.items()},
        {n: max(3, args.repeats // 2) for n in decoders},
        device,
    )
    for name in variants:
        results[name]["decode_ms_per_token"] = (
            1e3 * statistics.median(per_token[name][1:]) if name in per_token else None
        )

    if not args.skip_train:
        print("train step ...", file=sys.stderr)
        labels = ids
        trainers: dict[str, Callable[[], None]] = {}
        base_params = [p for p in variants["base"].parameters()]
        for p in base_params:
            p.requires_grad_(True)
        trainers["base"] = train_call(variants["base"], labels, base_params)
        atmoe = variants["atmoe"]
        router_params = freeze_all_but_routers(getattr(atmoe, "_orig_mod", atmoe))
        trainers["atmoe"] = train_call(atmoe, labels, router_params, torch.optim.AdamW(router_params, lr=1e-3))
        if "xlora" in variants:
            xlora_params = [p for p in variants["xlora"].parameters() if p.requires_grad]
            trainers["xlora"] = train_call(
                variants["xlora"], labels, xlora_params, torch.optim.AdamW(xlora_params, lr=1e-3)
            )
        times = round_robin(trainers, {n: repeats[n] for n in trainers}, device)
        for name in variants:
            results[name]["train_step_ms"] = 1e3 * statistics.median(times[name]) if name in times else None

    report = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        "config": {k: getattr(args, k) for k in CPU_DEFAULTS},
        "versions": _versions(),
        "results": results,
        "ratios": {
            name: {
                metric: (value / results["base"][metric] if value is not None else None)
                for metric, value in figures.items()
            }
            for name, figures in results.items()
        },
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"forward-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written {out}", file=sys.stderr)
    return report


def _versions() -> dict[str, str]:
    import transformers

    try:
        import peft
    except ImportError:
        peft = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": getattr(peft, "__version__", "absent"),
        "python": platform.python_version(),
    }


def print_table(report: dict) -> None:
    labels = {"prefill_ms": "prefill", "decode_ms_per_token": "decode/token", "train_step_ms": "train step"}
    config = report["config"]
    title = (
        f"{report['device']} ({report['device_name']}, {report['threads']} threads"
        f"{', compiled' if report['compile'] else ''}): hidden {config['hidden']}, {config['layers']} layers, "
        f"E={config['experts']} r={config['rank']}, batch {config['batch']}x{config['seq']}, {config['dtype']}"
    )
    rows = []
    for name, figures in report["results"].items():
        cells = []
        for metric in labels:
            value, ratio = figures.get(metric), report["ratios"][name].get(metric)
            cells.append("n/a" if value is None else f"{value:9.2f} ms  {ratio:5.2f}x")
        rows.append((name, *cells))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for column in ("variant", *labels.values()):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=max(110, Console().width)).print(table)
    except ImportError:
        print(title)
        print(f"{'variant':16} " + " ".join(f"{c:>22}" for c in labels.values()))
        for row in rows:
            print(f"{row[0]:16} " + " ".join(f"{c:>22}" for c in row[1:]))


if __name__ == "__main__":
    main()
