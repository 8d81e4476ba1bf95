"""`eetune serve` over real HTTP: uvicorn on a free loopback port, driven by httpx and the openai client.

Most checks use a tiny random untied model (4 layers, byte-level tokenizer) with three random
exits, so every decoding mode takes real, different paths; answers are compared with what the
`generate` stage and the engine produce. One check runs the real SmolLM2.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from eetune.cli import main
from eetune.config import compose_config
from eetune.exits import EarlyExitModel, ExitSpec, build_manifest, loading, save_exits
from eetune.infer import DecodeSettings, Engine
from eetune.infer.draft_vocab import save_token_counts
from eetune.models import BaseModel, get_model_entry, load_base_model
from eetune.models.tiny import build_tiny_tokenizer, write_tiny_checkpoint
from eetune.serve import BackgroundServer, ServedModel, create_app
from eetune.serve.text import TextAssembler, TokenSpeller
from eetune.stages import generate
from eetune.models import base_info
from eetune.data.chat import chat_prompt_ids

N_LAYERS = 4
EXIT_LAYERS = [1, 2, 3]
# Random exits are confident around 0.012-0.02: this threshold mixes every exit and the final layer.
MIXED_THRESHOLD = 0.016
MODES = {
    "full": {"mode": "full"},
    "early_exit": {"mode": "early_exit", "threshold": MIXED_THRESHOLD},
    "self_speculative": {"mode": "self_speculative", "draft_exit": 3, "draft_len": 3},
}
QUESTIONS = ["Hello there", "What is 2+2?", "Tell me a story", "Why is the sky blue?",
             "Name a colour", "Count to five", "Say something kind", "What is a hash table?"]


# Tiny models are all per-op overhead: one OpenMP thread is faster on two shared cores.
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(
        get_model_entry("smollm2_135m"),
        tmp_path_factory.mktemp("serve_tiny") / "checkpoint",
        seed=1,
        num_hidden_layers=N_LAYERS,
        rope_theta=100_000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )


@pytest.fixture(scope="module")
def run_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with a `layer`, an `mlp` and a `norm` exit, each with a learned estimator."""
    base = load_base_model("smollm2_135m", checkpoint_dir=tiny_dir, dtype="float32")
    torch.manual_seed(0)
    specs = [ExitSpec(1, "layer", init="random", confidence="linear"),
             ExitSpec(2, "mlp", init="random", confidence="linear"),
             ExitSpec(3, "norm", init="random", confidence="linear")]
    model = EarlyExitModel(base.model, specs)
    out = tmp_path_factory.mktemp("serve_run") / "exits"
    out.mkdir()
    save_exits(out, model, build_manifest(model, base_info(base), "augment"))
    # Token frequencies as `tune` writes them: a made-up ranking is enough for exactness checks.
    save_token_counts(out, torch.randperm(base.model.tok_embeddings.num_embeddings))
    return out


def serve_cfg(tiny_dir: Path, run_dir: Path | None, *overrides: str) -> Any:
    args = [f"model.checkpoint_dir={tiny_dir}", "serve.max_tokens=64", "serve.default_max_tokens=16", *overrides]
    if run_dir is not None:
        args.append(f"serve.run_dir={run_dir}")
    return compose_config("serve", args)


@pytest.fixture(scope="module")
def served(tiny_dir: Path, run_dir: Path) -> ServedModel:
    return ServedModel.from_config(serve_cfg(tiny_dir, run_dir, "serve.model_name=tiny"))


@pytest.fixture(scope="module")
def server(served: ServedModel) -> Iterator[BackgroundServer]:
    # Requests go through the running batch (continuous batching), one decoding group at a time.
    # Prompts join over several steps, 8 tokens a step (chunked prefill).
    with BackgroundServer(create_app(served, queue_size=16, max_batch_size=4, prefill_chunk=8)) as background:
        yield background


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def oai(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_body(question: str, mode: str = "full", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 20, "early_exit": MODES[mode], **extra}


def read_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of a server-sent event stream, [DONE] as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events


# -- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_chat_completion_equals_the_generate_stage(client, served, tiny_dir, run_dir, mode) -> None:
    body = client.post("/v1/chat/completions", json=chat_body("Tell me a story", mode)).json()

    overrides = [f"generate.{key}={value}" for key, value in MODES[mode].items()]
    cfg = compose_config("generate", [f"model.checkpoint_dir={tiny_dir}", f"generate.run_dir={run_dir}",
                                      "generate.max_new_tokens=20", *overrides])
    cfg.generate.prompt = "Tell me a story"
    expected = generate.run(cfg, out=io.StringIO())

    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert body["usage"]["completion_tokens"] == len(expected.result.tokens) == 20
    assert choice["finish_reason"] == "length"
    stats = body["early_exit"]
    assert stats["mode"] == mode
    assert stats["exit_layers"] == expected.result.exit_layers
    assert stats["mean_layers"] == pytest.approx(expected.result.mean_layers)
    assert stats["acceptance_rate"] == expected.result.acceptance_rate
    if mode == "early_exit":
        assert set(stats["exit_layers"]) == {*EXIT_LAYERS, N_LAYERS}  # the mix is real
        assert stats["threshold"] == MIXED_THRESHOLD and stats["draft_exit"] is None
    if mode == "self_speculative":
        full = client.post("/v1/chat/completions", json=chat_body("Tell me a story", "full")).json()
        assert choice["message"]["content"] == full["choices"][0]["message"]["content"]  # lossless
        assert stats["draft_exit"] == 3 and stats["draft_len"] == 3


def test_cheaper_drafts_keep_self_speculative_exact(client) -> None:
    full = client.post("/v1/chat/completions", json=chat_body("Tell me a story", "full")).json()
    options = {"mode": "self_speculative", "draft_exit": 2, "draft_len": 3, "draft_vocab": 64, "draft_confidence": 0.5,
               "draft_schedule": "adaptive"}
    body = client.post("/v1/chat/completions", json={**chat_body("Tell me a story"), "early_exit": options}).json()
    assert body["choices"][0]["message"] == full["choices"][0]["message"]
    stats = body["early_exit"]
    assert (stats["draft_vocab"], stats["draft_confidence"], stats["draft_schedule"]) == (64, 0.5, "adaptive")
    for field, value in (("draft_vocab", 0), ("draft_schedule", "greedy")):
        bad = client.post("/v1/chat/completions", json={**chat_body("Hi"), "early_exit": {**options, field: value}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == f"early_exit.{field}"


def test_one_threshold_per_exit_decodes_as_generate_and_is_echoed(client, tiny_dir, run_dir) -> None:
    per_exit = [MIXED_THRESHOLD, 1.0, 0.014]  # exit 2 never checked
    options = {"mode": "early_exit", "exit_thresholds": per_exit}
    body = client.post("/v1/chat/completions", json={**chat_body("Tell me a story"), "early_exit": options}).json()
    cfg = compose_config("generate", [f"model.checkpoint_dir={tiny_dir}", f"generate.run_dir={run_dir}",
                                      "generate.max_new_tokens=20", "generate.mode=early_exit",
                                      f"generate.exit_thresholds=[{','.join(map(str, per_exit))}]"])
    cfg.generate.prompt = "Tell me a story"
    expected = generate.run(cfg, out=io.StringIO())
    assert body["choices"][0]["message"]["content"] == expected.text
    stats = body["early_exit"]
    assert stats["exit_layers"] == expected.result.exit_layers and 2 not in stats["exit_layers"]
    assert {1, 3} <= set(stats["exit_layers"])
    assert (stats["threshold"], stats["exit_thresholds"]) == (None, per_exit)


def test_a_threshold_left_out_is_the_calibrated_one(tiny_dir, run_dir, tmp_path) -> None:
    from eetune.eval.calibration import Candidate, pick_threshold, write_calibration
    from eetune.serve.protocol import ChatCompletionRequest

    calibrated_dir = tmp_path / "calibrated"
    shutil.copytree(run_dir, calibrated_dir)
    write_calibration(calibrated_dir, [pick_threshold("learned", [Candidate(0.3, 0.99, 1.5)], 0.98)], {"prompts": 1})
    served = ServedModel.from_config(serve_cfg(tiny_dir, calibrated_dir, "serve.mode=early_exit"))

    def threshold(early_exit: dict[str, Any]) -> float:
        request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}],
                                                        "early_exit": early_exit})
        return served.plan([1, 2, 3], request, "messages").settings.threshold

    assert threshold({"confidence": "learned"}) == 0.3  # calibrated for this policy
    assert threshold({"confidence": "max_prob"}) == 0.8  # none calibrated for this one
    assert threshold({"confidence": "learned", "threshold": 0.5}) == 0.5  # a request's own wins

    # Calibrated per exit: a request that names no threshold gets them; one that names one does not.
    per_exit = pick_threshold("max_prob", [Candidate(1.0, 0.99, 1.5, exit_thresholds=(0.5, 1.0, 0.2))], 0.98)
    write_calibration(calibrated_dir, [per_exit], {"prompts": 1})
    served = ServedModel.from_config(serve_cfg(tiny_dir, calibrated_dir, "serve.mode=early_exit"))
    plan = served.plan([1, 2, 3], ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}]}), "messages")
    assert plan.settings.exit_thresholds == (0.5, 1.0, 0.2)
    assert threshold({"threshold": 0.5}) == 0.5


def test_completions_equal_the_engine_for_text_and_token_id_prompts(client, served) -> None:
    engine = Engine(served.model)  # its own caches: independent of the server's
    prompt_ids = served.tokenizer.encode("Once upon a time", add_special_tokens=True)
    settings = DecodeSettings(mode="early_exit", threshold=MIXED_THRESHOLD, max_new_tokens=12,
                              stop_ids=served.stop_ids)
    expected = engine.generate(prompt_ids, settings)
    for prompt in ("Once upon a time", ["Once upon a time"], prompt_ids):
        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                    "early_exit": MODES["early_exit"]}).json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == served.tokenizer.decode(expected.tokens, skip_special_tokens=True)
        assert body["early_exit"]["exit_layers"] == expected.exit_layers
        assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12,
                                 "total_tokens": len(prompt_ids) + 12}
    # Fields a request leaves out come from the server's config (threshold 0.8 by default).
    body = client.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": 4, "temperature": 0,
                                                "early_exit": {"mode": "early_exit"}}).json()
    assert (body["early_exit"]["mode"], body["early_exit"]["threshold"]) == ("early_exit", 0.8)
    # No max_tokens: serve.default_max_tokens (16 here).
    body = client.post("/v1/completions", json={"prompt": prompt_ids, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 16 and body["early_exit"]["mode"] == "full"


def test_statistics_are_consistent(client) -> None:
    for mode in MODES:
        body = client.post("/v1/chat/completions", json=chat_body("Why is the sky blue?", mode)).json()
        stats, n = body["early_exit"], body["usage"]["completion_tokens"]
        assert stats["num_layers"] == N_LAYERS
        assert len(stats["exit_layers"]) == n
        assert set(stats["exit_layers"]) <= {*EXIT_LAYERS, N_LAYERS}
        assert stats["tokens_per_s"] > 0 and stats["time_to_first_token_s"] > 0 and stats["queue_s"] >= 0
        if mode == "self_speculative":
            assert stats["acceptance_rate"] == stats["accepted_tokens"] / stats["draft_tokens"]
            assert stats["exit_layers"].count(3) == stats["accepted_tokens"]
            assert stats["mean_layers"] >= sum(stats["exit_layers"]) / n  # rejected drafts cost layers too
        else:
            assert stats["acceptance_rate"] is None and stats["draft_tokens"] == 0
            assert stats["mean_layers"] == pytest.approx(sum(stats["exit_layers"]) / n)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("mode", ["full", "early_exit"])
def test_streamed_chunks_concatenate_to_the_whole_response(client, route, mode) -> None:
    chat = route == "/v1/chat/completions"
    body = chat_body("Count to five", mode) if chat else {
        "prompt": "Count to five", "temperature": 0, "max_tokens": 20, "early_exit": MODES[mode]}
    whole = client.post(route, json=body).json()
    with client.stream("POST", route, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)

    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert {c["id"] for c in chunks + [usage_chunk]} == {chunks[0]["id"]}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    closing = chunks[-1]
    assert closing["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert closing["early_exit"]["exit_layers"] == whole["early_exit"]["exit_layers"]
    if chat:
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == whole["choices"][0]["text"]
    assert len(chunks) > 3  # it did stream, piece by piece


def test_stop_strings_end_the_text_before_them(client) -> None:
    full = client.post("/v1/chat/completions", json=chat_body("Hello there", max_tokens=30)).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[6:9]  # spans several byte-level tokens
    cut = text.index(stop)
    for stream in (False, True):
        body = chat_body("Hello there", max_tokens=30, stop=[stop, "never appears"], stream=stream)
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                chunks = read_events(r)[:-1]
            answer = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            finish, stats = chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["early_exit"]
        else:
            r = client.post("/v1/chat/completions", json=body).json()
            answer, finish = r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]
            stats = r["early_exit"]
        assert answer == text[:cut]
        assert finish == "stop"
        # Decoding stopped at the token that completed the stop string, not at max_tokens.
        assert len(stats["exit_layers"]) < 30


def test_chat_content_may_be_a_list_of_text_parts(client) -> None:
    plain = client.post(CHAT, json=chat_body("Name a colour")).json()
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour"}]
    body = {**chat_body("unused"), "messages": [{"role": "user", "content": parts}]}
    assert client.post(CHAT, json=body).json()["choices"] == plain["choices"]


def test_models_and_health(client, served) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == "tiny" and card["num_layers"] == N_LAYERS and card["exit_layers"] == EXIT_LAYERS
    assert card["early_exit_defaults"]["mode"] == "full"
    assert client.get("/v1/models/tiny").json() == card
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["decoding"] == 0 and health["waiting"] == 0


# -- the openai client ----------------------------------------------------------------------------


def test_openai_client_chat_completions_and_streaming(oai, client) -> None:
    reference = client.post("/v1/chat/completions", json=chat_body("Say something kind", "early_exit")).json()
    response = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say something kind"}], temperature=0, max_tokens=20,
        extra_body={"early_exit": MODES["early_exit"]},
    )
    assert response.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert response.usage.completion_tokens == 20
    assert response.model_extra["early_exit"]["exit_layers"] == reference["early_exit"]["exit_layers"]

    stream = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say something kind"}], temperature=0, max_tokens=20,
        extra_body={"early_exit": MODES["early_exit"]}, stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == response.choices[0].message.content

    completion = oai.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=8,
                                        extra_body={"early_exit": MODES["self_speculative"]})
    full = oai.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=8)
    assert completion.choices[0].text == full.choices[0].text
    assert completion.model_extra["early_exit"]["mode"] == "self_speculative"
    assert [m.id for m in oai.models.list()] == ["tiny"]


def test_openai_client_sees_errors_as_its_own_exceptions(oai) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"


def test_sampling_is_reproducible_with_a_seed(client) -> None:
    def ask(seed: int) -> str:
        body = chat_body("Name a colour", "early_exit", temperature=0.9, top_p=0.9, seed=seed)
        return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    first = ask(1)
    assert ask(1) == first
    assert any(ask(seed) != first for seed in (2, 3, 4))


# -- OpenAI's other parameters: logprobs, penalties, logit_bias, seed; what clients send ------------

CLIENT_BODIES = json.loads((Path(__file__).parents[1] / "fixtures" / "openai_client_bodies.json").read_text())


@pytest.mark.parametrize("name", sorted(CLIENT_BODIES["bodies"]))
def test_the_bodies_langchain_and_litellm_send_are_served(client, name) -> None:
    """Replays what LangChain's ChatOpenAI and LiteLLM really send (versions in the fixture's `versions`):
    by default, with the options a user sets, and with tools / structured output (refused by name)."""
    body = CLIENT_BODIES["bodies"][name]
    if name == "langchain_chat_tools":
        r = client.post(CHAT, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert r.json()["error"]["code"] == "unsupported_parameter"
        return
    if name == "langchain_chat_json_schema":
        r = client.post(CHAT, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        return
    wants_logprobs = body.get("logprobs") is True
    if body.get("stream"):
        with client.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            events = read_events(r)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        entries = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
        if body.get("stream_options", {}).get("include_usage"):
            assert events[-2]["usage"]["completion_tokens"] >= len(entries)
    else:
        r = client.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"]
        entries = choice["logprobs"]["content"] if wants_logprobs else []
        assert wants_logprobs or choice["logprobs"] is None
    assert isinstance(text, str)
    if wants_logprobs:
        assert entries and all(len(e["top_logprobs"]) == body["top_logprobs"] for e in entries)
    if body.get("temperature") == 0 and "logit_bias" in body:  # greedy: every token is its distribution's best
        assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries)


def engine_reference(served, question: str, mode: str, **settings: Any) -> Any:
    """What the engine alone decodes for a chat question (its own caches), for comparison."""
    ids = chat_prompt_ids(served.tokenizer, [{"role": "user", "content": question}])
    return Engine(served.model).generate(ids, DecodeSettings(**MODES[mode], stop_ids=served.stop_ids, **settings))


@pytest.mark.parametrize("mode", list(MODES))
def test_openai_client_logprobs_are_the_deciding_heads_and_stream_with_their_text(oai, served, mode) -> None:
    question = "Tell me a story"
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": question}], "temperature": 0,
              "max_tokens": 16, "logprobs": True, "top_logprobs": 3, "extra_body": {"early_exit": MODES[mode]}}
    response = oai.chat.completions.create(**kwargs)
    expected = engine_reference(served, question, mode, max_new_tokens=16, logprobs=3)
    assert expected.stopped_by == "length"  # no end-of-turn token, whose logprob is left out
    content = response.choices[0].logprobs.content
    assert [bytes(t.bytes) for t in content] == [served.speller.bytes(e.token) for e in expected.logprobs]
    assert [t.logprob for t in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    for token, entry in zip(content, expected.logprobs):
        assert [bytes(t.bytes) for t in token.top_logprobs] == [served.speller.bytes(t) for t, _ in entry.top]
        assert token.top_logprobs[0].token == token.token  # greedy
    if mode == "early_exit":
        assert set(response.model_extra["early_exit"]["exit_layers"]) > {N_LAYERS}  # some left early

    # Streamed: each chunk carries the tokens whose text it carries; the assembler holds text back.
    chunks = [c for c in oai.chat.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [(c.choices[0].delta.content, [bytes(t.bytes) for t in c.choices[0].logprobs.content])
                for c in chunks if c.choices[0].logprobs]
    assembler, held, want = TextAssembler(served.tokenizer), [], []
    for token in expected.tokens:
        held.append(served.speller.bytes(token))
        if piece := assembler.add(token):
            want.append((piece, held))
            held = []
    if (rest := assembler.finish()) or held:
        want.append((rest, held))
    assert streamed == want
    assert any(len(tokens) > 1 for _, tokens in want)  # some text was held back across tokens
    assert [t.logprob for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content] == (
        [t.logprob for t in content])


def test_logprobs_up_to_a_stop_string_are_the_same_streamed_or_whole(client) -> None:
    text = client.post(CHAT, json=chat_body("Hello there", max_tokens=30)).json()["choices"][0]["message"]["content"]
    body = chat_body("Hello there", max_tokens=30, stop=[text[6:9]], logprobs=True, top_logprobs=1)
    whole = client.post(CHAT, json=body).json()
    with client.stream("POST", CHAT, json={**body, "stream": True}) as r:
        chunks = [c for c in read_events(r)[:-1] if c["choices"]]
    streamed = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    assert whole["choices"][0]["message"]["content"] == text[: text.index(text[6:9])]
    # Every generated token has its entry, those that completed the stop string included.
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    assert len(streamed) == whole["usage"]["completion_tokens"] < 30


def test_openai_client_completions_logprobs_stream_with_running_text_offsets(oai, served) -> None:
    kwargs = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 10, "logprobs": 2,
              "extra_body": {"early_exit": MODES["early_exit"]}}
    whole = oai.completions.create(**kwargs).choices[0].logprobs
    tokens = [served.speller.text(t) for t in engine_reference_completion(served, "Once upon a time", 10)]
    assert whole.tokens == tokens
    assert whole.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for token, logprob, top in zip(whole.tokens, whole.token_logprobs, whole.top_logprobs):
        assert top[token] == logprob and max(top.values()) == logprob and 1 <= len(top) <= 3
    chunks = [c.choices[0].logprobs for c in oai.completions.create(**kwargs, stream=True) if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    assert [o for c in chunks for o in c.text_offset] == whole.text_offset
    assert [lp for c in chunks for lp in c.token_logprobs] == whole.token_logprobs


def engine_reference_completion(served, prompt: str, n: int) -> list[int]:
    ids = served.tokenizer.encode(prompt, add_special_tokens=True)
    settings = DecodeSettings(**MODES["early_exit"], max_new_tokens=n, stop_ids=served.stop_ids)
    return Engine(served.model).generate(ids, settings).tokens


def test_openai_client_penalties_logit_bias_and_seed(oai, served) -> None:
    def ask(mode: str, **extra: Any) -> str:
        response = oai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Count to five"}], max_tokens=20,
            extra_body={"early_exit": MODES[mode]}, **{"temperature": 0, **extra})
        return response.choices[0].message.content

    plain = ask("full")
    banned = served.tokenizer.encode(plain, add_special_tokens=False)[0]
    penalties = {"presence_penalty": 0.8, "frequency_penalty": 1.2, "logit_bias": {str(banned): -100, "65": 5}}
    for mode in MODES:
        expected = engine_reference(served, "Count to five", mode, max_new_tokens=20, presence_penalty=0.8,
                                    frequency_penalty=1.2, logit_bias={banned: -100, 65: 5})
        assert ask(mode, **penalties) == served.tokenizer.decode(expected.tokens, skip_special_tokens=True)
        assert banned not in expected.tokens
    penalised = ask("full", **penalties)
    assert penalised != plain
    assert ask("self_speculative", **penalties) == penalised  # lossless under penalties too

    sampled = [ask("early_exit", temperature=1.0, seed=2**64 - 1) for _ in range(2)]
    assert sampled[0] == sampled[1] != ask("early_exit", temperature=1.0, seed=5)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_vanishing_temperature_decodes_like_greedy(client, mode) -> None:
    greedy = client.post(CHAT, json=chat_body("Name a colour", mode)).json()
    for temperature in (1e-45, 5e-324):
        r = client.post(CHAT, json=chat_body("Name a colour", mode, temperature=temperature, seed=3))
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == greedy["choices"]


def test_parameters_clients_send_that_change_nothing_are_accepted_and_ignored(oai) -> None:
    messages = [{"role": "user", "content": "Name a colour"}]
    plain = oai.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    ignored = oai.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=8, user="someone", metadata={"k": "v"},
        store=False, service_tier="auto", parallel_tool_calls=False, response_format={"type": "text"}, n=1)
    assert ignored.choices[0].message.content == plain.choices[0].message.content
    assert ignored.choices[0].logprobs is None
    completion = oai.completions.create(model="tiny", prompt="Once", temperature=0, max_tokens=5)
    same = oai.completions.create(model="tiny", prompt="Once", temperature=0, max_tokens=5, echo=False, best_of=1,
                                  suffix=None, user="someone")
    assert same.choices[0].text == completion.choices[0].text


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_requests_each_get_their_own_answer(served, oai) -> None:
    engine = Engine(served.model)  # references, computed one by one before the load starts
    cases = [(question, list(MODES)[i % 3]) for i, question in enumerate(QUESTIONS)]
    expected = {}
    for question, mode in cases:
        ids = chat_prompt_ids(served.tokenizer, [{"role": "user", "content": question}])
        opts = MODES[mode]
        result = engine.generate(ids, DecodeSettings(**opts, max_new_tokens=20, stop_ids=served.stop_ids))
        expected[question] = served.tokenizer.decode(result.tokens, skip_special_tokens=True)

    answers: dict[str, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(cases))

    def ask(question: str, mode: str) -> None:
        try:
            start.wait()
            if mode == "early_exit":  # half of the requests stream
                stream = oai.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=20,
                    extra_body={"early_exit": MODES[mode]}, stream=True)
                answers[question] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                response = oai.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=20,
                    extra_body={"early_exit": MODES[mode]})
                answers[question] = response.choices[0].message.content
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=case) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert answers == expected


# -- errors ---------------------------------------------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "route, body, status, param, code",
    [
        (CHAT, b'{"messages": [', 400, None, "invalid_json"),
        (CHAT, b'["not", "an", "object"]', 400, None, "invalid_json"),
        (CHAT, {"model": "tiny"}, 400, "messages", "missing_required_parameter"),
        (CHAT, {"messages": []}, 400, "messages", "invalid_value"),
        (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
        (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages[0].content", "invalid_value"),
        (CHAT, {"messages": HI, "max_tokens": "20"}, 400, "max_tokens", "invalid_value"),
        (CHAT, {"messages": HI, "temperature": "hot"}, 400, "temperature", "invalid_value"),
        (CHAT, {"messages": HI, "temperature": 3}, 400, "temperature", "invalid_value"),
        (CHAT, {"messages": HI, "n": 2}, 400, "n", "unsupported_parameter"),
        (CHAT, {"messages": HI, "n": 0}, 400, "n", "invalid_value"),
        (CHAT, {"messages": HI, "max_tokens": 65}, 400, "max_tokens", "invalid_value"),
        (CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        (CHAT, {"messages": HI, "temprature": 0.5}, 400, "temprature", "unknown_parameter"),
        (CHAT, {"messages": HI, "top_k": 5}, 400, "top_k", "unknown_parameter"),
        (CHAT, {"messages": HI, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),  # needs logprobs
        (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
        (CHAT, {"messages": HI, "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
        (CHAT, {"messages": HI, "frequency_penalty": -3}, 400, "frequency_penalty", "invalid_value"),
        (CHAT, {"messages": HI, "logit_bias": {"5": 101}}, 400, "logit_bias", "invalid_value"),
        (CHAT, {"messages": HI, "logit_bias": {"a": 1}}, 400, "logit_bias", "invalid_value"),
        (CHAT, {"messages": HI, "logit_bias": {"256": 1}}, 400, "logit_bias", "invalid_value"),  # vocab is 256
        (CHAT, {"messages": HI, "seed": 2**64}, 400, "seed", "invalid_value"),
        (CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
         "unsupported_parameter"),
        (CHAT, {"messages": HI, "tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter"),
        (CHAT, {"messages": HI, "functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter"),
        (CHAT, {"messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format",
         "unsupported_parameter"),
        (CHAT, {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
         "response_format", "unsupported_parameter"),
        (CHAT, {"messages": HI, "modalities": ["text", "audio"]}, 400, "modalities", "unsupported_parameter"),
        (CHAT, {"messages": HI, "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio", "unsupported_parameter"),
        (COMPLETIONS, {"prompt": "hi", "echo": True}, 400, "echo", "unsupported_parameter"),
        (COMPLETIONS, {"prompt": "hi", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
        (COMPLETIONS, {"prompt": "hi", "suffix": "!"}, 400, "suffix", "unsupported_parameter"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 6}, 400, "logprobs", "invalid_value"),
        (CHAT, {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        (CHAT, {"messages": HI, "early_exit": {"mode": "fastest"}}, 400, "early_exit.mode", "invalid_value"),
        (CHAT, {"messages": HI, "early_exit": {"threshold": 0}}, 400, "early_exit.threshold", "invalid_value"),
        (CHAT, {"messages": HI, "early_exit": {"threshold": 1.5}}, 400, "early_exit.threshold", "invalid_value"),
        (CHAT, {"messages": HI, "early_exit": {"mode": "self_speculative", "draft_exit": 4}}, 400,
         "early_exit.draft_exit", None),
        (CHAT, {"messages": HI, "early_exit": {"mode": "early_exit", "exit_thresholds": [0.5, 0.5]}}, 400,
         "early_exit.exit_thresholds", None),
        (CHAT, {"messages": HI, "early_exit": {"exit_thresholds": [0.5, 0, 0.5]}}, 400,
         "early_exit.exit_thresholds[1]", "invalid_value"),
        (CHAT, {"messages": HI, "early_exit": {"threshold": 0.5, "exit_thresholds": [0.5, 0.5, 0.5]}}, 400,
         "early_exit.exit_thresholds", None),
        (CHAT, {"messages": HI, "early_exit": {"theshold": 0.5}}, 400, "early_exit.theshold", "unknown_parameter"),
        (CHAT, {"model": "gpt-4", "messages": HI}, 404, "model", "model_not_found"),
        (COMPLETIONS, {"prompt": "x" * 200}, 400, "prompt", "context_length_exceeded"),
        (COMPLETIONS, {"prompt": "x" * 90, "max_tokens": 64}, 400, "max_tokens", "context_length_exceeded"),
        (COMPLETIONS, {"prompt": ["one", "two"]}, 400, "prompt", "invalid_value"),
        (COMPLETIONS, {"prompt": [1, 2, 999]}, 400, "prompt", "invalid_value"),
        (COMPLETIONS, {"prompt": ""}, 400, "prompt", "invalid_value"),
        (COMPLETIONS, {"prompt": 5}, 400, "prompt", "invalid_value"),
        ("/v1/embeddings", {"input": "x"}, 404, None, "not_found"),
    ],
)
def test_malformed_requests_get_4xx_json_and_the_server_keeps_answering(
    route, body, status, param, code, small_server
) -> None:
    http = small_server
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    if code == "unsupported_parameter":
        assert error["message"].startswith(f"'{param}' is not supported")
    ok = http.post(CHAT, json={"messages": HI, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def small_server(tiny_dir: Path, run_dir: Path) -> Iterator[httpx.Client]:
    """Limits small enough to trip: prompts of at most 100 tokens, a context of 128."""
    served = ServedModel.from_config(
        serve_cfg(tiny_dir, run_dir, "serve.max_prompt_tokens=100", "model.max_seq_len=128")
    )
    with BackgroundServer(create_app(served, queue_size=4)) as background:
        with httpx.Client(base_url=background.url, timeout=60) as http:
            yield http


def test_mode_needing_exits_is_refused_by_a_server_without_them(tiny_dir) -> None:
    served = ServedModel.from_config(serve_cfg(tiny_dir, None))
    with BackgroundServer(create_app(served, queue_size=2)) as background:
        r = httpx.post(f"{background.url}{CHAT}", json={"messages": HI, "early_exit": {"mode": "early_exit"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "early_exit.mode"
        assert "serve.run_dir" in r.json()["error"]["message"]
        r = httpx.post(f"{background.url}{CHAT}", json={"messages": HI, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["early_exit"]["exit_layers"] == [N_LAYERS] * 3


# -- the queue: full, and freed by clients that leave ----------------------------------------------------


def wait_until_idle(http: httpx.Client) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = http.get("/health").json()
        if health["decoding"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server never became idle: {health}")


@pytest.fixture
def one_slot_server(tiny_dir: Path, run_dir: Path) -> Iterator[tuple[httpx.Client, Any]]:
    """A server that admits one request at a time (queue_size 1) and may decode 1900 tokens."""
    served = ServedModel.from_config(
        serve_cfg(tiny_dir, run_dir, "serve.max_tokens=1900", "serve.max_prompt_tokens=100")
    )
    app = create_app(served, queue_size=1)
    with BackgroundServer(app) as background:
        with httpx.Client(base_url=background.url, timeout=60) as http:
            yield http, app.state.worker


def test_a_full_queue_answers_503_until_a_slot_frees(one_slot_server) -> None:
    http, worker = one_slot_server
    gate = threading.Event()
    worker.submit(lambda cancelled: gate.wait(60))  # holds the only slot
    r = http.post(CHAT, json={"messages": HI, "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
    gate.set()
    wait_until_idle(http)
    assert http.post(CHAT, json={"messages": HI, "max_tokens": 2}).status_code == 200


def test_a_client_leaving_mid_stream_stops_its_decode_and_frees_the_slot(one_slot_server) -> None:
    http, worker = one_slot_server
    # Greedy, this prompt runs the whole 1900 tokens (no end-of-turn token): seconds of decoding.
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 1900, "temperature": 0,
            "stream": True}
    with http.stream("POST", CHAT, json=body) as r:
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert len(received) == 3
    # The connection is closed: the decode stops at its next token instead of running to 1900.
    health = wait_until_idle(http)
    assert (health["cancelled"], health["completed"]) == (1, 0)
    assert 2 <= health["tokens_generated"] < 1900
    ok = http.post(CHAT, json={"messages": HI, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200
    assert http.get("/health").json()["tokens_generated"] == health["tokens_generated"] + 2


def test_a_client_leaving_while_queued_is_dropped_from_the_queue(tiny_dir, run_dir) -> None:
    served = ServedModel.from_config(serve_cfg(tiny_dir, run_dir))
    app = create_app(served, queue_size=2)
    with BackgroundServer(app) as background, httpx.Client(base_url=background.url, timeout=60) as http:
        worker = app.state.worker
        gate = threading.Event()
        worker.submit(lambda cancelled: gate.wait(60))
        with pytest.raises(httpx.ReadTimeout):
            http.post(CHAT, json={"messages": HI, "max_tokens": 2}, timeout=1.0)
        deadline = time.monotonic() + 60  # the server notices the closed connection
        while http.get("/health").json()["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        gate.set()
        health = wait_until_idle(http)
        assert (health["cancelled"], health["completed"]) == (1, 1)  # the gate job completed
        assert health["tokens_generated"] == 0  # the request never decoded
        assert http.post(CHAT, json={"messages": HI, "max_tokens": 2}).status_code == 200


def test_a_streamed_client_leaving_while_queued_is_dropped_from_the_queue(tiny_dir, run_dir) -> None:
    served = ServedModel.from_config(serve_cfg(tiny_dir, run_dir))
    app = create_app(served, queue_size=3)
    with BackgroundServer(app) as background, httpx.Client(base_url=background.url, timeout=60) as http:
        worker = app.state.worker
        gate = threading.Event()
        worker.submit(lambda cancelled: gate.wait(60))
        # A chat stream sends its opening chunk at once; a completions stream has nothing to send yet.
        with http.stream("POST", CHAT, json={"messages": HI, "max_tokens": 2, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
        with pytest.raises(httpx.ReadTimeout):
            with http.stream("POST", COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "stream": True},
                             timeout=1.0) as r:
                next(r.iter_lines())
        deadline = time.monotonic() + 60  # the server notices the closed connections
        while http.get("/health").json()["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json()["waiting"] == 0  # freed before the gate opens
        gate.set()
        health = wait_until_idle(http)
        assert (health["cancelled"], health["completed"], health["tokens_generated"]) == (2, 1, 0)


def test_a_stream_whose_client_left_before_its_first_event_is_dropped_from_the_queue(served) -> None:
    """The race the test above cannot time: the disconnect arrives while the response start is
    being sent, before Starlette first asks the event generator for an event, so the generator's
    own `finally` never runs."""
    app = create_app(served, queue_size=2)
    worker = app.state.worker
    gate = threading.Event()
    worker.submit(lambda cancelled: gate.wait(60))
    deadline = time.monotonic() + 60
    while worker.status()["decoding"] != 1:  # the worker thread has taken it (slow on a busy machine)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "stream": True}).encode()
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a send that yields, as uvicorn's does while its write buffer drains
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": COMPLETIONS, "raw_path": COMPLETIONS.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    try:
        asyncio.run(app(scope, receive, send))
        assert worker.status()["waiting"] == 0 and worker.status()["cancelled"] == 1
    finally:
        gate.set()
        worker.close()


@pytest.mark.parametrize("path", ["batch", "alone"])  # a row of the running batch; a request alone
def test_an_internal_error_is_a_json_500_and_the_connection_and_worker_stay_healthy(
    server, served, monkeypatch, path
) -> None:
    worker = server.app.state.worker
    if path == "alone":  # the server without continuous batching (serve.max_batch_size=1)
        monkeypatch.setattr(worker, "scheduler", None)
    target, name = (worker.scheduler, "step") if path == "batch" else (served.engine, "generate")
    real = getattr(target, name)
    calls = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("the engine broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing_once)
    body = chat_body("Hello there", "full", max_tokens=2)
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        failed = http.post(CHAT, json=body)
        assert failed.status_code == 500
        assert failed.json() == {"error": {"message": "internal error: RuntimeError: the engine broke",
                                           "type": "server_error", "param": None, "code": None}}
        port = failed.extensions["network_stream"].get_extra_info("client_addr")[1]
        ok = http.post(CHAT, json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        # The same keep-alive connection answered both.
        assert ok.extensions["network_stream"].get_extra_info("client_addr")[1] == port
        health = http.get("/health").json()
        assert (health["decoding"], health["waiting"]) == (0, 0)


# -- continuous batching ---------------------------------------------------------------------------------


def test_concurrent_requests_share_the_batch_and_answer_as_alone(server, served) -> None:
    """Requests in every mode at once: each greedy answer (float32) equals the same request served
    alone; they decode in the running batch, one decoding group (mode and exit settings) at a time."""
    bodies = [chat_body(q, mode, max_tokens=12 + i) for i, (q, mode) in enumerate(
        (q, m) for q in QUESTIONS[:4] for m in ("full", "full", "early_exit", "self_speculative"))]
    alone = [httpx.post(f"{server.url}{CHAT}", json=b, timeout=60).json() for b in bodies]
    worker = server.app.state.worker
    worker.peak_batch = 0

    def settled() -> dict[str, int]:  # a response can arrive just before its slot is released
        deadline = time.monotonic() + 30
        while (status := worker.status())["decoding"] + status["waiting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        return status

    before = settled()
    with httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=32)) as http:
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: http.post(CHAT, json=b).json(), bodies))
            streamed = list(pool.map(lambda b: read_events(http.post(CHAT, json={**b, "stream": True})), bodies))
    # Every request finished: none counts as cancelled (a finished stream cancels its ticket as it closes).
    after = settled()
    assert (after["completed"] - before["completed"], after["cancelled"] - before["cancelled"]) == (32, 0)
    for a, events in zip(alone, streamed):
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert text == a["choices"][0]["message"]["content"]
    for body, a, b in zip(bodies, alone, together):
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"], body
        assert b["usage"] == a["usage"]
        assert b["early_exit"]["exit_layers"] == a["early_exit"]["exit_layers"]
    assert worker.peak_batch >= 2  # requests really shared steps
    # Early-exit and self-speculative requests share the batch too: rows leave at their own exits,
    # or accept their own drafts.
    for mode in ("early_exit", "self_speculative"):
        worker.peak_batch = 0
        same = [b for b in bodies if b["early_exit"]["mode"] == mode]
        with ThreadPoolExecutor(len(same)) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{server.url}{CHAT}", json=b, timeout=120).json(), same))
        assert worker.peak_batch >= 2, mode
        for body, b in zip(same, answers):
            a = alone[bodies.index(body)]
            assert (b["choices"][0]["message"]["content"], b["early_exit"]["exit_layers"]) == (
                a["choices"][0]["message"]["content"], a["early_exit"]["exit_layers"]), mode
        assert len({layer for a in answers for layer in a["early_exit"]["exit_layers"]}) > 1, mode


def test_a_client_leaving_frees_its_row_and_the_others_finish(server, served) -> None:
    worker = server.app.state.worker
    body = chat_body("Tell me a story", max_tokens=40)
    expected = httpx.post(f"{server.url}{CHAT}", json=body, timeout=60).json()["choices"][0]["message"]["content"]
    before = worker.status()["cancelled"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with ThreadPoolExecutor(2) as pool:
            other = pool.submit(lambda: http.post(CHAT, json=body).json())
            with http.stream("POST", CHAT, json={**body, "stream": True}) as leaving:
                next(leaving.iter_lines())  # the first event: it is decoding in the batch now
            assert other.result()["choices"][0]["message"]["content"] == expected
    deadline = time.monotonic() + 30
    while worker.status()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.status()["cancelled"] == before + 1
    assert not worker._rows  # its row was freed


def test_a_bad_request_in_the_batch_harms_no_other(served) -> None:
    from eetune.errors import EetuneError
    from eetune.infer.scheduler import BatchScheduler
    from eetune.serve.protocol import CompletionRequest
    from eetune.serve.service import DecodePlan
    from eetune.serve.worker import DecodeWorker

    worker = DecodeWorker(4, BatchScheduler(served.engine, 4))
    try:
        good = served.plan(served.chat_prompt(HI), CompletionRequest(prompt="x", max_tokens=6, temperature=0), "messages")
        # A token id outside the vocabulary gets past no HTTP check, but here it reaches the batch.
        bad = DecodePlan([1, served.vocab_size + 5], good.settings, ())
        tickets = [worker.submit(served.job(plan)) for plan in (good, bad, good)]
        with pytest.raises(EetuneError, match="vocabulary"):
            tickets[1].future.result(timeout=60)
        alone = served.decode(good, threading.Event())
        for ticket in (tickets[0], tickets[2]):
            assert ticket.future.result(timeout=60).result.tokens == alone.result.tokens
    finally:
        worker.close()


# -- text assembly ------------------------------------------------------------------------------------


def test_text_assembler_holds_back_partial_characters_and_stop_string_prefixes() -> None:
    tokenizer = build_tiny_tokenizer()  # byte level: "é" is two tokens, "€" three
    text = "ab é€ STOP tail"
    ids = tokenizer.encode(text, add_special_tokens=False)

    whole = TextAssembler(tokenizer)
    pieces = [whole.add(t) for t in ids] + [whole.finish()]
    assert "".join(pieces) == whole.text == text
    assert all("\ufffd" not in piece for piece in pieces)

    stopping = TextAssembler(tokenizer, stop=["STOP", "zzz"])
    released = []
    for t in ids:
        released.append(stopping.add(t))
        assert not "".join(released).endswith(("S", "ST", "STO"))  # could still become STOP
        if stopping.stopped:
            break
    assert stopping.stopped and "".join(released) == stopping.text == "ab é€ "
    assert stopping.finish() == ""


def test_token_speller_gives_each_tokens_exact_bytes() -> None:
    tokenizer = build_tiny_tokenizer()  # byte level: "é" is two tokens, "€" three
    speller = TokenSpeller(tokenizer)
    text = "ab é€ STOP"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(speller.bytes(t) for t in ids) == text.encode("utf-8")
    assert [speller.bytes(t) for t in ids[3:5]] == [b"\xc3", b"\xa9"]  # "é", split mid-character
    assert speller.text(ids[3]) == "\ufffd"
    assert speller.bytes(tokenizer.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["serve.mode=fastest"], "serve.mode='fastest' is not one of: full, early_exit, self_speculative"),
        (["serve.mode=early_exit"], "serve.mode=early_exit needs exits: set serve.run_dir="),
        (["serve.threshold=0"], "serve.threshold=0.0 must be in (0, 1]"),
        (["serve.threshold=0.5", "serve.exit_thresholds=[0.5,1.0]"], "serve.threshold and serve.exit_thresholds are both set"),
        (["serve.exit_thresholds=[0.5,2]"], "serve.exit_thresholds has 2.0: each threshold must be in (0, 1]"),
        (["serve.port=70000"], "serve.port=70000 must be in 0..65535"),
        (["serve.queue_size=0"], "serve.queue_size=0 must be >= 1"),
        (["serve.default_max_tokens=600"], "serve.default_max_tokens=600 exceeds serve.max_tokens=512"),
        (["serve.portt=1"], "unknown key 'serve.portt' — did you mean 'serve.port'?"),
        (["serve=turbo"], "unknown serve config 'turbo'"),
    ],
)
def test_cli_bad_config_exits_2_in_one_line(run_cli, overrides, message) -> None:
    code, _, err = run_cli("serve", *overrides)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_errors_found_while_loading_exit_2(run_cli, tiny_dir, run_dir, tmp_path) -> None:
    model = f"model.checkpoint_dir={tiny_dir}"  # port 0: whatever is free, should loading ever succeed
    code, _, err = run_cli("serve", model, "serve.port=0", f"serve.run_dir={tmp_path / 'nope'}")
    assert code == 2 and "run dir not found" in err
    code, _, err = run_cli("serve", model, "serve.port=0", f"serve.run_dir={run_dir}",
                        "serve.draft_exit=4")
    assert code == 2 and "serve.draft_exit=4 is not an exit of this model; exits are at [1, 2, 3]" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("serve", model, f"serve.port={port}")
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err


def test_cli_print_config_shows_the_serve_preset(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["eetune", "serve", "serve=lossless", "serve.port=9000", "--print-config"])
    main()
    out = capsys.readouterr().out
    assert "mode: self_speculative" in out and "port: 9000" in out


# -- the real model -----------------------------------------------------------------------------------


def test_smollm2_server_answers_like_generate(monkeypatch, smollm2: BaseModel) -> None:
    monkeypatch.setattr(loading, "load_base_model", lambda name, **kwargs: smollm2)  # what generate and serve load with
    served = ServedModel.from_config(compose_config("serve", []))
    cfg = compose_config("generate", ["generate.max_new_tokens=12"])
    cfg.generate.prompt = "What is the capital of France?"
    expected = generate.run(cfg, out=io.StringIO())

    with BackgroundServer(create_app(served, queue_size=4)) as background:
        oai = openai.OpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        response = oai.chat.completions.create(model="smollm2_135m", messages=messages, temperature=0, max_tokens=12)
        stream = oai.chat.completions.create(model="smollm2_135m", messages=messages, temperature=0, max_tokens=12,
                                             stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    assert response.choices[0].message.content == expected.text == streamed
    assert "Paris" in expected.text
    assert response.usage.completion_tokens == len(expected.result.tokens)
    assert response.choices[0].finish_reason == ("stop" if expected.result.stopped_by == "eos" else "length")
