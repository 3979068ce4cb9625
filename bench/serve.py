"""Serving throughput and latency: the composition, the base model alone, PEFT's mixed-adapter batch.

Each variant runs as its own ``atmoe.serve`` server process (the same FastAPI app, the same batching
worker, uvicorn on 127.0.0.1), and this process is the load: C closed-loop clients (C = 1, 4, 16 by
default), each sending streamed completions one after the other until R requests are answered.
Every request asks for the same number of tokens (``ignore_eos``, greedy), so each variant does the
same work. Variants:

- ``atmoe``: the demo's composition, every row routed on its own prompt, held for its decode steps;
- ``atmoe-one-at-a-time``: the same with ``--max-batch 1`` (requests served one after the other);
- ``base``: the composition's base model alone (no experts), same engine;
- ``peft``: PEFT's ``PeftModel`` holding the composition's experts, each row run through one of them
  (``adapter_names``, the expert cycling with the request): PEFT's mixed-adapter batching, same engine.

The variants are measured round-robin (``--repeats`` rounds, the median round kept), so that the
machine's noise hits each alike. Per variant and load it reports output tokens per second, requests per second, p50 / p95 latency
and time to first token, and the ratios the issue's goal names (at 16 clients: at least 4x the
one-at-a-time throughput, within 1.5x of the base model's). Figures go to stdout and to
bench/results/serve-<device>.json.

    .venv/bin/python bench/serve.py                          # runs `atmoe-reg demo --quick` first (~2 min)
    .venv/bin/python bench/serve.py --home DEMO_HOME         # a catalog the demo made (--home of `demo`)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("atmoe", "atmoe-one-at-a-time", "base", "peft")
ROOT = Path(__file__).resolve().parent.parent


# -- server side ------------------------------------------------------------------------------------


def _expert_dirs(registry, composition) -> dict[str, Path]:
    """Each routed expert of ``composition`` written out of the store as a PEFT adapter folder."""
    out = Path(tempfile.mkdtemp(prefix="atmoe-bench-experts-"))
    dirs = {}
    for member in composition.members:
        record = registry.get_expert(member.ref)
        folder = out / member.name
        folder.mkdir()
        for item in record.files or ():
            (folder / item.path).parent.mkdir(parents=True, exist_ok=True)
            (folder / item.path).write_bytes(registry.store.open_verified(item.sha256))
        dirs[member.name] = folder
    return dirs


def serve(args: argparse.Namespace) -> None:
    """Run one variant's server until killed."""
    import torch
    import uvicorn

    from atmoe.loading import load_base_model
    from atmoe.registry import Registry
    from atmoe.serve.app import create_app
    from atmoe.serve.backends import PeftMixedBackend, PlainBackend
    from atmoe.serve.config import ServeConfig
    from atmoe.serve.engine import Worker
    from atmoe.serve.pool import ModelPool, Served

    torch.manual_seed(0)
    variant = args.serve
    max_batch = 1 if variant == "atmoe-one-at-a-time" else args.max_batch
    config = ServeConfig(
        port=args.port, max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=1024, threads=args.threads
    )
    torch.set_num_threads(config.cpu_threads)  # as atmoe-reg serve does
    registry = Registry.open(args.home)
    pool = ModelPool(registry, config)
    if variant.startswith("atmoe"):
        pool.preload([args.ref])
    else:
        key = pool.resolve(args.ref)
        composition = registry.composition(key.partition(":")[0])
        base, tokenizer = load_base_model(composition.base_model, revision=composition.base_revision)
        if variant == "base":
            backend = PlainBackend(base, tokenizer)
        else:
            from peft import PeftModel

            dirs = _expert_dirs(registry, composition)
            names = list(dirs)
            model = PeftModel.from_pretrained(base, str(dirs[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(dirs[name]), adapter_name=name)
            backend = PeftMixedBackend(model.eval(), tokenizer, names)
        worker = Worker(backend, max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=1024, name=variant)
        pool.add(Served(key=variant, backend=backend, worker=worker, lineage={"variant": variant}))
    uvicorn.run(create_app(pool, config), host="127.0.0.1", port=args.port, log_level="warning")


# -- client side ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prompts(path: Path | None) -> list[str]:
    """The prompts of a JSONL file (the demo's held-out composite instructions), else synthetic ones."""
    if path is not None and path.is_file():
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return [f"instruction: count animal loud input: {' '.join('abcdefgh'[: 3 + i % 4])} output:" for i in range(64)]


async def _one(client, url: str, body: dict) -> tuple[float, float, int]:
    """(latency s, time to first token s, output tokens) of one streamed completion."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency, tokens


async def _load(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int,
                experts: list[str] | None) -> dict:  # fmt: skip
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    results: list[tuple[float, float, int]] = []

    async def client_loop(client) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            body = {
                "model": model,
                "prompt": prompts[index % len(prompts)],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if experts:  # PEFT: one adapter per request
                body["atmoe"] = {"force": {experts[index % len(experts)]: 1.0}}
            results.append(await _one(client, url, body))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    firsts = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": pct(latencies, 0.95),
        "ttft_p50_s": statistics.median(firsts),
        "ttft_p95_s": pct(firsts, 0.95),
    }


def _start(variant: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, __file__, "--serve", variant, "--home", str(args.home), "--ref", args.ref,
               "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while True:
        try:
            httpx.get(url + "/health", timeout=1).raise_for_status()
            return process, url
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {variant} server did not start") from None
            time.sleep(0.2)


def _demo() -> tuple[Path, Path]:
    """Run the quick demo into a temporary folder: (its catalog home, its held-out prompts)."""
    out = Path(tempfile.mkdtemp(prefix="atmoe-bench-demo-"))
    home = out / "home"
    print(f"# running `atmoe-reg --home {home} demo --quick --out {out / 'out'}` for its composition", flush=True)
    subprocess.run([str(Path(sys.executable).with_name("atmoe-reg")), "--home", str(home), "demo", "--quick",
                    "--out", str(out / "out")], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return home, out / "out" / "work" / "data" / "router_eval.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="A catalog home made by `atmoe-reg demo` (default: run it)")
    parser.add_argument("--ref", default="demo-atmoe", help="The composition to serve (default demo-atmoe)")
    parser.add_argument("--prompts", type=Path, help="JSONL with a 'prompt' per line (the demo's router_eval.jsonl)")
    parser.add_argument("--clients", default="1,4,16", help="Concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=48, help="Requests per load level")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens each request generates")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, help="torch threads per server (default: atmoe-reg serve's)")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds over the variants; the median round is kept")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/serve-cpu.json)")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.home is None:
        args.home, args.prompts = _demo()
    clients = [int(c) for c in args.clients.split(",")]
    prompts = _prompts(args.prompts)
    variants = args.variants.split(",")
    experts = None
    if "peft" in variants:
        from atmoe.registry import Registry

        with Registry.open(args.home) as registry:
            experts = [m.name for m in registry.composition(args.ref.partition(":")[0]).members]
    servers = {variant: _start(variant, args) for variant in variants}  # idle servers sleep
    rounds: dict[tuple[str, int], list[dict]] = {}
    try:
        for variant, (_, url) in servers.items():  # warm-up
            model = args.ref if variant.startswith("atmoe") else variant
            warm = experts if variant == "peft" else None
            asyncio.run(_load(url + "/v1/completions", model, prompts, 4, 8, args.max_tokens, warm))
        for repeat in range(args.repeats):  # round-robin, so that the machine's noise hits every variant alike
            for count in clients:
                for variant, (_, url) in servers.items():
                    model = args.ref if variant.startswith("atmoe") else variant
                    requests = args.requests if count > 1 else max(8, args.requests // 3)
                    figures = asyncio.run(_load(url + "/v1/completions", model, prompts, count, requests,
                                                args.max_tokens, experts if variant == "peft" else None))  # fmt: skip
                    rounds.setdefault((variant, count), []).append(figures)
                    print(f"# round {repeat + 1}: {_line(variant, figures)}", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    results: dict[str, list[dict]] = {}
    print("# the median round of each (by output tokens per second):")
    for variant in variants:
        results[variant] = []
        for count in clients:
            ordered = sorted(rounds[(variant, count)], key=lambda f: f["tokens_per_s"])
            median = {**ordered[len(ordered) // 2], "tokens_per_s_rounds": [f["tokens_per_s"] for f in ordered]}
            results[variant].append(median)
            print(_line(variant, median))
    ratios = _ratios(results, clients)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    document = {
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("serve", "port")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "ratios": ratios,
    }
    out = args.out or ROOT / "bench" / "results" / "serve-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"# wrote {out}")


def _line(variant: str, figures: dict) -> str:
    return (
        f"{variant:>20} {figures['clients']:>3} clients: {figures['tokens_per_s']:8.1f} tok/s "
        f"{figures['requests_per_s']:6.2f} req/s  latency p50 {figures['latency_p50_s'] * 1000:7.0f} ms "
        f"p95 {figures['latency_p95_s'] * 1000:7.0f} ms  ttft p50 {figures['ttft_p50_s'] * 1000:6.0f} ms "
        f"p95 {figures['ttft_p95_s'] * 1000:6.0f} ms"
    )


def _ratios(results: dict[str, list[dict]], clients: list[int]) -> dict[str, float]:
    """The goal's ratios at the largest load (and batching's gain over one client)."""
    top = max(clients)

    def tps(variant: str, count: int) -> float | None:
        for figures in results.get(variant, []):
            if figures["clients"] == count:
                return figures["tokens_per_s"]
        return None

    ratios = {}
    pairs = (
        (f"atmoe / atmoe-one-at-a-time at {top} clients (goal >= 4)", "atmoe", "atmoe-one-at-a-time"),
        (f"base / atmoe at {top} clients (goal <= 1.5)", "base", "atmoe"),
        (f"atmoe / peft at {top} clients", "atmoe", "peft"),
    )
    for name, top_variant, bottom in pairs:
        a, b = tps(top_variant, top), tps(bottom, top)
        if a and b:
            ratios[name] = a / b
    one, many = tps("atmoe", min(clients)), tps("atmoe", top)
    if one and many:
        ratios[f"atmoe at {top} clients / at {min(clients)}"] = many / one
    return ratios


if __name__ == "__main__":
    main()
