"""Registry throughput (DESIGN.md section 6): add-expert against sha256sum, listing 100,000 experts.

    python bench/registry.py [--size-mb 100] [--experts 100000] [--json OUT]

add-expert of an adapter of ``--size-mb`` is timed end to end on the command line (process start
included) and in-process, and compared with ``sha256sum`` of the same bytes. The listing catalog is
filled with ``--experts`` rows by one bulk insert (the add path is measured above), then
``atmoe-reg list --json`` and ``atmoe-reg list`` run as a user would, output to /dev/null.
Not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _adapter(root: Path, size_mb: int) -> Path:
    """A valid LoRA adapter directory of about ``size_mb`` MB (finite float32 values)."""
    from safetensors.numpy import save_file

    hidden, rank = 2048, 64
    layers = max(1, int(size_mb * 1e6 / (2 * 4 * hidden * rank)))
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, rank), dtype=np.float32)
    root.mkdir(parents=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "bench/llama",
    }
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root


def _run(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _cli() -> str:
    return str(Path(sys.executable).with_name("atmoe-reg"))


def bench_add(work: Path, size_mb: int) -> dict:
    from atmoe.registry import Registry

    adapter = _adapter(work / "adapter", size_mb)
    weights = adapter / "adapter_model.safetensors"
    size = weights.stat().st_size
    subprocess.run(["cat", str(weights)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    sha = min(_run(["sha256sum", str(weights)], dict(os.environ)) for _ in range(3))
    env = dict(os.environ, ATMOE_HOME=str(work / "home-cli"))
    cli = _run([_cli(), "add-expert", str(adapter), "--name", "big", "--group", "domain"], env)
    in_process = []
    for attempt in range(3):
        with Registry.open(home=work / f"home-{attempt}") as registry:
            started = time.perf_counter()
            registry.add_expert(adapter, name="big", group="domain")
            in_process.append(time.perf_counter() - started)
    return {
        "bytes": size,
        "sha256sum_s": sha,
        "add_expert_cli_s": cli,
        "add_expert_in_process_s": min(in_process),
        "ratio_cli": cli / sha,
        "ratio_in_process": min(in_process) / sha,
    }


def bench_list(work: Path, count: int) -> dict:
    from sqlalchemy import insert, select

    from atmoe.registry import Registry
    from atmoe.registry.models import Expert, Group

    home = work / "home-list"
    with Registry.open(home=home) as registry, registry.write() as session:
        group_ids = list(session.scalars(select(Group.id)))
        rows = [
            {
                "name": f"expert-{i // 4:06d}",
                "version": i % 4 + 1,
                "group_id": group_ids[i % len(group_ids)],
                "domain": ("gastroenterology", "cardiology", None)[i % 3],
                "style": None,
                "tags": {"team": f"t{i % 7}"},
                "description": None,
                "base_model": "org/llama-1b",
                "base_revision": None,
                "peft_type": "LORA",
                "r": 16,
                "alpha": 32.0,
                "use_rslora": False,
                "target_modules": ["q_proj", "v_proj"],
                "module_ranks": {},
                "rank_pattern": {},
                "alpha_pattern": {},
                "digest": f"{i:064x}",
                "size": 1 << 20,
            }
            for i in range(count)
        ]
        session.execute(insert(Expert), rows)
    env = dict(os.environ, ATMOE_HOME=str(home))
    startup = min(_run([_cli(), "--version"], env) for _ in range(3))
    as_json = min(_run([_cli(), "list", "--json"], env) for _ in range(3))
    table = min(_run([_cli(), "list"], env) for _ in range(3))
    filtered = min(_run([_cli(), "list", "--domain", "cardiology", "--json"], env) for _ in range(3))
    return {
        "experts": count,
        "cli_startup_s": startup,
        "list_json_s": as_json,
        "list_table_s": table,
        "list_filtered_json_s": filtered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--experts", type=int, default=100_000)
    parser.add_argument("--json", dest="json_out", help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atmoe-bench-"))
    try:
        results = {"add": bench_add(work, args.size_mb), "list": bench_list(work, args.experts)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add, listing = results["add"], results["list"]
    print(
        f"add-expert {add['bytes'] / 1e6:.0f} MB: sha256sum {add['sha256sum_s']:.3f} s, "
        f"in-process {add['add_expert_in_process_s']:.3f} s ({add['ratio_in_process']:.2f}x), "
        f"CLI {add['add_expert_cli_s']:.3f} s ({add['ratio_cli']:.2f}x, process start included)"
    )
    print(
        f"list {listing['experts']:,} experts: --json {listing['list_json_s']:.3f} s, table "
        f"{listing['list_table_s']:.3f} s, filtered --json {listing['list_filtered_json_s']:.3f} s "
        f"(CLI start alone {listing['cli_startup_s']:.3f} s)"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
