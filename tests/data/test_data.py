"""Tuning data (sources, packing, chat masking, held-out split, resumable batches) and distill."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from eetune.config import compose_config
from eetune.data import IGNORE_INDEX, TrainBatches, heldout_batch, load_tuning_data
from eetune.data import corpus
from eetune.data.corpus import encode_corpus, pack_examples
from eetune.data.sources import Message
from eetune.data.encode import TokenStream
from eetune.errors import EetuneError
from eetune.models import BaseModel
from eetune.stages import distill

DATA_DIR = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tokenizer(tiny_base_model: BaseModel) -> Any:
    """Byte-level ChatML: one token per UTF-8 byte, bos=1 <|im_start|>, eos=2 <|im_end|>."""
    return tiny_base_model.tokenizer


def data_cfg(*overrides: str) -> Any:
    return compose_config("tune", list(overrides)).data


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky over the sea at noon."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, like the leaves of a young oak tree."},
    ]
}


def expected_chat_stream(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """ChatML by hand: headers and non-assistant turns carry no loss, nor does the EOS separator."""
    ids: list[int] = []
    trainable: list[bool] = []
    for m in messages:
        header = encode(tokenizer, f"<|im_start|>{m['role']}\n")
        body = encode(tokenizer, m["content"] + "<|im_end|>\n")
        ids += header + body
        trainable += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    return ids + [tokenizer.eos_token_id], trainable + [False]


# -- packing and labels -------------------------------------------------------------------


def test_pack_examples_exact_on_hand_made_stream() -> None:
    ids = torch.arange(100, 111)  # 11 tokens -> (11 - 1) // 3 = 3 windows
    loss_everywhere = torch.ones(11, dtype=torch.bool)
    tokens, labels = pack_examples(TokenStream(ids, loss_everywhere), seq_len=3)
    assert tokens.tolist() == [[100, 101, 102], [103, 104, 105], [106, 107, 108]]
    assert labels.tolist() == [[101, 102, 103], [104, 105, 106], [107, 108, 109]]
    assert tokens.dtype == labels.dtype == torch.long

    # Token 103 and tokens 104-106 carry no loss: window 1 predicts nothing and is dropped.
    trainable = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    tokens, labels = pack_examples(TokenStream(ids, trainable), seq_len=3)
    assert tokens.tolist() == [[100, 101, 102], [106, 107, 108]]
    assert labels.tolist() == [[101, 102, -100], [107, 108, 109]]


def test_text_source_packs_and_splits_exactly(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "a.txt"
    path.write_text("abcdefghij", encoding="utf-8")
    cfg = data_cfg("data=text", f"data.path={path}", "data.seq_len=3", "data.heldout_fraction=0.3")
    stream = encode(tokenizer, "abcdefghij") + [tokenizer.eos_token_id]  # 11 tokens
    data = load_tuning_data(cfg, tokenizer)
    cut = int(11 * 0.7)  # 7 train tokens -> (7 - 1) // 3 = 2 windows
    assert data.train_tokens.tolist() == [stream[0:3], stream[3:6]]
    assert data.train_labels.tolist() == [stream[1:4], stream[4:7]]
    assert data.heldout[0][0].ids.tolist() == stream[cut:]
    assert data.num_examples == 2 and data.num_documents == 1


def test_chat_masking_puts_ignore_exactly_on_non_assistant_tokens(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 12)
    ids, trainable = expected_chat_stream(tokenizer, CHAT["messages"])
    ids, trainable = ids * 12, trainable * 12

    cfg = data_cfg("data=jsonl", f"data.path={path}", "data.train_on_prompt=false", "data.seq_len=64")
    stream, _ = encode_corpus(cfg, tokenizer)
    assert stream.ids.tolist() == ids
    assert stream.trainable.tolist() == trainable

    # No run of non-assistant tokens (at most 53) fills a 64-token window, so no window is dropped and
    # example k is exactly the k-th window of the stream.
    data = load_tuning_data(cfg, tokenizer)
    n, seq_len = data.train_tokens.shape
    expected = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1 : n * seq_len + 1], trainable[1 : n * seq_len + 1])]
    assert data.train_tokens.flatten().tolist() == ids[: n * seq_len]
    assert data.train_labels.flatten().tolist() == expected
    assert 0 < data.num_loss_tokens < data.num_train_tokens

    # Training on the prompt too: same tokens, every label is the next token.
    data = load_tuning_data(data_cfg("data=jsonl", f"data.path={path}", "data.seq_len=64"), tokenizer)
    assert data.train_labels.flatten().tolist() == ids[1 : n * seq_len + 1]


def test_heldout_split_is_disjoint_from_train(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "a.txt"
    path.write_text("".join(f"line {i}: some text to pack.\n" for i in range(300)), encoding="utf-8")
    cfg = data_cfg("data=text", f"data.path={path}", "data.seq_len=64", "data.heldout_fraction=0.2")
    stream, _ = encode_corpus(cfg, tokenizer)
    data = load_tuning_data(cfg, tokenizer)
    cut = len(stream) - len(data.heldout[0][0])
    n, seq_len = data.train_tokens.shape
    # Train inputs and targets both end before the held-out tail starts.
    assert n * seq_len + 1 <= cut
    assert torch.equal(data.train_tokens.flatten(), stream.ids[: n * seq_len])
    assert torch.equal(data.train_labels.flatten(), stream.ids[1 : n * seq_len + 1])
    assert torch.equal(data.heldout[0][0].ids, stream.ids[cut:])
    assert len(data.heldout[0][0]) == len(stream) - int(len(stream) * 0.8)

    batch = heldout_batch(cfg, tokenizer)
    assert batch.shape == (cfg.heldout_sequences, seq_len)
    assert torch.equal(batch.flatten(), stream.ids[cut : cut + batch.numel()])
    assert torch.equal(batch, data.heldout_batch(cfg.heldout_sequences))


def test_default_pydoc_source_still_feeds_heldout_batch(tokenizer: Any) -> None:
    cfg = data_cfg("data.seq_len=64", "data.heldout_sequences=3")
    batch = heldout_batch(cfg, tokenizer, max_seq_len=2048)
    assert batch.shape == (3, 64) and batch.dtype == torch.long


def chat_record(prompt: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_heldout_by_prompt_keeps_every_sample_of_a_prompt_on_one_side(tmp_path: Path, tokenizer: Any) -> None:
    # Three samples per prompt, interleaved as a distilled corpus writes them.
    prompts = [f"Question number {i} about the weather?" for i in range(40)]
    records = [chat_record(p, f"Answer {j} to {p.lower()}") for j in range(3) for p in prompts]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = data_cfg("data=jsonl", f"data.path={path}", "data.seq_len=16", "data.heldout_by=prompt",
                   "data.heldout_fraction=0.25", "data.train_on_prompt=false")
    data = load_tuning_data(cfg, tokenizer)

    held = [r for r in records if corpus.is_heldout(corpus.Document("x", messages=tuple(
        Message(**m) for m in r["messages"])), 0.25)]
    held_prompts = {r["messages"][0]["content"] for r in held}
    assert 0 < len(held_prompts) < len(prompts)
    # A prompt's samples are all held out or all trained on.
    assert len(held) == 3 * len(held_prompts)
    # The held-out stream is exactly the held-out conversations, in file order; train is the rest.
    held_path = write_jsonl(tmp_path / "held.jsonl", held)
    train_path = write_jsonl(tmp_path / "train.jsonl", [r for r in records if r not in held])
    held_stream, _ = encode_corpus(data_cfg("data=jsonl", f"data.path={held_path}", "data.train_on_prompt=false"), tokenizer)
    train_stream, _ = encode_corpus(data_cfg("data=jsonl", f"data.path={train_path}", "data.train_on_prompt=false"), tokenizer)
    assert torch.equal(data.heldout[0][0].ids, held_stream.ids)
    assert torch.equal(data.heldout[0][0].trainable, held_stream.trainable)
    tokens, labels = pack_examples(train_stream, 16)
    assert torch.equal(data.train_tokens, tokens) and torch.equal(data.train_labels, labels)
    assert data.num_documents == len(records)
    assert torch.equal(heldout_batch(cfg, tokenizer), data.heldout_batch(cfg.heldout_sequences))

    with pytest.raises(EetuneError, match="no document falls in the held-out split"):
        one = write_jsonl(tmp_path / "one.jsonl", [records[0]] * 3)
        load_tuning_data(data_cfg("data=jsonl", f"data.path={one}", "data.heldout_by=prompt", "data.seq_len=4",
                                  "data.heldout_fraction=0.01"), tokenizer)


def test_mix_draws_windows_by_weight_from_each_source(tmp_path: Path, tokenizer: Any) -> None:
    a = tmp_path / "a.txt"
    a.write_text("alpha beta gamma delta. " * 60, encoding="utf-8")
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"zulu yankee x-ray {i}."} for i in range(80)])
    common = ("data.seq_len=8", "data.heldout_fraction=0.2", "data.heldout_sequences=8")
    only_a = load_tuning_data(data_cfg("data=text", f"data.path={a}", *common), tokenizer)
    only_b = load_tuning_data(data_cfg("data=jsonl", f"data.path={b}", *common), tokenizer)
    mix = f"data.mix=[{{source: text, path: {a}, weight: 3}}, {{source: jsonl, path: {b}, weight: 1}}]"
    cfg = data_cfg(mix, *common)
    data = load_tuning_data(cfg, tokenizer)

    total = only_a.num_examples + only_b.num_examples
    assert data.num_examples == round(total * 3 / 4) + round(total / 4)
    rows = [tuple(r) for r in data.train_tokens.tolist()]
    from_a = {tuple(r) for r in only_a.train_tokens.tolist()}
    from_b = {tuple(r) for r in only_b.train_tokens.tolist()}
    assert sum(r in from_a for r in rows) == round(total * 3 / 4)
    assert sum(r in from_b for r in rows) == round(total / 4)
    assert all(r in from_a or r in from_b for r in rows)
    assert data.num_documents == 1 + 80
    # Held-out windows shared 3:1, each from its own source's held-out split.
    batch = data.heldout_batch(8)
    assert batch[:6].tolist() == only_a.heldout_batch(6).tolist()
    assert batch[6:].tolist() == only_b.heldout_batch(2).tolist()
    assert torch.equal(heldout_batch(cfg, tokenizer), batch)


def test_jsonl_streams_in_chunks_and_reads_gzip(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"text": f"document {i} says hello."} if i % 3 else CHAT for i in range(50)]
    path = write_jsonl(tmp_path / "docs.jsonl", records)
    cfg = data_cfg("data=jsonl", f"data.path={path}", "data.train_on_prompt=false")
    whole, docs = encode_corpus(cfg, tokenizer)
    monkeypatch.setattr(corpus, "ENCODE_CHUNK", 7)  # many chunks, one ragged
    chunked, chunked_docs = encode_corpus(cfg, tokenizer)
    assert torch.equal(whole.ids, chunked.ids) and torch.equal(whole.trainable, chunked.trainable)
    assert docs == chunked_docs == 50

    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    from_gz, _ = encode_corpus(data_cfg("data=jsonl", f"data.path={gz}", "data.train_on_prompt=false"), tokenizer)
    assert torch.equal(from_gz.ids, whole.ids)
    not_gz = tmp_path / "plain.jsonl.gz"
    not_gz.write_bytes(path.read_bytes())
    with pytest.raises(EetuneError, match="cannot read it as gzip"):
        encode_corpus(data_cfg("data=jsonl", f"data.path={not_gz}"), tokenizer)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.mix=[{source: jsonl, path: a.jsonl, weight: 0}]", r"data.mix\[0\].weight=0.0 must be positive"),
        ("data.mix=[{source: pydoc}, {source: csv, path: a.csv}]", r"data.mix\[1\].source='csv' is not one of"),
        ("data.mix=[{source: pydoc}, {source: jsonl}]", r"data.mix\[1\] \(source jsonl\) needs a path"),
        ("data.heldout_by=random", "data.heldout_by='random' is not one of: tail, prompt"),
    ],
)
def test_mix_and_heldout_settings_are_checked(override: str, message: str) -> None:
    with pytest.raises(EetuneError, match=message):
        data_cfg(override)


# -- TrainBatches -------------------------------------------------------------------------


def make_batches(n: int = 10, batch_size: int = 3, **kwargs: Any) -> TrainBatches:
    tokens = torch.arange(n * 4).view(n, 4)
    return TrainBatches(tokens, tokens + 1, batch_size, **kwargs)


def take(batches: TrainBatches, count: int) -> list[list[int]]:
    return [next(batches)["indices"].tolist() for _ in range(count)]


def test_train_batches_are_deterministic_and_reshuffle_per_epoch() -> None:
    a, b = make_batches(seed=7), make_batches(seed=7)
    assert a.num_examples == 10 and a.batches_per_epoch == 3
    first = take(a, 9)
    assert first == take(b, 9)
    assert take(make_batches(seed=8), 9) != first
    epochs = [sum(first[i : i + 3], []) for i in (0, 3, 6)]
    for order in epochs:
        assert len(set(order)) == 9  # no example twice within an epoch
    assert epochs[0] != epochs[1] != epochs[2]
    assert a.epoch == 3 and a.position == 0

    batch = next(make_batches(seed=7))
    assert batch["tokens"].shape == batch["labels"].shape == (3, 4)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["tokens"], torch.arange(40).view(10, 4)[batch["indices"]])
    assert torch.equal(batch["labels"], batch["tokens"] + 1)

    plain = make_batches(shuffle=False)
    assert take(plain, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_train_batches_resume_mid_epoch_matches_uninterrupted() -> None:
    uninterrupted = make_batches(seed=3)
    take(uninterrupted, 4)  # one epoch and one batch of the next
    state = uninterrupted.state_dict()
    assert (state["epoch"], state["position"]) == (1, 1)

    resumed = make_batches(seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert resumed.epoch == 1
    assert take(resumed, 8) == take(uninterrupted, 8)

    with pytest.raises(EetuneError, match="num_examples"):
        make_batches(n=12, seed=3).load_state_dict(state)
    with pytest.raises(EetuneError, match="seed"):
        make_batches(seed=4).load_state_dict(state)


# -- sources ------------------------------------------------------------------------------


def test_each_source_loads(tmp_path: Path, tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 8
    records = [{"text": text}, CHAT, {"text": text[::-1]}]
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", records)
    common = ("data.seq_len=16", "data.heldout_fraction=0.1")

    txt = tmp_path / "a.txt"
    txt.write_text(text, encoding="utf-8")
    data = load_tuning_data(data_cfg("data=text", f"data.path={txt}", *common), tokenizer)
    assert data.num_documents == 1 and data.num_examples > 0

    # JSONL: text and chat records side by side, each detected on its own.
    jsonl_stream, docs = encode_corpus(data_cfg("data=jsonl", f"data.path={jsonl}", *common), tokenizer)
    chat_ids, _ = expected_chat_stream(tokenizer, CHAT["messages"])
    eos = tokenizer.eos_token_id
    assert docs == 3
    assert jsonl_stream.ids.tolist() == encode(tokenizer, text) + [eos] + chat_ids + encode(tokenizer, text[::-1]) + [eos]

    # HF datasets reads the same file as json: the same stream.
    hf_cfg = data_cfg("data.source=hf", "data.hf_format=json", f"data.path={jsonl}", *common)
    hf_stream, _ = encode_corpus(hf_cfg, tokenizer)
    assert torch.equal(hf_stream.ids, jsonl_stream.ids)
    assert load_tuning_data(hf_cfg, tokenizer).num_examples > 0

    # Other builders and a custom text field.
    csv = tmp_path / "a.csv"
    csv.write_text('body\n"first, row"\nsecond row\n', encoding="utf-8")
    csv_stream, _ = encode_corpus(
        data_cfg("data.source=hf", "data.hf_format=csv", f"data.path={csv}", "data.text_field=body"), tokenizer
    )
    assert csv_stream.ids.tolist() == encode(tokenizer, "first, row") + [eos] + encode(tokenizer, "second row") + [eos]


def test_bundled_sample_files_load(tokenizer: Any) -> None:
    for name in ("sample_text.jsonl", "sample_chat.jsonl"):
        cfg = data_cfg("data=jsonl", f"data.path={DATA_DIR / name}", "data.seq_len=32", "data.train_on_prompt=false")
        assert load_tuning_data(cfg, tokenizer).num_examples >= 1


# -- errors -------------------------------------------------------------------------------


def test_data_errors(tmp_path: Path, tokenizer: Any) -> None:
    missing = tmp_path / "missing.jsonl"
    for source in ("data=text", "data=jsonl", "data.source=hf"):
        with pytest.raises(EetuneError, match="not found"):
            load_tuning_data(data_cfg(source, f"data.path={missing}"), tokenizer)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    for source in ("data=text", "data=jsonl"):
        with pytest.raises(EetuneError, match="empty"):
            load_tuning_data(data_cfg(source, f"data.path={empty}"), tokenizer)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(EetuneError, match=rf"{bad}:3: not valid JSON"):
        load_tuning_data(data_cfg("data=jsonl", f"data.path={bad}"), tokenizer)

    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(EetuneError, match=rf"{no_field}:2: expected a string field 'text'"):
        load_tuning_data(data_cfg("data=jsonl", f"data.path={no_field}"), tokenizer)

    bad_role = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(EetuneError, match=rf"{bad_role}:1: message 1 has role 'bot'"):
        load_tuning_data(data_cfg("data=jsonl", f"data.path={bad_role}"), tokenizer)
    with pytest.raises(EetuneError, match="row 1: message 1 has role 'bot'"):
        load_tuning_data(data_cfg("data.source=hf", f"data.path={bad_role}"), tokenizer)
    no_content = write_jsonl(tmp_path / "content.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(EetuneError, match="needs a string 'content'"):
        load_tuning_data(data_cfg("data=jsonl", f"data.path={no_content}"), tokenizer)

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello", encoding="utf-8")
    with pytest.raises(EetuneError, match="not enough for one sequence of data.seq_len=256"):
        load_tuning_data(data_cfg("data=text", f"data.path={tiny}"), tokenizer)

    # Two sequences of 16 tokens, asked for batches of 4.
    small = tmp_path / "small.txt"
    small.write_text("x" * 40, encoding="utf-8")
    data = load_tuning_data(data_cfg("data=text", f"data.path={small}", "data.seq_len=16"), tokenizer)
    with pytest.raises(EetuneError, match="fewer than one batch of data.batch_size=4"):
        TrainBatches(data.train_tokens, data.train_labels, 4)

    with pytest.raises(EetuneError, match=r"data.seq_len=4096 is longer than the model supports \(model.max_seq_len=2048\)"):
        load_tuning_data(data_cfg("data.seq_len=4096"), tokenizer, max_seq_len=2048)
    with pytest.raises(EetuneError, match="longer than the model supports"):
        heldout_batch(data_cfg("data.seq_len=4096"), tokenizer, max_seq_len=2048)


# -- distill ------------------------------------------------------------------------------


def distill_cfg(tiny_base_model: BaseModel, tmp_path: Path, out: Path, *overrides: str) -> Any:
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("Say hi.\n\nName a fruit.\nCount to three.\n", encoding="utf-8")
    return compose_config(
        "distill",
        [
            f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}",
            f"distill.prompts={prompts}",
            f"distill.out={out}",
            "distill.max_new_tokens=8",
            "distill.samples_per_prompt=2",
            # The tiny random model is peaked: sample hot so seeds visibly matter.
            "distill.temperature=10.0",
            "distill.top_p=null",
            *overrides,
        ],
    )


def reuse_loaded_model(monkeypatch: pytest.MonkeyPatch, model: BaseModel) -> None:
    """Skip reloading the same tiny checkpoint: `distill_cfg` points model.checkpoint_dir at it."""
    monkeypatch.setattr(distill, "load_base_model", lambda name, **kwargs: model)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_distill_writes_reproducible_jsonl_that_loads_back(
    tiny_base_model: BaseModel, tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first run loads the model from config as the CLI does; later runs reuse it.
    out = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "a.jsonl", "seed=5"))
    reuse_loaded_model(monkeypatch, tiny_base_model)
    assert out == tmp_path / "a.jsonl"
    records = _records(out)
    assert len(records) == 3 * 2
    prompts = ("Say hi.", "Name a fruit.", "Count to three.")
    # Every prompt x sample once, in a seeded order; each record names its batch, prompt and sample.
    assert sorted(r["id"].split(":", 1)[1] for r in records) == sorted(f"p{i}:s{j}" for i in range(3) for j in range(2))
    for r in records:
        i = int(r["id"].split(":")[1][1:])
        assert r["messages"][0] == {"role": "user", "content": prompts[i]}
        assert r["messages"][1]["role"] == "assistant" and 1 <= r["tokens"] <= 8

    # The same seed reproduces the corpus; another seed does not.
    again = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "b.jsonl", "seed=5"))
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")
    other = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "c.jsonl", "seed=6"))
    assert other.read_text(encoding="utf-8") != out.read_text(encoding="utf-8")

    cfg = data_cfg("data=jsonl", f"data.path={out}", "data.seq_len=32", "data.train_on_prompt=false")
    assert load_tuning_data(cfg, tokenizer).num_loss_tokens > 0

    one = ("distill.samples_per_prompt=1",)
    text_out = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "t.jsonl", "distill.chat=false", *one))
    for r in _records(text_out):
        assert r["text"].startswith(prompts[int(r["id"].split(":")[1][1:])])
    assert load_tuning_data(data_cfg("data=jsonl", f"data.path={text_out}", "data.seq_len=16"), tokenizer).num_examples


def test_batched_distill_equals_one_prompt_at_a_time(
    tiny_base_model: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers do not depend on what else shares the batch: continuous batching keeps each row
    exact, and each answer samples with its own (prompt, sample) seed."""
    reuse_loaded_model(monkeypatch, tiny_base_model)

    def answers(name: str, *overrides: str) -> dict[str, Any]:
        out = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / name, *overrides))
        return {r["id"].split(":", 1)[1]: (r["messages"], r["tokens"]) for r in _records(out)}

    greedy = ("distill.temperature=0", "distill.samples_per_prompt=1")
    one = answers("one.jsonl", *greedy, "distill.batch_size=1")
    assert answers("three.jsonl", *greedy, "distill.batch_size=3") == one and len(one) == 3
    sampled = answers("s1.jsonl", "distill.batch_size=1")
    assert answers("s4.jsonl", "distill.batch_size=4") == sampled and len(sampled) == 6


def test_multi_turn_distill_answers_follow_ups_in_context(
    tiny_base_model: BaseModel, tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """distill.turns=2: the user asks a follow-up from the list and the model answers it with the
    whole conversation as its prompt; the first turn is the single-turn corpus's answer."""
    from eetune.exits import EarlyExitModel
    from eetune.infer.engine import DecodeSettings, Engine

    reuse_loaded_model(monkeypatch, tiny_base_model)
    follow_ups = tmp_path / "follow_ups.txt"
    follow_ups.write_text("# comment\nWhy?\nGive an example.\nSay more.\n", encoding="utf-8")
    common = ("distill.samples_per_prompt=1", f"distill.follow_ups={follow_ups}")

    def records(name: str, *overrides: str) -> dict[str, Any]:
        out = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / name, *common, *overrides))
        return {r["id"].split(":", 1)[1]: (r["messages"], r["tokens"]) for r in _records(out)}

    single = records("one_turn.jsonl")
    prompts_decoded: list[list[int]] = []
    real_request = distill.BatchRequest
    monkeypatch.setattr(distill, "BatchRequest", lambda ids, s: prompts_decoded.append(list(ids)) or real_request(ids, s))
    two = records("two_turns.jsonl", "distill.turns=2", "distill.batch_size=1")
    monkeypatch.setattr(distill, "BatchRequest", real_request)
    # Which conversation shares a batch does not change it (follow-ups are queued as answers finish).
    assert records("two_turns_batched.jsonl", "distill.turns=2", "distill.batch_size=3") == two
    assert two.keys() == single.keys() and len(two) == 3 and len(prompts_decoded) == 6
    engine = Engine(EarlyExitModel(tiny_base_model.model, []))
    stops = frozenset(distill.stop_token_ids(tokenizer))
    seed = distill_cfg(tiny_base_model, tmp_path, tmp_path / "unused.jsonl").seed
    for key, (messages, tokens) in two.items():
        i, j = (int(part[1:]) for part in key.split(":"))
        assert messages[:2] == single[key][0] and messages[1]["content"]
        assert messages[2] == {"role": "user", "content": distill.follow_up_question(
            ["Why?", "Give an example.", "Say more."], seed, i, j, 1)}
        # The follow-up's answer is the model's reply to the whole conversation so far, sampled
        # with that turn's seed.
        ids = encode(tokenizer, tokenizer.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True))
        assert ids in prompts_decoded
        settings = DecodeSettings(max_new_tokens=8, temperature=10.0, top_p=None,
                                  seed=distill.answer_seed(seed, i, j, 1), stop_ids=stops)
        reply = engine.generate(ids, settings).tokens
        assert messages[3] == {"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True).strip()}
        assert tokens == single[key][1] + len(reply)
    # Follow-up questions differ between conversations (seeded per prompt, sample and turn).
    sampled = records("asked.jsonl", "distill.turns=3", "distill.samples_per_prompt=4")
    asked = {messages[k]["content"] for messages, _ in sampled.values() for k in (2, 4)}
    assert len(asked) > 1 and all(len(messages) == 6 for messages, _ in sampled.values())

    # Tuning reads every assistant turn as a target, none of the user turns.
    path = tmp_path / "two_turns.jsonl"
    cfg = data_cfg("data=jsonl", f"data.path={path}", "data.seq_len=16", "data.train_on_prompt=false",
                   "data.heldout_fraction=0.5")
    one_cfg = data_cfg("data=jsonl", f"data.path={tmp_path / 'one_turn.jsonl'}", "data.seq_len=16",
                       "data.train_on_prompt=false", "data.heldout_fraction=0.5")
    assert load_tuning_data(cfg, tokenizer).num_loss_tokens > load_tuning_data(one_cfg, tokenizer).num_loss_tokens

    with pytest.raises(EetuneError, match="distill.turns=2 needs distill.chat=true"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "x.jsonl", "distill.turns=2", "distill.chat=false"))
    with pytest.raises(EetuneError, match="distill.turns=0 must be >= 1"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "x.jsonl", "distill.turns=0"))
    follow_ups.write_text("# none\n", encoding="utf-8")
    with pytest.raises(EetuneError, match="holds no follow-up questions"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "x.jsonl", *common, "distill.turns=2"))
    assert not (tmp_path / "x.jsonl").exists()


def test_distill_resumes_a_corpus_begun_before_a_setting_existed(
    tiny_base_model: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corpus whose meta predates distill.turns / follow_ups resumes with their defaults, not another value."""
    reuse_loaded_model(monkeypatch, tiny_base_model)
    out, meta = tmp_path / "old.jsonl", tmp_path / "old.jsonl.meta.json"
    common = ("distill.batch_size=2",)
    whole = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "whole.jsonl", *common))
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.max_tokens=1"))
    old = json.loads(meta.read_text())
    for key in ("turns", "follow_ups"):
        del old["distill"][key]
    meta.write_text(json.dumps(old))
    with pytest.raises(EetuneError, match=r"settings differ \(distill.turns\)"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.turns=2", "resume=true"))
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "resume=true"))
    assert out.read_text(encoding="utf-8") == whole.read_text(encoding="utf-8")


def test_distill_resumes_after_an_interruption_to_the_same_corpus(
    tiny_base_model: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_loaded_model(monkeypatch, tiny_base_model)
    batched = ("distill.batch_size=2",)  # 6 items: 3 batches
    whole = distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "whole.jsonl", *batched))
    out = tmp_path / "cut.jsonl"
    real_append = distill._append
    calls = {"n": 0}

    def killed_at_the_third_batch(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        real_append(*args)

    monkeypatch.setattr(distill, "_append", killed_at_the_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, out, *batched))
    monkeypatch.setattr(distill, "_append", real_append)
    # Two whole batches are on disk; a third cut off mid-write is dropped on resume.
    assert len(_records(out)) == 4
    with out.open("a", encoding="utf-8") as f:
        f.write('{"id": "b2:p0:s0", "tok')
    with pytest.raises(EetuneError, match="already exists.*resume=true"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, out, *batched))
    with pytest.raises(EetuneError, match=r"settings differ \(distill.batch_size\)"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, out, "distill.batch_size=3", "resume=true"))
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *batched, "resume=true"))
    assert out.read_text(encoding="utf-8") == whole.read_text(encoding="utf-8")


def test_distill_resumes_in_another_dtype_and_records_where(
    tiny_base_model: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_loaded_model(monkeypatch, tiny_base_model)
    out, meta = tmp_path / "mixed.jsonl", tmp_path / "mixed.jsonl.meta.json"
    common = ("distill.batch_size=2", "distill.samples_per_prompt=2")  # 6 items: 3 batches
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.max_tokens=1"))
    assert len(_records(out)) == 2 and distill.DTYPE_SEGMENTS not in json.loads(meta.read_text())
    # Same dtype: nothing recorded. Another dtype: from the next batch on.
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.max_tokens=1", "resume=true"))
    assert distill.DTYPE_SEGMENTS not in json.loads(meta.read_text())
    bf16 = ("model.dtype=bfloat16", "resume=true")
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.max_tokens=1", *bf16))
    assert json.loads(meta.read_text())[distill.DTYPE_SEGMENTS] == {"0": "float32", "1": "bfloat16"}
    # Back to float32 before any bf16 batch was written: the empty bf16 segment goes.
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.max_tokens=1", "resume=true"))
    assert json.loads(meta.read_text())[distill.DTYPE_SEGMENTS] == {"0": "float32"}
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, *bf16))
    assert json.loads(meta.read_text())[distill.DTYPE_SEGMENTS] == {"0": "float32", "1": "bfloat16"}
    assert len(_records(out)) == 6
    # Any other setting still may not change.
    with pytest.raises(EetuneError, match=r"settings differ \(distill.temperature\)"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, *bf16, "distill.temperature=1.0"))


def test_distill_token_budget_stops_and_extends(
    tiny_base_model: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_loaded_model(monkeypatch, tiny_base_model)
    out = tmp_path / "budget.jsonl"
    common = ("distill.batch_size=1", "distill.samples_per_prompt=4")  # 12 items of <= 8 tokens
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.max_tokens=10"))
    first = _records(out)
    assert sum(r["tokens"] for r in first) >= 10 and sum(r["tokens"] for r in first[:-1]) < 10
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *common, "distill.max_tokens=30", "resume=true"))
    extended = _records(out)
    assert extended[: len(first)] == first and sum(r["tokens"] for r in extended[:-1]) < 30 <= sum(
        r["tokens"] for r in extended
    )


def test_distill_prompts_from_topics_templates_and_the_model(
    tiny_base_model: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reuse_loaded_model(monkeypatch, tiny_base_model)
    (tmp_path / "topics.txt").write_text("# comment\nowls\nrivers\n", encoding="utf-8")
    (tmp_path / "templates.txt").write_text("What is {topic}?\nTell me about {topic}.\n", encoding="utf-8")
    (tmp_path / "exclude.txt").write_text("owl*\n", encoding="utf-8")
    questions = {"n": 0}

    def fake_questions(decoder: Any, topics: list[str], d: Any, seed: int, console: Any) -> list[str]:
        questions["n"] += 1
        return [f"Why do {t} matter?" for t in topics]

    monkeypatch.setattr(distill, "model_questions", fake_questions)
    out = tmp_path / "topics.jsonl"
    overrides = ("distill.prompts=null", f"distill.topics={tmp_path / 'topics.txt'}",
                 f"distill.templates={tmp_path / 'templates.txt'}", "distill.questions_per_topic=1",
                 f"distill.exclude={tmp_path / 'exclude.txt'}", "distill.samples_per_prompt=1")
    distill.run(distill_cfg(tiny_base_model, tmp_path, out, *overrides))
    asked = sorted(r["messages"][0]["content"] for r in _records(out))
    # Owls are excluded everywhere, the model's own questions included.
    assert asked == ["Tell me about rivers.", "What is rivers?", "Why do rivers matter?"]
    # The model's questions are kept beside the corpus: a resumed run asks the same ones.
    assert (tmp_path / "topics.jsonl.questions.txt").read_text(encoding="utf-8").splitlines() == [
        "Why do owls matter?", "Why do rivers matter?"]
    with pytest.raises(EetuneError, match="placeholder"):
        (tmp_path / "templates.txt").write_text("no placeholder\n", encoding="utf-8")
        distill.run(distill_cfg(tiny_base_model, tmp_path, tmp_path / "bad.jsonl", *overrides))
    assert questions["n"] == 1


def test_model_questions_are_decoded_short_and_deduplicated() -> None:
    """A question is one line: its decode stops at QUESTION_MAX_TOKENS, not distill.max_new_tokens."""
    calls: list[int | None] = []

    class FakeDecoder:
        def stream(self, jobs, d: Any, max_new_tokens: int | None = None):
            calls.append(max_new_tokens)
            for key, _, _ in reversed(list(jobs)):  # finishing order is not request order
                yield key, "Why do rivers flood in spring?" if key < 2 else f"Do owls sleep, {key}?", 7

    d = OmegaConf.create({"questions_per_topic": 2, "batch_size": 3, "max_new_tokens": 256})
    questions = distill.model_questions(FakeDecoder(), ["rivers", "owls"], d, 0, Console(file=io.StringIO()))
    assert questions == ["Why do rivers flood in spring?", "Do owls sleep, 2?", "Do owls sleep, 3?"]
    assert calls == [distill.QUESTION_MAX_TOKENS]


def test_distill_refuses_to_overwrite_and_checks_prompts(tiny_base_model: BaseModel, tmp_path: Path) -> None:
    out = tmp_path / "exists.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    with pytest.raises(EetuneError, match="already exists"):
        distill.run(distill_cfg(tiny_base_model, tmp_path, out))
    assert out.read_text(encoding="utf-8") == "keep me\n"

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(EetuneError, match=rf"{prompts}:2: expected an object with a non-empty string field 'prompt'"):
        distill.read_prompts(prompts)
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    assert distill.read_prompts(prompts) == ["a", "b"]
    with pytest.raises(EetuneError, match="prompt file not found"):
        distill.read_prompts(tmp_path / "nope.txt")

    bundled = distill.read_prompts(distill.DEFAULT_PROMPTS)
    assert len(bundled) >= 100 and len(set(bundled)) == len(bundled)
    # the decode benchmark measures on prompts no tuning data was made from
    bench = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "prompts.txt"
    bench_prompts = [p.strip() for p in bench.read_text(encoding="utf-8").splitlines() if p.strip()]
    assert len(bench_prompts) >= 10 and not set(bench_prompts) & set(bundled)


def test_questions_are_extracted_from_the_model_replies() -> None:
    assert distill.extract_question('A curious person might ask: "What\'s the best way to prune roses?"') == (
        "What's the best way to prune roses?")
    assert distill.extract_question("How do trains brake on ice?\nThey use sand.") == "How do trains brake on ice?"
    assert distill.extract_question("Darling, what a question. I'll get you there.") is None
    assert distill.extract_question("Why?") is None  # too short to be a prompt


def test_unseen_topic_prompts_are_absent_from_every_tuning_prompt() -> None:
    """The decode benchmark's second prompt set is about topics no bundled tuning prompt mentions:
    not the prompt file, not topics x templates, not the requests for model-written questions
    (whose answers the corpus build filters with distill.exclude=<these keywords>)."""
    bench = Path(__file__).resolve().parents[2] / "scripts" / "bench"
    keywords = distill.read_lines(bench / "unseen_keywords.txt", what="keyword")
    unseen = distill.read_lines(bench / "prompts_unseen.txt", what="prompt")
    assert len(unseen) >= 20 and len(set(unseen)) == len(unseen)
    assert all(distill.excluded(p, keywords) for p in unseen)  # each is about an unseen topic
    topics = distill.read_lines(distill.DEFAULT_TOPICS, what="topic")
    templates = distill.read_templates(distill.DEFAULT_TEMPLATES)
    tuning = distill.read_prompts(distill.DEFAULT_PROMPTS) + [t.format(topic=x) for x in topics for t in templates]
    tuning += [distill.QUESTION_REQUEST.format(topic=x) for x in topics]
    tuning += distill.read_lines(distill.DEFAULT_FOLLOW_UPS, what="follow-up")  # multi-turn's questions
    assert len(tuning) > 3000
    assert [p for p in tuning if distill.excluded(p, keywords)] == []
    first = distill.read_lines(bench / "prompts.txt", what="prompt")
    assert not set(first) & set(unseen)


def test_corpus_parts_keep_whole_batches_and_restore_the_corpus(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("parts", Path(__file__).parents[2] / "scripts" / "corpus" / "parts.py")
    parts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parts)
    corpus, store = tmp_path / "c.jsonl", tmp_path / "parts"
    (tmp_path / "c.jsonl.meta.json").write_text(json.dumps({"distill": {"batch_size": 2}}))
    lines = [json.dumps({"id": f"b{b}:p{p}:s0", "tokens": 3}) + "\n" for b in range(3) for p in range(2)]
    # Batch 2 has one of its two records, and a torn line follows: a build still writing.
    corpus.write_text("".join(lines[:5]) + '{"id": "b2:p1')
    parts.save(corpus, store)
    assert [p.name for p in parts.parts(store)] == ["part-000.jsonl.gz"]
    assert gzip.decompress(parts.parts(store)[0].read_bytes()).decode() == "".join(lines[:4])
    corpus.write_text("".join(lines))
    parts.save(corpus, store)  # batch 2 is whole now
    parts.save(corpus, store)  # nothing new: no empty part
    assert len(parts.parts(store)) == 2
    restored = tmp_path / "fresh" / "c.jsonl"
    parts.restore(restored, store)
    assert restored.read_text() == "".join(lines)
    assert json.loads((tmp_path / "fresh" / "c.jsonl.meta.json").read_text()) == {"distill": {"batch_size": 2}}
    prefix = tmp_path / "prefix" / "c.jsonl"  # a run pinned to the first parts
    parts.restore(prefix, store, first=1)
    assert prefix.read_text() == "".join(lines[:4])
    with pytest.raises(SystemExit, match="fewer than the 3 asked for"):
        parts.restore(tmp_path / "more" / "c.jsonl", store, first=3)
