"""train-router: read and check the data, build the composition, train, then record the router.

Nothing is written until training has finished: a malformed line, an unknown intent or an altered
blob stops the run with the catalog unchanged. The router blob goes into the store first and the
Router row (with its data digests, hyperparameters, metrics and library versions) is committed after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from atmoe.errors import UsageError
from atmoe.registry.build import Built, router_bytes
from atmoe.registry.compositions import get_composition
from atmoe.registry.names import parse_ref
from atmoe.registry.records import RouterRecord
from atmoe.registry.routers import check_alias_move, record_router, resolve_router, router_record, set_alias


@dataclass
class TrainedRouter:
    record: RouterRecord  # the new router
    built: Built


def train_and_record(
    registry,
    ref: str,
    *,
    data: str | Path,
    eval_data: str | Path | None = None,
    config=None,
    alias: str | None = None,
    notes: str | None = None,
    created_by: str | None = None,
    progress: bool = True,
    console=None,
    base_model: str | None = None,
) -> TrainedRouter:
    """Train a new router for the composition ``ref`` names and record it (next number).

    ``ref`` with ``:ROUTER`` warm-starts from that router; without, the routers start uniform, so the
    same data, hyperparameters and seed give the same router.
    """
    from atmoe.data import data_digest
    from atmoe.training import TrainConfig, train_router

    config = config or TrainConfig()
    parsed = parse_ref(ref)
    if config.init == "prompts" and parsed.router is not None:
        raise UsageError(f"--init prompts starts the routers afresh: name the composition, not the router {ref!r}")
    train, evaluation = _checked_data(registry, parsed, alias, data, eval_data)
    train_digest = data_digest(data)
    eval_digest = data_digest(eval_data) if eval_data else None
    built = registry.build(ref, router=parsed.router is not None, base_model=base_model)
    result = train_router(
        built.model,
        built.tokenizer,
        train,
        evaluation,
        config,
        calibrate=built.router is None,
        progress=progress,
        console=console,
    )
    hyperparameters = config.as_dict()
    if built.router:
        hyperparameters["warm_start"] = built.router
    metrics = {**result.metrics, "history": result.history}
    return _record(registry, built, hyperparameters, metrics, train_digest, eval_digest, alias, notes, created_by)


def record_uniform(
    registry,
    ref: str,
    *,
    eval_data: str | Path | None = None,
    alias: str | None = None,
    notes: str | None = None,
    created_by: str | None = None,
    base_model: str | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> TrainedRouter:
    """Record the ``uniform`` router of ``ref``: equal weights inside each group and over groups (the
    routers' zero start, DESIGN.md section 7), no data needed. With ``eval_data`` its eval loss and
    routing accuracy are recorded, comparable to a trained router's."""
    from atmoe.data import data_digest

    parsed = _composition_ref(ref, "uniform")
    _, evaluation = _checked_data(registry, parsed, alias, None, eval_data)
    built = registry.build(ref, router=False, base_model=base_model)
    metrics = _eval_metrics(built, evaluation, batch_size, max_length)
    eval_digest = data_digest(eval_data) if eval_data else None
    return _record(registry, built, {"kind": "uniform"}, metrics, None, eval_digest, alias, notes, created_by)


def record_lorahub(
    registry,
    ref: str,
    *,
    data: str | Path,
    eval_data: str | Path | None = None,
    budget: int = 40,
    l1: float = 0.05,
    seed: int = 0,
    alias: str | None = None,
    notes: str | None = None,
    created_by: str | None = None,
    base_model: str | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> TrainedRouter:
    """Record the ``lorahub`` router of ``ref``: static per-expert weights found by a gradient-free
    search on the 5 to 50 examples of ``data`` (``atmoe/lorahub.py``)."""
    from atmoe.data import data_digest
    from atmoe.lorahub import MAX_EXAMPLES, MIN_EXAMPLES, search_weights

    parsed = _composition_ref(ref, "lorahub")
    train, evaluation = _checked_data(registry, parsed, alias, data, eval_data)
    assert train is not None
    if not MIN_EXAMPLES <= len(train) <= MAX_EXAMPLES:
        raise UsageError(
            f"{data}: {len(train)} examples; --kind lorahub searches on {MIN_EXAMPLES} to {MAX_EXAMPLES} "
            "(LoraHub's few-shot setting)"
        )
    built = registry.build(ref, router=False, base_model=base_model)
    found = search_weights(
        built.model, built.tokenizer, train, budget=budget, l1=l1, seed=seed, batch_size=batch_size,
        max_length=max_length,
    )  # fmt: skip
    metrics: dict = {
        "train_loss": found.loss,
        "objective": found.objective,
        "uniform_train_loss": found.uniform_loss,
        "uniform_objective": found.uniform_objective,
        "evaluations": found.evaluations,
        "history": found.history,
    }
    metrics.update(_eval_metrics(built, evaluation, batch_size, max_length))
    hyperparameters = {"kind": "lorahub", "budget": budget, "l1": l1, "seed": seed, "weights": found.weights}
    eval_digest = data_digest(eval_data) if eval_data else None
    return _record(registry, built, hyperparameters, metrics, data_digest(data), eval_digest, alias, notes, created_by)


def record_arrow(
    registry,
    ref: str,
    *,
    top_k: int = 3,
    temperature: float = 1.0,
    gks: bool = False,
    eval_data: str | Path | None = None,
    alias: str | None = None,
    notes: str | None = None,
    created_by: str | None = None,
    base_model: str | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> TrainedRouter:
    """Record the ``arrow`` router of ``ref`` (``arrow+gks`` with GenKnowSub): training-free, from each
    expert's prototypes (``atmoe/arrow.py``), computed once per expert digest (``prototype_cache``)."""
    import math

    import torch

    from atmoe.arrow import ALGORITHM, expert_prototypes
    from atmoe.data import data_digest
    from atmoe.registry import prototype_cache

    parsed = _composition_ref(ref, "arrow")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top-k must be an integer >= 1, not {top_k!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--arrow-temperature must be a finite number > 0, not {temperature!r}")
    _, evaluation = _checked_data(registry, parsed, alias, None, eval_data)
    with registry.session() as session:
        composition = get_composition(session, parsed)
        if gks and composition.general_expert is None:
            raise UsageError(
                f"--gks subtracts the general expert, and {composition.ref} has none: compose with --general REF"
            )
        digests = {member.expert.name: member.expert.digest for member in composition.members}
        general_digest = composition.general_expert.digest if gks and composition.general_expert else None
        base = (composition.base_model, composition.base_revision)
    built = registry.build(ref, router=False, base_model=base_model)
    model = built.model
    shape = (model.num_blocks, model.hidden_size)
    columns, cached = [], 0
    for name in model.expert_names:
        key = prototype_cache.cache_key(
            algorithm=ALGORITHM, base_model=base[0], base_revision=base[1], expert=digests[name], general=general_digest
        )
        found = prototype_cache.load(registry, key, shape)
        if found is None:
            found = expert_prototypes(model, name, gks=gks)
            prototype_cache.save(registry, key, found)
        else:
            cached += 1
        columns.append(found)
    model.use_arrow_routers(torch.stack(columns, 1), top_k=top_k, temperature=float(temperature))
    metrics: dict = {"prototypes_cached": cached, "prototypes_computed": len(columns) - cached}
    metrics.update(_eval_metrics(built, evaluation, batch_size, max_length))
    hyperparameters = {"kind": "arrow+gks" if gks else "arrow", "top_k": top_k, "temperature": float(temperature),
                       "gks": gks, "algorithm": ALGORITHM}  # fmt: skip
    eval_digest = data_digest(eval_data) if eval_data else None
    return _record(registry, built, hyperparameters, metrics, None, eval_digest, alias, notes, created_by)


def _composition_ref(ref: str, kind: str):
    """``ref`` parsed; a router kind made from the experts alone (no warm start) refuses ``:ROUTER``."""
    parsed = parse_ref(ref)
    if parsed.router is not None:
        raise UsageError(f"{ref!r} names a router; a {kind} router starts from the experts alone: name the composition")
    return parsed


def _eval_metrics(built: Built, evaluation, batch_size: int, max_length: int) -> dict:
    """{"eval_loss", "routing_accuracy" (when intents exist)} of the built router on ``evaluation``, as a
    trained router records them; {} without evaluation data."""
    from atmoe.training import evaluate

    if not evaluation:
        return {}
    scores = evaluate(built.model, built.tokenizer, evaluation, batch_size=batch_size, max_length=max_length)
    metrics = {"eval_loss": scores["loss"]}
    if "routing_accuracy" in scores:
        metrics["routing_accuracy"] = scores["routing_accuracy"]
    return metrics


def _checked_data(registry, parsed, alias, data, eval_data):
    """(train examples | None, eval examples | None), read and checked, and the alias and the role's
    rights, before any model is built: a malformed line, an intent naming no pinned expert, or a
    reader's (or a writer moving an alias) fails here."""
    from atmoe.data import check_intents, read_examples
    from atmoe.registry import roles
    from atmoe.registry.names import validate_alias

    if alias is not None:
        validate_alias(alias, "router")
    train = read_examples(data) if data is not None else None
    evaluation = read_examples(eval_data) if eval_data else None
    with registry.session() as session:
        composition, _ = resolve_router(session, parsed, required=False)
        experts = [member.expert.name for member in composition.members]
        roles.require(session, "train routers")
        if alias is not None:
            check_alias_move(session, composition.name, alias)
    for examples in (train, evaluation):
        if examples:
            check_intents(examples, experts)
    return train, evaluation


def _record(registry, built: Built, hyperparameters, metrics, train_digest, eval_digest, alias, notes, created_by):
    """Store the built model's router weights as a blob, then its row (the gc protocol), and alias it."""
    data = router_bytes(built.model, metadata={"composition": built.composition})
    blob = registry.store.put_bytes(data)

    def record(session):
        from atmoe.registry import events

        composition = get_composition(session, parse_ref(built.composition))
        router = record_router(
            session,
            composition,
            blob_digest=blob.digest,
            data_digest=train_digest,
            eval_data_digest=eval_digest,
            hyperparameters=hyperparameters,
            metrics=metrics,
            created_by=created_by,
            notes=notes,
        )
        details = {"kind": hyperparameters.get("kind", "trained"), "data_digest": train_digest,
                   "eval_data_digest": eval_digest, "warm_start": hyperparameters.get("warm_start")}  # fmt: skip
        events.record(session, "train", f"{composition.ref}:{router.number}", details)
        if alias is not None:
            set_alias(session, composition.name, alias, router)
        return router_record(session, router)

    row = registry.transact(record, blobs={blob.digest: lambda: registry.store.put_bytes(data)})
    built.router = row.ref
    return TrainedRouter(record=row, built=built)
