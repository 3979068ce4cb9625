"""Stored evaluations: ``eval`` scores one router on a data file and records the row; ``evals`` compares
every router of a composition on the same data (by digest).

A row holds the router it scored, the data's sha256, the number of examples, the settings that shape
the numbers (batch size, max length, new tokens), the metrics (response loss, exact match of greedy
answers, routing accuracy where the examples name intents) and the library versions. Rows are never
changed; removing a composition removes its routers' evaluations with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from atmoe.errors import UsageError
from atmoe.registry.models import Composition, Evaluation, Router
from atmoe.registry.names import parse_ref, validate_name
from atmoe.registry.records import EvaluationRecord
from atmoe.registry.routers import current_library_versions, resolve_router

if TYPE_CHECKING:
    from atmoe.registry.registry import Registry

MAX_EXAMPLES = 100_000


def evaluate_and_record(
    registry: Registry,
    ref: str,
    *,
    data: str | Path,
    batch_size: int = 8,
    max_length: int = 512,
    max_new_tokens: int | None = None,
    base_model: str | None = None,
    created_by: str | None = None,
) -> EvaluationRecord:
    """Score the router ``ref`` names (default: the composition's newest) on ``data`` and store the row.

    The data is read and checked (intents against the pinned experts) and the router resolved to its
    number before anything is built; the row is written only once every score is computed."""
    from atmoe.data import check_intents, data_digest, read_examples
    from atmoe.evaluation import score

    for name, value, low in (("--batch-size", batch_size, 1), ("--max-length", max_length, 8)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, not {value!r}")
    if max_new_tokens is not None and not 1 <= max_new_tokens <= 4096:
        raise UsageError(f"--max-new-tokens must be between 1 and 4096, not {max_new_tokens}")
    examples = read_examples(data)
    if len(examples) > MAX_EXAMPLES:
        raise UsageError(f"{data}: {len(examples)} examples; eval takes at most {MAX_EXAMPLES}")
    from atmoe.registry import events, roles

    with registry.session() as session:
        composition, router = resolve_router(session, parse_ref(ref))
        assert router is not None
        check_intents(examples, [member.expert.name for member in composition.members])
        roles.require(session, "evaluate routers")  # before any model is built
        router_ref, router_id = f"{composition.ref}:{router.number}", router.id
    built = registry.build(router_ref, base_model=base_model)
    metrics = score(
        built.model,
        built.tokenizer,
        examples,
        batch_size=batch_size,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
    )
    settings = {"batch_size": batch_size, "max_length": max_length, "max_new_tokens": metrics.pop("max_new_tokens")}
    digest = data_digest(data)

    def record(session: Session) -> EvaluationRecord:
        row = Evaluation(
            router_id=router_id,
            data_digest=digest,
            examples=len(examples),
            settings=settings,
            metrics=metrics,
            library_versions=current_library_versions(),
            created_by=created_by,
        )
        session.add(row)
        session.flush()
        events.record(session, "eval", router_ref, {"data_digest": digest, "examples": len(examples), **metrics})
        return EvaluationRecord.from_row(row)

    return registry.transact(record)


def list_evaluations(session: Session, name: str, *, data_digest: str | None = None) -> list[EvaluationRecord]:
    """Every stored evaluation of the routers of composition ``name`` (all versions), oldest first;
    only those on ``data_digest`` when given (a full sha256 or a prefix of at least 8 hex digits)."""
    validate_name(name, "composition name")
    statement = (
        select(Evaluation)
        .join(Router, Evaluation.router_id == Router.id)
        .join(Composition, Router.composition_id == Composition.id)
        .where(Composition.name == name)
        .order_by(Evaluation.id)
    )
    if data_digest is not None:
        if not (8 <= len(data_digest) <= 64 and all(c in "0123456789abcdef" for c in data_digest)):
            raise UsageError(f"--data-digest {data_digest!r}: expected at least 8 lowercase hex digits of a sha256")
        statement = statement.where(Evaluation.data_digest.startswith(data_digest))
    return [EvaluationRecord.from_row(row) for row in session.scalars(statement)]


def comparison(records: list[EvaluationRecord]) -> list[dict]:
    """One row per (data digest, router): the newest evaluation of each router on each data file,
    ordered by data, then eval loss (best first). A router evaluated twice on the same data with the
    same settings gives the same metrics, so the newest stands for all."""
    newest: dict[tuple[str, str], EvaluationRecord] = {}
    for record in records:
        newest[(record.data_digest, record.router)] = record
    rows = [record.to_dict() for record in newest.values()]
    rows.sort(key=lambda r: (r["data_digest"], r["metrics"].get("eval_loss", float("inf")), r["router"]))
    return rows
