"""Registry throughput (DESIGN.md section 6): add-expert against sha256sum, listing 100,000 experts.

    python bench/registry.py [--size-mb 100] [--experts 100000] [--db postgresql+psycopg://...]
                             [--skip-add] [--json OUT]

add-expert of an adapter of ``--size-mb`` is timed end to end on the command line (process start
included) and in-process, and compared with ``sha256sum`` of the same bytes. The listing catalog is
filled with ``--experts`` rows by one bulk insert (the add path is measured above), then
``atmoe-reg list`` runs as a user would, output to /dev/null: the first page, filtered pages,
``--search``, the last page, and every row (``--all --json``, streamed, and ``--all``). The cold
start is ``atmoe-reg list`` on a catalog of three experts. SQLite always; PostgreSQL too with
``--db`` (a server URL: a fresh database is created there for the run, and dropped).
Not a test: it prints figures and ratios and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
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
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def _fill(registry, count: int) -> None:
    """``count`` expert rows by one bulk insert (the add path is timed by bench_add); the search
    index fills through its triggers (SQLite) or its GIN index (PostgreSQL) as for any insert."""
    from sqlalchemy import insert, select

    from atmoe.registry.models import Expert, Group

    with registry.write() as session:
        group_ids = list(session.scalars(select(Group.id)))
        rows = [
            {
                "name": f"expert-{i // 4:06d}",
                "version": i % 4 + 1,
                "group_id": group_ids[i % len(group_ids)],
                "domain": DOMAINS[i % len(DOMAINS)],
                "style": None,
                "tags": {"team": f"t{i % 7}"},
                "description": f"LoRA for {TASKS[i % len(TASKS)]}, release {i % 11}",
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
    if registry.engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with registry.engine.connect() as connection:  # what autovacuum does within a minute of a bulk load
            connection.execute(text("ANALYZE experts"))
            connection.commit()


DOMAINS = ("gastroenterology", "cardiology", None)
TASKS = ("triage notes", "discharge letters", "radiology reports", "prescribing advice", "rigorous answers")
# (label, arguments, runs): each timed end to end, process start included, output to /dev/null
LISTINGS = (
    ("first page (table)", ["list"], 5),
    ("first page --json --limit 50", ["list", "--json", "--limit", "50"], 5),
    ("filtered --domain cardiology", ["list", "--domain", "cardiology"], 5),
    ("filtered --tag team=t3", ["list", "--tag", "team=t3"], 5),
    ("--search 'radiology release 7'", ["list", "--search", "radiology release 7"], 5),
    ("--search expert-004242", ["list", "--search", "expert-004242"], 5),
    ("last page --offset 99950", ["list", "--offset", "99950"], 5),
    ("--all --json (streamed)", ["list", "--all", "--json"], 3),
    ("--all (table)", ["list", "--all"], 3),
)


def _user_env(**extra: str) -> dict:
    """The environment of a user's shell: bytecode caching on, as for an installed package (a
    PYTHONDONTWRITEBYTECODE in this shell would recompile atmoe on every start)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "ATMOE_DB_URL")}
    return dict(env, **extra)


def _best(args: list[str], env: dict, runs: int) -> float:
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm
    return min(_run(args, env) for _ in range(runs))


def bench_list(work: Path, count: int, db_url: str | None = None) -> dict:
    """The listings of LISTINGS on a catalog of ``count`` experts, on SQLite or ``db_url``."""
    from atmoe.registry import Registry

    home = work / ("home-list-pg" if db_url else "home-list")
    with Registry.open(home=home, db_url=db_url) as registry:
        _fill(registry, count)
    env = _user_env(ATMOE_HOME=str(home), **({"ATMOE_DB_URL": db_url} if db_url else {}))
    figures = {"experts": count}
    for label, args, runs in LISTINGS:
        if "--offset" in args:
            args = [*args[:-1], str(max(0, count - 50))]
        figures[label] = _best([_cli(), *args], env, runs)
    return figures


def bench_cold_start(work: Path, db_url: str | None = None) -> dict:
    """``atmoe-reg list`` on a catalog of three experts, against the interpreter's own start."""
    from atmoe.registry import Registry

    home = work / ("home-tiny-pg" if db_url else "home-tiny")
    with Registry.open(home=home, db_url=db_url) as registry:
        _fill(registry, 3)
    env = _user_env(ATMOE_HOME=str(home), **({"ATMOE_DB_URL": db_url} if db_url else {}))
    return {
        "python -c pass": _best([sys.executable, "-c", "pass"], env, 10),
        "atmoe-reg --version": _best([_cli(), "--version"], env, 10),
        "atmoe-reg list": _best([_cli(), "list"], env, 10),
        "atmoe-reg list --json": _best([_cli(), "list", "--json"], env, 10),
    }


class _PostgresDatabase:
    """A fresh database on the server of ``url`` for this run (created, then dropped)."""

    def __init__(self, url: str, label: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        self.admin = create_engine(url, isolation_level="AUTOCOMMIT")
        self.name = f"atmoe_bench_{label}_{os.getpid()}"
        self.url = make_url(url).set(database=self.name).render_as_string(hide_password=False)

    def __enter__(self) -> str:
        from sqlalchemy import text

        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"'))
        return self.url

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import text

        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def _print_listing(engine: str, figures: dict) -> None:
    print(f"list, {figures['experts']:,} experts, {engine} (best of 3-5 runs, process start included):")
    for label, _, _ in LISTINGS:
        print(f"  {label:<34} {figures[label]:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--experts", type=int, default=100_000)
    parser.add_argument(
        "--db",
        metavar="URL",
        help="also on PostgreSQL: a server URL (postgresql+psycopg://...); a fresh database is made there and dropped",
    )
    parser.add_argument("--skip-add", action="store_true", help="only the listings and the cold start")
    parser.add_argument("--json", dest="json_out", help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atmoe-bench-"))
    results: dict = {}
    servers: list[tuple[str, str | None]] = [("sqlite", None)] + ([("postgresql", args.db)] if args.db else [])
    try:
        if not args.skip_add:
            add = results["add"] = bench_add(work, args.size_mb)
            print(
                f"add-expert {add['bytes'] / 1e6:.0f} MB: sha256sum {add['sha256sum_s']:.3f} s, "
                f"in-process {add['add_expert_in_process_s']:.3f} s ({add['ratio_in_process']:.2f}x), "
                f"CLI {add['add_expert_cli_s']:.3f} s ({add['ratio_cli']:.2f}x, process start included)"
            )
        for engine, server in servers:
            with _PostgresDatabase(server, "tiny") if server else contextlib.nullcontext() as url:
                cold = results[f"cold_start_{engine}"] = bench_cold_start(work, url)
            print(
                f"cold start, 3 experts, {engine} (best of 10): " + ", ".join(f"{k} {v:.3f} s" for k, v in cold.items())
            )
            with _PostgresDatabase(server, "list") if server else contextlib.nullcontext() as url:
                listing = results[f"list_{engine}"] = bench_list(work, args.experts, url)
            _print_listing(engine, listing)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
