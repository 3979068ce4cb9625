"""``atmoe-reg serve``: the OpenAI API over the catalog, checked with the official ``openai`` client
against uvicorn on 127.0.0.1 (see ``serve_fixtures.py`` for the catalog and the server).

Answers are compared with the composition built on its own by the registry and decoded by
transformers' ``generate`` (greedy): the server's batch, its KV cache handling and its per-row
routing must change nothing. Every error case gets OpenAI's error JSON with its status, and the
server keeps serving after each.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_fixtures as fixtures  # noqa: E402

openai = pytest.importorskip("openai")

# examples per operation for schemathesis (ATMOE_FUZZ_EXAMPLES=200 for a longer hunt)
FUZZ_EXAMPLES = int(os.environ.get("ATMOE_FUZZ_EXAMPLES", "12"))
PROMPTS = [
    "fa da sa x1 x2",
    "fb db sa x3",
    "fa db x5 x6 x7 x8 x9 x10",
    "x11",
    "fb da sa x12 x13 x14 x15 x16 x17 x18 x19 x20",
]


@pytest.fixture(scope="module")
def catalog(serve_catalog) -> fixtures.Catalog:
    return serve_catalog


@pytest.fixture(scope="module")
def server(catalog):
    yield from fixtures.serving(
        catalog, ["medqa:prod"], api_key=fixtures.API_KEY, max_batch=8, max_wait_ms=20, max_tokens=64, max_models=1,
        max_queue=64, max_body_bytes=64 * 1024,
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=fixtures.API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(catalog):
    """The composition built apart from the server, and greedy answers by transformers' generate."""
    registry = catalog.registry()
    built = registry.build("medqa:prod")
    registry.close()
    model, tokenizer = built.model, built.tokenizer

    def answer(ids: list[int], max_tokens: int, force: dict | None = None) -> str:
        prompt = torch.tensor([ids])
        with model.forced_routing(force) if force else nullcontext(), torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)

    def route(text: str, force: dict | None = None) -> dict:
        from atmoe.inspect import route_prompt

        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with model.forced_routing(force) if force else nullcontext(), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            del route_prompt
            from atmoe.report import summarize

            return summarize(model.last_routing())

    answer.tokenizer = tokenizer  # type: ignore[attr-defined]
    answer.route = route  # type: ignore[attr-defined]
    return answer


def ids_of(reference, text: str) -> list[int]:
    return list(reference.tokenizer(text)["input_ids"])


def post(server, path: str, body, *, key: str | None = fixtures.API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(server.url + path, json=body, headers=headers, **kwargs)


def assert_close_routing(got: dict, expected: dict) -> None:
    for kind in ("groups", "experts"):
        assert list(got[kind]) == list(expected[kind])
        for name, weight in expected[kind].items():
            assert got[kind][name] == pytest.approx(weight, abs=1e-5), (kind, name)


# -- the OpenAI surface -------------------------------------------------------------------------------


def test_health_and_models_list_the_catalog(server, client):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and [m["key"] for m in health["models"]] == ["medqa@1:1"]
    cards = {card.id: card for card in client.models.list().data}
    assert {"medqa@1", "medqa:prod", "narrow@1", "remote@1"} <= set(cards)
    prod = cards["medqa:prod"].model_extra["atmoe"]
    assert prod["key"] == "medqa@1:1" and prod["loaded"] is True
    assert prod["aliases"] == {"prod": "medqa@1:1"} and prod["routers"][0]["kind"] == "trained"
    assert client.models.retrieve("medqa:prod").id == "medqa:prod"


def test_completion_equals_generate_and_carries_routing_and_lineage(client, reference):
    for text in PROMPTS:
        answer = client.completions.create(model="medqa:prod", prompt=text, max_tokens=6, temperature=0)
        assert answer.choices[0].text == reference(ids_of(reference, text), 6)
        assert answer.choices[0].finish_reason in ("length", "stop")
        atmoe = answer.model_extra["atmoe"]
        assert_close_routing(atmoe["routing"], reference.route(text))
        assert sum(atmoe["routing"]["experts"].values()) == pytest.approx(1.0, abs=1e-5)
        lineage = atmoe["lineage"]
        assert lineage["composition"] == "medqa@1" and lineage["router"] == "medqa@1:1"
        assert [(e["ref"], len(e["digest"])) for e in lineage["experts"]] == [
            ("fa@1", 64), ("fb@1", 64), ("da@1", 64), ("db@1", 64), ("sa@1", 64)
        ]  # fmt: skip
        assert lineage["router_digest"] and lineage["router_data_digest"] and lineage["base_model"]
        assert answer.usage.prompt_tokens == len(ids_of(reference, text))


def test_the_router_routes_prompts_apart(client):
    routings = [
        client.completions.create(model="medqa:prod", prompt=p, max_tokens=1, temperature=0).model_extra["atmoe"]
        for p in PROMPTS[:2]
    ]
    first, second = (r["routing"]["experts"] for r in routings)
    assert max(abs(first[e] - second[e]) for e in first) > 1e-3  # so the batch test below mixes routings


def test_streamed_completion_equals_the_plain_one(client):
    text = PROMPTS[2]
    plain = client.completions.create(model="medqa:prod", prompt=text, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model="medqa:prod", prompt=text, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    last = chunks[-1].model_extra["atmoe"]
    assert last["lineage"] == plain.model_extra["atmoe"]["lineage"]
    assert_close_routing(last["routing"], plain.model_extra["atmoe"]["routing"])


def test_chat_uses_the_template_streamed_or_not(client, reference):
    messages = [{"role": "user", "content": "fb da sa x4"}]
    ids = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expected = reference(ids, 7)
    answer = client.chat.completions.create(model="medqa:prod", messages=messages, max_tokens=7, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.model_extra["atmoe"]["lineage"]["router"] == "medqa@1:1"
    stream = client.chat.completions.create(
        model="medqa:prod", messages=messages, max_tokens=7, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert chunks[-1].model_extra["atmoe"]["routing"] is not None


def test_forced_weights_per_request(client, reference):
    force = {"fb": 0.5, "db": 0.3, "sa": 0.2}
    text = PROMPTS[0]
    answer = client.completions.create(
        model="medqa:prod",
        prompt=text,
        max_tokens=6,
        temperature=0,
        extra_body={"atmoe": {"force": force, "blocks": True}},
    )
    atmoe = answer.model_extra["atmoe"]
    assert atmoe["forced"] == force
    assert atmoe["routing"]["experts"] == pytest.approx({"fa": 0.0, "fb": 0.5, "da": 0.0, "db": 0.3, "sa": 0.2})
    assert atmoe["routing"]["groups"] == pytest.approx({"functional": 0.5, "domain": 0.3, "style": 0.2})
    assert len(atmoe["blocks"]) == 2 and atmoe["blocks"][0]["experts"]["fb"] == pytest.approx(0.5)
    assert answer.choices[0].text == reference(ids_of(reference, text), 6, force)
    unforced = client.completions.create(model="medqa:prod", prompt=text, max_tokens=6, temperature=0)
    assert unforced.model_extra["atmoe"]["forced"] is None


def test_sampling_is_seeded_per_request_and_stop_strings_cut(client):
    kwargs = {"model": "medqa:prod", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.5, "top_p": 0.9}
    first = client.completions.create(seed=11, n=3, **kwargs)
    again = client.completions.create(seed=11, n=3, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    greedy = client.completions.create(model="medqa:prod", prompt=PROMPTS[1], max_tokens=12, temperature=0).choices[0]
    words = greedy.text.split()
    assert len(words) >= 3
    cut = client.completions.create(
        model="medqa:prod", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[words[2]]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == greedy.text[: greedy.text.index(words[2])]


def test_several_prompts_answer_each_with_its_routing(client, reference):
    answer = client.completions.create(model="medqa:prod", prompt=PROMPTS[:3], max_tokens=4, temperature=0)
    assert [c.text for c in answer.choices] == [reference(ids_of(reference, p), 4) for p in PROMPTS[:3]]
    per_prompt = answer.model_extra["atmoe"]["prompts"]
    for routing, text in zip(per_prompt, PROMPTS[:3]):
        assert_close_routing(routing, reference.route(text))


# -- batching ---------------------------------------------------------------------------------------------


def _requests(count: int) -> list[dict]:
    rng = random.Random(3)
    words = [*fixtures.FUNCTIONAL, *fixtures.DOMAIN, *fixtures.STYLE, *fixtures.FILLER]
    made = []
    for i in range(count):
        body = {
            "model": "medqa:prod",
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 14))),
            "max_tokens": rng.randint(1, 12),
            "temperature": 0,
        }
        if i % 4 == 1:
            body["atmoe"] = {"force": {rng.choice(fixtures.FUNCTIONAL): 0.6, rng.choice(fixtures.DOMAIN): 0.4}}
        made.append(body)
    return made


def test_32_concurrent_requests_equal_one_at_a_time(server):
    bodies = _requests(32)
    alone = [post(server, "/v1/completions", body).json() for body in bodies]
    start = threading.Barrier(len(bodies))

    def together(body: dict) -> dict:
        start.wait()
        return post(server, "/v1/completions", body, timeout=120).json()

    worker = server.worker("medqa@1:1")
    before = worker.largest_batch
    with ThreadPoolExecutor(len(bodies)) as pool:
        batched = list(pool.map(together, bodies))
    assert [a["choices"][0]["text"] for a in batched] == [a["choices"][0]["text"] for a in alone]
    assert [a["choices"][0]["finish_reason"] for a in batched] == [a["choices"][0]["finish_reason"] for a in alone]
    for one, many in zip(alone, batched):
        assert_close_routing(many["atmoe"]["routing"], one["atmoe"]["routing"])
        assert many["atmoe"]["forced"] == one["atmoe"]["forced"]
    assert before <= worker.largest_batch and worker.largest_batch > 1


def test_the_worker_batches_rows_of_different_lengths_and_frees_finished_slots(server, reference):
    """Straight at the worker: 12 rows queued at once into a batch of 8; the rows with small
    max_tokens finish first and the waiting rows take their slots (continuous batching)."""
    from atmoe.serve.engine import Done, Job, Text
    from atmoe.serve.sampling import RowSampler

    worker = server.worker("medqa@1:1")
    bodies = _requests(12)
    texts: dict[int, list[str]] = {i: [] for i in range(12)}
    done = threading.Semaphore(0)
    order: list[int] = []

    def sink(i: int):
        def on_event(event) -> None:
            if isinstance(event, Text):
                texts[i].append(event.text)
            elif isinstance(event, Done):
                order.append(i)
                done.release()

        return on_event

    jobs = [
        Job(
            prompt=ids_of(reference, b["prompt"]),
            max_tokens=b["max_tokens"],
            sampler=RowSampler.create(temperature=0, top_p=1, seed=None),
            on_event=sink(i),
            force=(b.get("atmoe") or {}).get("force"),
        )
        for i, b in enumerate(bodies)
    ]
    worker.submit(jobs)
    for _ in jobs:
        done.acquire()
    for i, body in enumerate(bodies):
        force = (body.get("atmoe") or {}).get("force")
        assert "".join(texts[i]) == reference(ids_of(reference, body["prompt"]), body["max_tokens"], force)
    assert worker.largest_batch == 8
    assert set(order[8:]) & set(range(8, 12))  # some of the last four finished after others freed slots


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    worker = server.worker("medqa@1:1")
    cancelled = worker.cancelled
    body = {"model": "medqa:prod", "prompt": "fa da", "max_tokens": 64, "temperature": 0, "stream": True,
            "stop": ["never-produced"]}  # fmt: skip
    headers = {"Authorization": f"Bearer {fixtures.API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
    _wait_for(lambda: worker.cancelled > cancelled and worker.load == 0)


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(server):
    worker = server.worker("medqa@1:1")
    cancelled = worker.cancelled
    body = {"model": "medqa:prod", "prompt": "fa da", "max_tokens": 64, "temperature": 0, "stop": ["never-produced"]}
    worker.pause()  # the row waits in the queue, so the client surely leaves first
    try:
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", body, timeout=httpx.Timeout(5.0, read=0.3))
        _wait_for(lambda: worker.load == 1)
    finally:
        worker.resume()
    _wait_for(lambda: worker.cancelled > cancelled and worker.load == 0)


def _wait_for(condition) -> None:
    """Poll until ``condition()`` holds (a readiness wait: the test fails by hanging only if it never does)."""
    import time

    while not condition():
        time.sleep(0.01)


# -- errors and limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"model": "nosuch", "prompt": "x1"}, 404, "model_not_found", "no composition nosuch"),
        ({"model": "medqa:staging", "prompt": "x1"}, 404, "model_not_found", "no router alias 'staging'"),
        ({"model": "../etc", "prompt": "x1"}, 404, "model_not_found", "looks like a path"),
        (
            {"model": "medqa:prod", "prompt": "x1", "atmoe": {"force": {"zz": 1.0}}},
            400,
            "invalid_force",
            "unknown expert 'zz'",
        ),
        (
            {"model": "medqa:prod", "prompt": "x1", "atmoe": {"force": {"fa": -1}}},
            400,
            "invalid_force",
            "greater than or equal to 0",
        ),
        (
            {"model": "medqa:prod", "prompt": "x1", "atmoe": {"force": {"fa": "1"}}},
            400,
            "invalid_force",
            "valid number",
        ),
        ({"model": "medqa:prod", "prompt": "x1", "atmoe": {"forse": {}}}, 400, None, "atmoe.forse"),
        (
            {"model": "medqa:prod", "prompt": "x1 " * fixtures.MAX_POSITIONS},
            400,
            "context_length_exceeded",
            "context is 512",
        ),
        (
            {"model": "medqa:prod", "prompt": "x1 " * 500, "max_tokens": 60},
            400,
            "context_length_exceeded",
            "max_tokens asks 60",
        ),
        (
            {"model": "medqa:prod", "prompt": "x1", "max_tokens": 0},
            400,
            None,
            "max_tokens: Input should be greater than or equal to 1",
        ),
        ({"model": "medqa:prod", "prompt": "x1", "max_tokens": 10**9}, 400, None, "max_tokens must be 1..64"),
        ({"model": "medqa:prod", "prompt": [1, 2, 10**6]}, 400, None, "outside the vocabulary"),
        ({"model": "medqa:prod", "prompt": "x1", "logprobs": 2}, 400, None, "logprobs is not supported"),
        ({"model": "medqa:prod", "prompt": "x1", "frequency_penalty": 0.5}, 400, None, "are not supported"),
        ({"model": "medqa:prod", "prompt": []}, 400, None, "prompt"),
        ({"model": "medqa:prod", "prompt": "x1", "temperature": 3}, 400, None, "temperature"),
        (
            {"model": "medqa:prod", "prompt": "x1", "n": 8, "stop": ["a", "b", "c", "d", "e"]},
            400,
            None,
            "at most 4 items",
        ),
        ({"model": "medqa:prod"}, 400, None, "prompt: Field required"),
        ([1, 2], 400, None, "must be a JSON object"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, code, says):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert post(server, "/v1/completions", {"model": "medqa:prod", "prompt": "x1", "max_tokens": 1}).status_code == 200


def test_malformed_json_wrong_keys_and_large_bodies(server):
    response = post(server, "/v1/completions", b'{"model": "medqa:prod", "prompt": ')
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", {"model": "medqa:prod", "prompt": "x1"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    huge = {"model": "medqa:prod", "prompt": "x1 " * 40_000}
    response = post(server, "/v1/completions", huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    chat = post(server, "/v1/chat/completions", {"model": "medqa:prod", "messages": []})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert post(server, "/v1/nothing", {}).status_code == 404


def test_the_queue_is_bounded(server):
    worker = server.worker("medqa@1:1")
    body = {"model": "medqa:prod", "prompt": "x1", "max_tokens": 1, "n": 8}
    worker.pause()
    try:
        with ThreadPoolExecutor(9) as pool:
            futures = [pool.submit(_post_quiet, server, body) for _ in range(9)]
            _wait_for(lambda: any(f.done() for f in futures))  # the worker is paused: only a refusal returns
            refused = next(f for f in futures if f.done()).result()
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            worker.resume()
            statuses = [f.result() for f in futures]
    finally:
        worker.resume()
    assert sorted(s.status_code for s in statuses) == [200] * 8 + [429]


def _post_quiet(server, body):
    return post(server, "/v1/completions", body, timeout=60)


def test_no_download_unless_allowed(server):
    response = post(server, "/v1/completions", {"model": "remote", "prompt": "x1"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and "--allow-downloads" in error["message"]


def test_models_load_on_first_use_and_the_least_recently_used_is_unloaded(server, catalog):
    answer = post(server, "/v1/completions", {"model": "narrow", "prompt": "x1", "max_tokens": 2}).json()
    assert answer["atmoe"]["lineage"]["composition"] == "narrow@1"
    keys = [m["key"] for m in httpx.get(server.url + "/health").json()["models"]]
    assert keys == ["medqa@1:1", "narrow@1:1"]
    # --max-models 1: a second composition on demand unloads narrow (medqa was named at start and stays)
    fixtures.cli(
        *catalog.options,
        "compose",
        "--name",
        "third",
        "--groups",
        "functional,style",
        "--expert",
        "fa",
        "--expert",
        "sa",
    )
    third = post(server, "/v1/completions", {"model": "third", "prompt": "x1", "max_tokens": 2}).json()
    assert third["atmoe"]["lineage"] == {**third["atmoe"]["lineage"], "composition": "third@1", "router": None}
    assert third["atmoe"]["routing"] is not None
    keys = [m["key"] for m in httpx.get(server.url + "/health").json()["models"]]
    assert keys == ["medqa@1:1", "third@1"]


def test_an_alias_that_moves_serves_the_new_router_from_the_next_request(server, catalog):
    fixtures.cli(*catalog.options, "train-router", "medqa", "--kind", "uniform", "--alias", "even")
    answer = post(server, "/v1/completions", {"model": "medqa:even", "prompt": "fa da", "max_tokens": 1}).json()
    assert answer["atmoe"]["lineage"]["router"] == "medqa@1:2"
    assert answer["atmoe"]["routing"]["groups"] == pytest.approx({"functional": 1 / 3, "domain": 1 / 3, "style": 1 / 3})


# -- the OpenAPI schema, fuzzed -------------------------------------------------------------------------------


def test_openapi_schema_is_served(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(schema["paths"])
    model = schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert model["examples"][0] == "medqa@1:1"


def test_the_api_holds_to_its_openapi_schema(server):
    """schemathesis: for every operation, examples and generated requests (a bounded number) get
    documented statuses, content types and shapes, and never a 5xx; the key is sent, as a client would."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    headers = {"Authorization": f"Bearer {fixtures.API_KEY}"}
    for operation in operations:

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def holds(case) -> None:
            case.call_and_validate(headers=headers)

        holds()


# -- the command itself -------------------------------------------------------------------------------------


def _serve_process(catalog, *args: str):
    import subprocess

    command = [str(Path(sys.executable).with_name("atmoe-reg")), *catalog.options, "serve", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_refuses_an_unknown_reference_in_one_line(catalog):
    process = _serve_process(catalog, "nosuch:prod", "--port", str(fixtures.free_port()))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1 and out == ""
    assert err.strip().splitlines() == ["Error: no router alias 'prod' for composition nosuch"]


def test_ctrl_c_lets_a_running_stream_finish_then_stops(catalog):
    import signal

    port = fixtures.free_port()
    process = _serve_process(catalog, "medqa:prod", "--port", str(port), "--max-tokens", "400")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: process.poll() is not None or _answers(url))
        assert process.poll() is None, process.communicate()
        body = {"model": "medqa:prod", "prompt": "fa da", "max_tokens": 400, "temperature": 0, "stream": True,
                "ignore_eos": True, "stop": ["never-produced"]}  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            process.send_signal(signal.SIGINT)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(line[5:])["choices"] for line in rest[:-1]]
        assert [c[0]["finish_reason"] for c in finishes if c][-1] == "length"
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert err.strip().splitlines()[-1] == "stopped: every running request was answered"
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
