"""Router kinds beyond training: static weights for every router design, and lorahub's search.

Every kind gives weights that sum to 1 per block (and per group inside it), padding weighted 0; lorahub
improves its objective on data made by one known expert, puts the most weight on it, is deterministic
for a seed, and is recorded and routed like any router."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_lora import invoke  # noqa: E402
from test_flow import DOMAIN, FILLER, FUNCTIONAL, STYLE, add_group_experts, run, workspace  # noqa: E402,F401  (the module's fixture)

from atmoe.config import AtmoeConfig  # noqa: E402
from atmoe.static_routing import set_static_weights  # noqa: E402


def _tiny(**config) -> object:
    from atmoe import build_atmoe
    from atmoe.testing import make_peft_adapter, make_tiny_llama

    base = make_tiny_llama(vocab=64, seed=1)
    root = Path(__import__("tempfile").mkdtemp())
    paths = {n: make_peft_adapter(base, root / n, r=2, seed=i) for i, n in enumerate(["a", "b", "c", "d"])}
    groups = {"g1": {"a": paths["a"], "b": paths["b"], "c": paths["c"]}, "g2": {"d": paths["d"]}}
    return build_atmoe(base, groups, config=AtmoeConfig(**config)).eval()


@pytest.mark.parametrize(
    "config",
    [{}, {"router": "flat"}, {"static_inside": True}, {"shared_router": True}, {"temperature": 0.5}],
    ids=["grouped", "flat", "static-inside", "shared", "tau-0.5"],
)
def test_static_weights_are_exact_for_every_router_design(config) -> None:
    model = _tiny(**config)
    wanted = {"a": 0.5, "b": 0.0, "c": 0.2, "d": 0.3}
    set_static_weights(model, wanted)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for block in model.last_routing():
        assert block["experts"] == pytest.approx(wanted, abs=1e-6)
        assert block["groups"] == pytest.approx({"g1": 0.7, "g2": 0.3}, abs=1e-6)
    set_static_weights(model, {"d": 2.0})  # normalised; a group of weight 0 splits evenly inside (any split mixes 0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for block in model.last_routing():
        assert block["experts"] == pytest.approx({"a": 0, "b": 0, "c": 0, "d": 1}, abs=1e-6)


def test_static_weights_refuse_what_is_not_a_distribution() -> None:
    from atmoe.errors import UsageError

    model = _tiny()
    for bad, message in (({"zz": 1}, "not an expert"), ({"a": -1}, ">= 0"), ({"a": 0}, "not all be 0")):
        with pytest.raises(UsageError, match=message):
            set_static_weights(model, bad)


@pytest.fixture
def composed(workspace):  # noqa: F811
    add_group_experts(workspace)
    run("compose", "--name", "medqa", "--groups", "functional,domain,style")
    return workspace


def _one_expert_data(path: Path, expert: str, count: int = 12) -> Path:
    """Examples whose answers are what the composition says with ``expert`` alone at full weight."""
    from atmoe.registry import Registry

    with Registry.open() as registry:
        built = registry.build("medqa", router=False)
    rng = random.Random(3)
    lines = []
    for _ in range(count):
        prompt = " ".join([rng.choice(FUNCTIONAL), rng.choice(DOMAIN), *rng.sample(FILLER, 2)])
        ids = torch.tensor([built.tokenizer(prompt)["input_ids"]])
        with built.model.forced_routing({expert: 1.0}), torch.no_grad():
            out = built.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        response = built.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() or "x0"
        lines.append(json.dumps({"prompt": prompt, "response": response}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lorahub_finds_the_expert_that_made_the_data_and_is_recorded_as_a_router(composed, tmp_path) -> None:
    data = _one_expert_data(tmp_path / "db.jsonl", "db")
    search = ("train-router", "medqa", "--kind", "lorahub", "--data", str(data), "--budget", "30", "--json")
    first = json.loads(run(*search, "--alias", "hub"))
    assert first["kind"] == "lorahub" and first["ref"] == "medqa@1:1" and first["data_digest"]
    weights = first["hyperparameters"]["weights"]
    assert sum(weights.values()) == pytest.approx(1.0) and max(weights, key=weights.get) == "db"
    metrics = first["metrics"]
    assert metrics["objective"] < metrics["uniform_objective"]  # improved on the uniform start
    assert metrics["train_loss"] < metrics["uniform_train_loss"]
    assert metrics["history"] == sorted(metrics["history"], reverse=True)  # best-so-far never rises
    again = json.loads(run(*search))  # same data, budget, penalty and seed: same weights
    assert again["hyperparameters"]["weights"] == weights and again["ref"] == "medqa@1:2"

    routed = json.loads(run("route", "medqa:hub", "fa da w1 w2", "--json"))
    for block in routed["blocks"]:  # a static router: the recorded weights in every block, any prompt
        assert block["experts"] == pytest.approx(weights, abs=1e-5)
        for group, members in (("functional", FUNCTIONAL), ("domain", DOMAIN), ("style", STYLE)):
            assert block["groups"][group] == pytest.approx(sum(weights[m] for m in members), abs=1e-5)


def test_lorahub_bad_input_is_one_line_and_records_nothing(composed, tmp_path, snapshot) -> None:
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": "fa", "response": "x"}) + "\n" for _ in range(4)))
    enough = tmp_path / "enough.jsonl"
    enough.write_text("".join(json.dumps({"prompt": "fa", "response": "x"}) + "\n" for _ in range(6)))
    before = snapshot()
    cases = [
        (("train-router", "medqa", "--kind", "lorahub"), "needs --data"),
        (
            ("train-router", "medqa", "--kind", "lorahub", "--data", str(few)),
            "4 examples; --kind lorahub searches on 5 to 50",
        ),
        (("train-router", "medqa", "--kind", "lorahub", "--data", str(enough), "--budget", "0"), "--budget"),
        (("train-router", "medqa", "--kind", "lorahub", "--data", str(enough), "--l1", "-1"), "--l1"),
        (("train-router", "medqa", "--kind", "uniform", "--budget", "5"), "options of --kind lorahub"),
        (("train-router", "medqa:1", "--kind", "lorahub", "--data", str(enough)), "names a router"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert snapshot() == before, args


def test_prompt_init_starts_the_routers_where_each_experts_prompts_point(composed) -> None:
    from atmoe.data import collate, read_examples
    from atmoe.prompt_init import init_from_prompts
    from atmoe.registry import Registry
    from atmoe.training import _encode_all, evaluate

    with Registry.open() as registry:
        built = registry.build("medqa", router=False)
    model, tokenizer = built.model, built.tokenizer
    examples = read_examples(composed["train"])
    index = {name: i for i, name in enumerate(model.expert_names)}
    encoded = _encode_all(tokenizer, examples, 512)
    batches = [collate(encoded[i : i + 16], pad_token_id=0, expert_index=index) for i in range(0, len(encoded), 16)]
    with torch.no_grad(), model.calibrating_router_inputs():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    uniform = evaluate(model, tokenizer, examples)["routing_accuracy"]
    counts = init_from_prompts(model, batches)
    assert counts == {name: sum(name in e.intents for e in examples) for name in model.expert_names}
    started = evaluate(model, tokenizer, examples)["routing_accuracy"]
    assert started > uniform + 0.2  # the routers start pointing at the intended experts, before any step


def test_train_router_init_prompts_is_recorded_and_refused_on_a_warm_start(composed) -> None:
    trained = json.loads(
        run("train-router", "medqa", "--data", str(composed["train"]), "--init", "prompts", "--epochs", "1", "--json")
    )
    assert trained["kind"] == "trained" and trained["hyperparameters"]["init"] == "prompts"
    assert trained["metrics"]["init_examples"]["sa"] == 96  # every example names the one style expert
    result = invoke("train-router", "medqa:1", "--data", str(composed["train"]), "--init", "prompts")
    assert result.exit_code == 2 and "--init prompts starts the routers afresh" in result.stderr


# -- arrow ---------------------------------------------------------------------------------------------------


def _explicit_top_vector(model, block: int, column: int, general: int | None = None) -> torch.Tensor:
    """The top right singular vector of the block's stacked updates, by a full SVD of the explicit matrix."""
    from atmoe.layer import MixtureLoraLinear

    def delta(layer, col):
        rows = (layer.rank_column == col).nonzero().flatten()
        return (layer.B_cat[:, rows].double() * layer.rank_scale[rows].double()) @ layer.A_cat[rows].double()

    stacked = []
    for layer in model._routings[block].layers:
        if isinstance(layer, MixtureLoraLinear) and layer.in_features == model.hidden_size:
            if (layer.rank_column == column).any():
                update = delta(layer, column)
                if general is not None:
                    update = update - delta(layer, general)
                stacked.append(update)
    return torch.linalg.svd(torch.cat(stacked, 0))[2][0]


@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "gks"])
def test_arrow_prototypes_are_the_top_right_singular_vectors_of_the_block_updates(gks) -> None:
    from atmoe import build_atmoe
    from atmoe.arrow import expert_prototypes
    from atmoe.testing import make_peft_adapter, make_tiny_llama

    base = make_tiny_llama(vocab=64, seed=1)
    root = Path(__import__("tempfile").mkdtemp())
    paths = {n: make_peft_adapter(base, root / n, r=2 + i, seed=i) for i, n in enumerate(["a", "b", "g"])}
    model = build_atmoe(base, {"x": {"a": paths["a"], "b": paths["b"]}}, general=paths["g"]).eval()
    for name in ("a", "b"):
        prototypes = expert_prototypes(model, name, gks=gks)
        for block in range(model.num_blocks):
            wanted = _explicit_top_vector(model, block, model.expert_names.index(name), 2 if gks else None)
            assert abs(float(prototypes[block].double() @ wanted)) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(expert_prototypes(model, "a", gks=gks), expert_prototypes(model, "a", gks=gks))


@pytest.mark.parametrize("config", [{}, {"router": "flat"}, {"routing": "token"}], ids=["grouped", "flat", "token"])
def test_arrow_weights_are_a_distribution_with_top_k_per_group(config) -> None:
    from atmoe.arrow import expert_prototypes

    model = _tiny(**config)
    prototypes = torch.stack([expert_prototypes(model, name) for name in model.expert_names], 1)
    model.use_arrow_routers(prototypes, top_k=1, temperature=0.5)
    ids = torch.randint(0, 64, (3, 6))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for group_w, weights in model.last_routing_tensors():
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6)
        if config.get("router") == "flat":
            assert ((weights > 0).sum(-1) == 1).all()  # top-1 over all experts
        else:
            assert torch.allclose(group_w, torch.full_like(group_w, 0.5))  # equal group shares
            inside = weights[..., :3]  # group g1 holds a, b, c: top-1 inside it
            assert ((inside > 0).sum(-1) == 1).all() and torch.allclose(
                weights[..., 3], torch.full_like(weights[..., 3], 0.5)
            )


def test_arrow_in_two_commands_deterministic_and_cached_by_digest(composed, atmoe_home) -> None:
    made = json.loads(run("train-router", "medqa", "--kind", "arrow", "--alias", "arrow", "--json"))
    assert made["kind"] == "arrow" and made["data_digest"] is None
    assert made["metrics"]["prototypes_computed"] == 5 and made["metrics"]["prototypes_cached"] == 0
    routed = json.loads(run("route", "medqa:arrow", "fa da w1 w2", "--json"))
    for block in routed["blocks"]:
        assert sum(block["experts"].values()) == pytest.approx(1.0, abs=1e-5)
        assert all(share == pytest.approx(1 / 3, abs=1e-5) for share in block["groups"].values())
    again = json.loads(run("train-router", "medqa", "--kind", "arrow", "--json"))
    assert again["metrics"]["prototypes_cached"] == 5  # keyed by each expert's digest: nothing recomputed
    assert again["blob_digest"] == made["blob_digest"]  # the same router, byte for byte
    for entry in (atmoe_home / "store" / "derived" / "arrow").glob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:-8] + b"\0" * 8)  # a damaged cache entry is not trusted
    third = json.loads(run("train-router", "medqa", "--kind", "arrow", "--json"))
    assert third["metrics"]["prototypes_computed"] == 5 and third["blob_digest"] == made["blob_digest"]


def test_arrow_gks_needs_a_general_expert_and_bad_options_are_one_line(composed, snapshot) -> None:
    before = snapshot()
    cases = [
        (("train-router", "medqa", "--kind", "arrow", "--gks"), "has none: compose with --general"),
        (("train-router", "medqa", "--kind", "arrow", "--data", str(composed["train"])), "takes no --data"),
        (("train-router", "medqa", "--kind", "arrow", "--top-k", "0"), "--top-k"),
        (("train-router", "medqa", "--kind", "arrow", "--arrow-temperature", "0"), "--arrow-temperature"),
        (("train-router", "medqa", "--data", str(composed["train"]), "--gks"), "options of --kind arrow"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert snapshot() == before, args
    run("add-expert", str(composed["paths"]["gen"]), "--name", "gen", "--group", "general")
    run("compose", "--name", "medqa", "--groups", "functional,domain,style", "--general", "gen")
    made = json.loads(run("train-router", "medqa@2", "--kind", "arrow", "--gks", "--json"))
    assert made["kind"] == "arrow+gks" and made["hyperparameters"]["gks"] is True
    assert json.loads(run("route", "medqa@2:1", "fa db", "--json"))["blocks"]
