"""The end-to-end demo: base model, experts, registry, compositions, routers, evaluation, report.

(Over 400 lines by intent: the demo's steps, in the order they run, read top to bottom in one place.)

Every step goes through the toolkit's public surface (PEFT for the experts, ``Registry`` for
add-expert / compose / train-router / build) and prints the ``atmoe-reg`` command that does the same
step by hand. Methods compared on held-out composite instructions:

- ``base``: the base model alone;
- ``best_single_expert``: one expert alone through PEFT, chosen on the validation split (never test);
- ``general_only``: the pre-merged general expert alone through PEFT (lambda = 0);
- ``uniform_mixture``: the AT-MoE composition with forced equal weights 1/E on every expert
  (lambda and the general expert as in the composition): what routing adds over no routing;
- ``flat_router``: the same experts with one flat softmax over all experts per block;
- ``shared_router``: the grouped router, one for all blocks;
- ``atmoe``: grouped routers, one per block (the paper's design).

The default profile also routes the same experts in other group layouts (``atmoe.demo.layouts``: one
group of all experts, the suite's group sizes with the kinds mixed, one expert per group), each with
AT-MoE's per-block grouped routers and recipe: the paper's "how many groups, how many experts per group".
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from atmoe.demo import tasks
from atmoe.demo.base import BaseSpec
from atmoe.demo.experts import ExpertSpec
from atmoe.demo.layouts import LABELS as LAYOUT_LABELS
from atmoe.demo.layouts import LAYOUTS, make_layout
from atmoe.demo.progress import console

METHODS = ("base", "best_single_expert", "general_only", "uniform_mixture", "flat_router", "shared_router", "atmoe")
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one demo run (``--quick`` or the default)."""

    name: str
    suite: tasks.SuiteSpec
    base: BaseSpec
    expert: ExpertSpec
    general_steps: int = field(metadata={"help": "optimizer steps of the general expert (all data)"})
    n_expert: int = 600
    n_router: int = 480
    n_router_eval: int = 96
    n_test: int = 240
    router_epochs: int = 4
    # each router method is trained this many times (seeds seed, seed+1, ...; every run is a router version
    # in the registry) and reported by its mean: one router run is one draw of the routers' training noise
    router_seeds: int = 1
    router_lr: float = 5e-2
    router_batch: int = 32
    routing_loss_weight: float = 1.0
    lam: float = 0.5
    learn_lambda: bool = False
    # Task-design choice (disclosed in the report): which blocks each group's experts adapt (PEFT
    # layers_to_transform). None = every block. With disjoint placements only one group has deltas in a
    # block, so a router can give that group weight ~1 there and each expert acts at full strength in its
    # own blocks. The general expert is full-depth.
    placement: dict | None = None
    # group layouts compared with the suite's own (atmoe.demo.layouts): the same experts grouped otherwise,
    # each trained router_seeds times like the router methods
    layouts: tuple[str, ...] = ()
    seed: int = 0

    def expert_spec(self, group: str) -> ExpertSpec:
        spec = self.expert
        if self.placement and group in self.placement:
            spec = replace(spec, layers=tuple(self.placement[group]))
        return spec


# Placement, a disclosed task-design choice (why: docs/DEMO_NOTES.md): functional experts on the first
# block, style on the middle one, domain on the last; the general expert adapts every block.
PLACEMENT = {"functional": (0,), "style": (1,), "domain": (2,)}
# The expert learning rate (3e-3) and the lambda start (0.9) were chosen before any test-set run, for
# every method alike; the measurements behind both are in docs/DEMO_NOTES.md.
LAMBDA = 0.9
QUICK = Profile(
    name="quick",
    suite=tasks.QUICK_SUITE,
    base=BaseSpec(
        hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, pretrain_steps=1600, batch_size=64, lr=3e-3
    ),
    expert=ExpertSpec(r=8, alpha=16, steps=800, batch_size=32, lr=3e-3),
    general_steps=1000,
    n_expert=600,
    n_router=480,
    n_router_eval=96,
    n_test=240,
    router_epochs=20,
    router_lr=3e-2,
    lam=LAMBDA,
    learn_lambda=True,
    placement=PLACEMENT,
)

# Same base, placement and expert lr as the quick profile; every suite intent (a third functional expert),
# more data, a larger held-out set. How the base size and the router budget were chosen: docs/DEMO_NOTES.md.
DEFAULT = Profile(
    name="default",
    suite=tasks.DEFAULT_SUITE,
    base=QUICK.base,
    expert=QUICK.expert,
    general_steps=1400,
    n_expert=1000,
    n_router=1080,
    n_router_eval=180,
    n_test=540,
    router_epochs=20,
    router_seeds=3,
    router_lr=3e-2,
    lam=LAMBDA,
    learn_lambda=True,
    placement=PLACEMENT,
    layouts=LAYOUTS,
)


def real_model_profile(profile: Profile) -> Profile:
    """A real base model (hundreds of millions of weights) on a CPU: fewer, smaller steps."""
    return replace(
        profile,
        expert=replace(profile.expert, steps=min(profile.expert.steps, 60), batch_size=8),
        general_steps=min(profile.general_steps, 120),
        n_router=min(profile.n_router, 96),
        n_router_eval=min(profile.n_router_eval, 24),
        n_test=min(profile.n_test, 48),
        router_epochs=1,
        router_batch=8,
        router_seeds=1,
        layouts=(),
        placement=None,
    )  # the block placement is for the demo's 3-block base; full depth here


class Steps:
    """Records each step's time and its equivalent command line, printing both."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.records: list[dict] = []

    def command(self, *argv: str) -> str:
        line = "atmoe-reg --home " + shlex.quote(str(self.home)) + " " + " ".join(shlex.quote(a) for a in argv)
        console.print(f"[dim]$ {line}[/]", highlight=False, soft_wrap=True)
        return line

    def note(self, text: str) -> None:
        console.print(f"[dim]# {text}[/]", highlight=False, soft_wrap=True)

    def timed(self, name: str, started: float, **extra) -> None:
        self.records.append({"step": name, "seconds": round(time.perf_counter() - started, 2), **extra})


@dataclass
class DemoRun:
    """The state the demo's steps share, filled in as they run (each step's outputs, by name)."""

    profile: Profile
    seed: int
    out: Path
    work: Path
    home: Path
    steps: Steps
    base_model: str | None  # the user's --base-model, None for the tiny base built here
    files: dict[str, Path] = field(default_factory=dict)
    splits: tasks.Splits | None = None
    base_ref: str = ""
    base_info: dict = field(default_factory=dict)
    base: Any = None
    base_tokenizer: Any = None
    registry: Any = None
    known_groups: set[str] = field(default_factory=set)
    experts_info: dict[str, dict] = field(default_factory=dict)
    expert_dirs: dict[str, Path] = field(default_factory=dict)
    train_config: Any = None
    trained: dict[str, list] = field(default_factory=dict)
    tokenizer: Any = None
    router_info: dict[str, dict] = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)
    layout_runs: dict[str, list] = field(default_factory=dict)
    layout_info: dict[str, dict] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    router_kinds: dict = field(default_factory=dict)


def run_demo(
    out: Path, *, quick: bool = False, home: Path | None = None, base_model: str | None = None, seed: int = 0
) -> dict:
    """Run the whole demo; write OUT/report.json, OUT/report.md and OUT/routing_heatmap.png.

    The steps, in order: ``task_suite``, ``base_model_step``, ``experts_step``, ``routers_step``,
    ``router_kinds_step`` (``router_kinds.py``), ``group_layouts_step``, ``evaluation_step``, then
    ``write_report``.
    """
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    # the demo draws its own progress bars; transformers' per-file ones and PEFT's deprecation
    # notice about transformers internals would only bury them
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    started_all = time.perf_counter()
    profile = QUICK if quick else DEFAULT
    if base_model:
        profile = real_model_profile(profile)
    profile = replace(profile, seed=seed)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    (work / "data").mkdir(parents=True, exist_ok=True)
    home = Path(home).resolve() if home else Path(tempfile.mkdtemp(prefix="atmoe-demo-home-"))
    run = DemoRun(profile=profile, seed=seed, out=out, work=work, home=home, steps=Steps(home), base_model=base_model)
    console.rule(f"atmoe-reg demo ({profile.name} profile)")
    run.steps.note(f"registry home (SQLite + blob store): {home}; outputs: {out}")
    try:
        from atmoe.demo.router_kinds import router_kinds_step

        steps = (task_suite, base_model_step, experts_step, routers_step, router_kinds_step, group_layouts_step,
                 evaluation_step)  # fmt: skip
        for step in steps:
            step(run)
    finally:
        if run.registry is not None:
            run.registry.close()
    return write_report(run, total_seconds=round(time.perf_counter() - started_all, 1))


def task_suite(run: DemoRun) -> None:
    """1. The task suite: expert, router, validation and held-out splits, written as JSONL."""
    t = time.perf_counter()
    profile = run.profile
    run.splits = splits = tasks.build_splits(
        profile.suite,
        n_expert=profile.n_expert,
        n_router=profile.n_router,
        n_router_eval=profile.n_router_eval,
        n_test=profile.n_test,
        seed=run.seed,
    )
    run.files = _write_data(run.work / "data", splits)
    run.steps.note(
        f"task suite: groups {dict(profile.suite.groups)}; N_M={profile.suite.n_max}; "
        f"{len(splits.router_train)} composite training, {len(splits.test)} held-out composite instructions"
    )
    run.steps.timed("task suite", t)


def base_model_step(run: DemoRun) -> None:
    """2. The base model: the user's, or a tiny Llama and tokenizer pre-trained here."""
    t = time.perf_counter()
    if run.base_model:
        from atmoe.loading import model_reference

        run.base_ref = model_reference(run.base_model)
        run.base_info = {"reference": run.base_ref, "pretrained_here": False}
        run.steps.note(f"base model: {run.base_ref} (used as given, no pre-training)")
    else:
        from atmoe.demo.base import make_base

        base_dir = run.work / "base"
        run.steps.note(
            "base model: a tiny LlamaForCausalLM and a WordLevel tokenizer trained here with `tokenizers`, "
            "pre-trained on generic text and the neutral echo instruction; "
            "save_pretrained -> " + str(base_dir)
        )
        run.base_info = make_base(base_dir, run.profile.suite, run.profile.base, seed=run.seed)
        run.base_ref = str(base_dir)
        run.base_info.update({"reference": run.base_ref, "pretrained_here": True, "spec": asdict(run.profile.base)})
    run.steps.timed("base model", t)


def experts_step(run: DemoRun) -> None:
    """3. Experts through PEFT (one per intent, and the general one), then add-expert each."""
    from atmoe.demo.experts import train_lora
    from atmoe.loading import load_base_model
    from atmoe.registry.registry import Registry

    profile, steps, splits, files = run.profile, run.steps, run.splits, run.files
    assert splits is not None
    # loaded once (about 20 s for a GGUF model): every expert trains on a copy, every baseline evaluates on one
    run.base, run.base_tokenizer = load_base_model(run.base_ref)
    run.registry = registry = Registry.open(home=run.home)
    run.known_groups = {g.name for g in registry.groups()}
    for group in (*tasks.GROUP_ORDER, "general"):
        if group not in run.known_groups:
            registry.add_group(group)
            steps.command("groups", "--add", group)
    t = time.perf_counter()
    for group, names in profile.suite.groups.items():
        for name in names:
            run.expert_dirs[name] = run.work / "experts" / name
            spec = profile.expert_spec(group)
            where = "" if spec.layers is None else f", layers_to_transform={list(spec.layers)}, layers_pattern='layers'"
            steps.note(
                f"PEFT: get_peft_model(base, LoraConfig(r={spec.r}, lora_alpha={spec.alpha}, "
                f"target_modules=all linears{where})) lr {spec.lr} on {files['expert_' + name].name} "
                "-> save_pretrained"
            )
            info = train_lora(
                run.base,
                run.base_tokenizer,
                splits.expert_train[name],
                run.expert_dirs[name],
                spec,
                seed=run.seed,
                label=f"expert {name}",
            )
            info.update({"group": group, "layers": None if spec.layers is None else list(spec.layers), "lr": spec.lr})
            info.update(
                _add_expert(registry, steps, run.expert_dirs[name], name, group, run.base_ref, files["expert_" + name])
            )
            run.experts_info[name] = info
    run.expert_dirs["general"] = run.work / "experts" / "general"
    steps.note("PEFT: the pre-merged general expert, trained on all single-intent data")
    general_spec = replace(profile.expert, steps=profile.general_steps)
    info = train_lora(
        run.base,
        run.base_tokenizer,
        splits.general_train(),
        run.expert_dirs["general"],
        general_spec,
        seed=run.seed,
        label="expert general",
    )
    info.update({"group": "general", "layers": None, "lr": general_spec.lr})
    info.update(
        _add_expert(registry, steps, run.expert_dirs["general"], "general", "general", run.base_ref, files["general"])
    )
    run.experts_info["general"] = info
    steps.timed("experts (PEFT) + add-expert", t)


def routers_step(run: DemoRun) -> None:
    """4. The three router designs: compose each, then train-router on it (router_seeds runs)."""
    from atmoe.config import TrainConfig

    profile, steps, registry = run.profile, run.steps, run.registry
    variants = {
        "atmoe": {"name": "demo-atmoe", "router": "grouped", "shared_router": False},
        "flat_router": {"name": "demo-flat", "router": "flat", "shared_router": False},
        "shared_router": {"name": "demo-shared", "router": "grouped", "shared_router": True},
    }
    run.train_config = TrainConfig(
        epochs=profile.router_epochs,
        lr=profile.router_lr,
        batch_size=profile.router_batch,
        max_length=128,
        seed=run.seed,
        device="cpu",
        routing_loss_weight=profile.routing_loss_weight,
        schedule="cosine",
        warmup_ratio=0.05,
    )
    groups_arg = ",".join(tasks.GROUP_ORDER)
    t = time.perf_counter()
    for method, v in variants.items():
        argv = [
            "compose",
            "--name",
            v["name"],
            "--groups",
            groups_arg,
            "--general",
            "general",
            "--lambda",
            str(profile.lam),
        ]
        if profile.learn_lambda:
            argv.append("--learn-lambda")
        if v["router"] == "flat":
            argv += ["--router", "flat"]
        if v["shared_router"]:
            argv.append("--shared-router")
        steps.command(*argv)
        record, _ = registry.compose(
            name=v["name"],
            groups=list(tasks.GROUP_ORDER),
            general="general",
            lam=profile.lam,
            learn_lambda=profile.learn_lambda,
            router=v["router"],
            shared_router=v["shared_router"],
            description=f"atmoe-reg demo: {method}",
        )
        run.trained[method], run.tokenizer, runs = _train_routers(
            registry,
            steps,
            record.ref,
            run.files["router_train"],
            run.files["router_eval"],
            run.train_config,
            profile.router_seeds,
            f"atmoe-reg demo ({profile.name}): {method}",
        )
        # the first run's router is the one the route/generate commands and the heatmap show
        run.router_info[method] = {
            "composition": record.ref,
            "routers": runs,
            "router": runs[0]["router"],
            "n_groups": record.n_groups,
            "n_max": record.n_max,
        }
    steps.timed(f"compose + train-router x{3 * profile.router_seeds}", t)


def group_layouts_step(run: DemoRun) -> None:
    """4b. Group layouts (default profile): the same experts grouped otherwise, same recipe."""
    profile, steps, registry, splits = run.profile, run.steps, run.registry, run.splits
    run.layouts = {name: make_layout(name, profile.suite.groups) for name in profile.layouts}
    t = time.perf_counter()
    for name, layout in run.layouts.items():
        steps.note(
            f"group layout {name} ({LAYOUT_LABELS[name]}): the same adapters registered again "
            "under this layout's names and groups (new catalog rows, the same blobs)"
        )
        for group, members in layout.groups.items():
            if group not in run.known_groups:
                registry.add_group(group)
                run.known_groups.add(group)
                steps.command("groups", "--add", group)
            for member in members:
                source = layout.source[member]
                _add_expert(
                    registry,
                    steps,
                    run.expert_dirs[source],
                    member,
                    group,
                    run.base_ref,
                    run.files["expert_" + source],
                    kind=run.experts_info[source]["group"],
                    intent=source,
                )
        data = {}
        for key in ("router_train", "router_eval"):
            data[key] = run.work / "data" / f"{key}.{name}.jsonl"
            tasks.write_jsonl(data[key], [layout.rename(ex) for ex in getattr(splits, key)])
        composition = f"demo-{layout.name.replace('_', '-')}"
        argv = ["compose", "--name", composition, "--groups", ",".join(layout.groups), "--general", "general",
                "--lambda", str(profile.lam)]  # fmt: skip
        steps.command(*argv, *(["--learn-lambda"] if profile.learn_lambda else []))
        record, _ = registry.compose(
            name=composition,
            groups=list(layout.groups),
            general="general",
            lam=profile.lam,
            learn_lambda=profile.learn_lambda,
            description=f"atmoe-reg demo: group layout {name}",
        )
        run.layout_runs[name], _, runs = _train_routers(
            registry,
            steps,
            record.ref,
            data["router_train"],
            data["router_eval"],
            run.train_config,
            profile.router_seeds,
            f"atmoe-reg demo ({profile.name}): group layout {name}",
        )
        run.layout_info[name] = {
            "composition": record.ref,
            "routers": runs,
            "n_groups": record.n_groups,
            "n_max": record.n_max,
            "groups": {g: list(v) for g, v in layout.groups.items()},
            "data": {k: str(v) for k, v in data.items()},
        }
    if run.layouts:
        steps.timed(f"group layouts: compose + train-router x{len(run.layouts) * profile.router_seeds}", t)


def evaluation_step(run: DemoRun) -> None:
    """5. Every method on the held-out instructions, the layouts, the temperature sweep, the
    diagnostics, and the routing heatmap."""
    from atmoe.demo import evaluate as ev
    from atmoe.report import heatmap_png

    profile, steps, splits, tokenizer = run.profile, run.steps, run.splits, run.tokenizer
    assert splits is not None
    t = time.perf_counter()
    results, extra = ev.evaluate_methods(run.base, run.expert_dirs, run.trained, tokenizer, splits, console=console)
    routing = {m: results[m].pop("routing_accuracy") for m in run.trained}
    group_layouts = {}
    if run.layouts:
        atmoe_runs = {k: v for k, v in extra["atmoe"].items() if k != "samples"}
        group_layouts["intent_groups"] = {
            **results["atmoe"],
            "routing_accuracy": routing["atmoe"],
            **atmoe_runs,
            "composition": run.router_info["atmoe"]["composition"],
            "routers": run.router_info["atmoe"]["routers"],
            "n_groups": run.router_info["atmoe"]["n_groups"],
            "n_max": run.router_info["atmoe"]["n_max"],
            "groups": {g: list(v) for g, v in profile.suite.groups.items()},
        }
        scored = ev.evaluate_layouts(run.layout_runs, run.layouts, tokenizer, splits.test, profile.suite.groups)
        for name, info in run.layout_info.items():
            group_layouts[name] = {**scored[name], **info}
    first = run.trained["atmoe"][0]
    sweep = ev.temperature_sweep(first, tokenizer, splits.test, TEMPERATURES, trained_temperature=1.0, console=console)
    diagnostics = {
        "expert_own_task": ev.expert_own_accuracy(run.base, tokenizer, run.expert_dirs, splits),
        "oracle_routing_atmoe": ev.oracle_routing(first, tokenizer, splits.test),
        "forced_intended_full": ev.oracle_routing(first, tokenizer, splits.test, weight=1.0),
    }
    steps.timed("evaluation", t)
    examples = ev.heatmap_examples(splits.test, profile.suite)
    heatmap = run.out / "routing_heatmap.png"
    routings = ev.example_routings(first, tokenizer, examples)
    heatmap_png(
        {f"{ex['prompt']} -> {ans}": r for ex, (r, ans) in zip(examples, routings)},
        str(heatmap),
        title="AT-MoE routing per block (held-out composite instructions)",
    )
    for ex in examples[:1]:
        router = run.router_info["atmoe"]["router"]
        steps.command("route", router, ex["prompt"], "--plot", str(run.out / "route.png"))
        steps.command("generate", router, ex["prompt"], "--max-new-tokens", "12")
    run.evaluation = {"results": results, "extra": extra, "routing": routing, "group_layouts": group_layouts,
                      "sweep": sweep, "diagnostics": diagnostics, "heatmap": heatmap}  # fmt: skip


def write_report(run: DemoRun, *, total_seconds: float) -> dict:
    """6. report.json and report.md, every sentence computed from this run."""
    from atmoe.demo.report import verdict, write_markdown

    evaluation = run.evaluation
    results, routing = evaluation["results"], evaluation["routing"]
    report = {
        "methods": {m: {"eval_loss": results[m]["eval_loss"], "accuracy": results[m]["accuracy"]} for m in METHODS},
        "routing_accuracy": routing["atmoe"],
        "temperature_sweep": evaluation["sweep"],
        "routing_accuracy_by_method": routing,
        "group_layouts": evaluation["group_layouts"],
        "router_kinds": run.router_kinds,
        "method_details": evaluation["extra"],
        "diagnostics": evaluation["diagnostics"],
        "verdict": None,
        "profile": _jsonable(asdict(run.profile)),
        "base_model": run.base_info,
        "experts": run.experts_info,
        "routers": run.router_info,
        "data": {k: {"path": str(v), "sha256": tasks.digest(_read_jsonl(v))} for k, v in run.files.items()},
        "home": str(run.home),
        "heatmap": str(evaluation["heatmap"]),
        "commands": [r for r in run.steps.records],
        "timings": {r["step"]: r["seconds"] for r in run.steps.records},
        "total_seconds": total_seconds,
        "environment": _environment(),
    }
    report["verdict"] = verdict(report)
    (run.out / "report.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    write_markdown(report, run.out / "report.md")
    return report


def _train_routers(
    registry, steps: Steps, ref: str, data: Path, eval_data: Path, config, seeds: int, notes: str
) -> tuple[list, object, list[dict]]:
    """Train ``seeds`` routers of composition ``ref`` (seeds config.seed, config.seed + 1, ...), each
    recorded as a router version; returns (their models, the tokenizer, one record per run)."""
    models, runs, tokenizer = [], [], None
    for run in range(seeds):
        run_config = replace(config, seed=config.seed + run)
        steps.command(
            "train-router",
            ref,
            "--data",
            str(data),
            "--eval",
            str(eval_data),
            "--epochs",
            str(run_config.epochs),
            "--lr",
            str(run_config.lr),
            "--batch-size",
            str(run_config.batch_size),
            "--max-length",
            str(run_config.max_length),
            "--routing-loss-weight",
            str(run_config.routing_loss_weight),
            "--schedule",
            run_config.schedule,
            "--warmup-ratio",
            str(run_config.warmup_ratio),
            "--seed",
            str(run_config.seed),
            "--device",
            "cpu",
        )
        result = registry.train_router(
            ref,
            data=data,
            eval_data=eval_data,
            config=run_config,
            console=console,
            notes=f"{notes}, seed {run_config.seed}",
        )
        models.append(result.built.model)
        tokenizer = result.built.tokenizer
        runs.append({"router": result.record.ref, "seed": run_config.seed, "metrics": dict(result.record.metrics)})
    return models, tokenizer, runs


def _add_expert(
    registry,
    steps: Steps,
    path: Path,
    name: str,
    group: str,
    base_ref: str,
    data_file: Path,
    *,
    kind: str | None = None,
    intent: str | None = None,
) -> dict:
    """add-expert ``path`` as ``name`` in ``group``. ``kind`` (default ``group``) is the suite group the
    expert serves and ``intent`` (default ``name``) its intent word: a domain or style expert gets it as
    its domain or style facet, whatever name and group a layout gives it."""
    kind, intent = kind or group, intent or name
    serves = kind if intent == name else f"{kind} {intent}"
    description = f"demo expert '{name}' ({serves}), PEFT LoRA on {data_file.name}"
    argv = [
        "add-expert",
        str(path),
        "--name",
        name,
        "--group",
        group,
        "--base-model",
        base_ref,
        "--description",
        description,
        "--tag",
        "source=atmoe-demo",
    ]
    facet = {}
    if kind in ("domain", "style"):
        facet[kind] = intent
        argv += [f"--{kind}", intent]
    steps.command(*argv)
    expert, created = registry.add_expert(
        path,
        name=name,
        group=group,
        base_model=base_ref,
        description=description,
        tags={"source": "atmoe-demo"},
        source="atmoe-reg demo",
        **facet,
    )
    return {"ref": expert.ref, "digest": expert.digest, "created": created}


def _write_data(folder: Path, splits: tasks.Splits) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for name, data in splits.expert_train.items():
        files["expert_" + name] = folder / f"expert_{name}.jsonl"
        tasks.write_jsonl(files["expert_" + name], data)
    files["general"] = folder / "general.jsonl"
    tasks.write_jsonl(files["general"], splits.general_train())
    for key in ("router_train", "router_eval", "test"):
        files[key] = folder / f"{key}.jsonl"
        tasks.write_jsonl(files[key], getattr(splits, key))
    return files


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _environment() -> dict:
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def _jsonable(value):
    """Tuples to lists and non-finite floats to None, so report.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
