"""`eetune data distill`: a self-distillation corpus written by the base model itself.

Prompts come from a prompt file, from topics x templates ("Explain {topic} to a beginner."),
and from questions the model writes itself about each topic; each prompt gets
`distill.samples_per_prompt` continuations, decoded `distill.batch_size` at a time. With
`distill.turns` > 1 each conversation goes on: the user asks a follow-up ("Can you give me a
concrete example?") and the model answers with the conversation so far in its context. The JSONL
output feeds straight back into tuning as `data=jsonl data.path=<out>`. Exits tuned on the
model's own outputs learn what the full model would say, which is exactly what early-exit
decoding must reproduce.

The corpus grows batch by batch: each batch's records are appended with one write and made
durable before the next batch starts, and every record names its batch. `resume=true`
continues an interrupted run, dropping a batch that was cut off mid-write; batch `b` always
holds the same items sampled with the same seed, so a resumed corpus equals an uninterrupted
one. Raising `distill.max_tokens` on resume extends a finished corpus. `model.dtype` may change
on resume (float32 begun on one CPU, bf16 where AMX makes batches cheaper): the meta records
from which batch on each dtype decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from eetune.config import EetuneConfig
from eetune.config.diff import changed_keys
from eetune.config.schema import DistillConfig, to_container
from eetune.console import make_console
from eetune.data.jsonl import iter_jsonl
from eetune.data.sources import read_text_file
from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel
from eetune.infer.engine import DecodeSettings, Engine
from eetune.infer.scheduler import BatchRequest, BatchScheduler
from eetune.rundir import atomic_write_json, atomic_write_text
from eetune.models import load_base_model
from eetune.data.chat import build_prompt_ids, chat_prompt_ids, stop_token_ids

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "distill_prompts.txt"
DEFAULT_TOPICS = PROMPTS_DIR / "distill_topics.txt"
DEFAULT_TEMPLATES = PROMPTS_DIR / "distill_templates.txt"
DEFAULT_FOLLOW_UPS = PROMPTS_DIR / "distill_follow_ups.txt"
DEFAULT_OUT_NAME = "distill.jsonl"
# How the model is asked to write a prompt about a topic (distill.questions_per_topic).
QUESTION_REQUEST = "Write one question a curious person might ask about {topic}. Reply with the question only."
# A question is one line (extract_question keeps <= 300 characters): longer replies are cut here,
# so a rambling row does not hold its whole batch for distill.max_new_tokens steps.
QUESTION_MAX_TOKENS = 64
# Room for a prompt, or for a follow-up question, in the decode caches (distill prompts are a line or two).
MAX_PROMPT_TOKENS = 256
# Settings a resumed corpus may change without changing what its batches hold.
RESUMABLE_KEYS = ("max_tokens",)
# The meta's record of the dtype each run of batches was decoded in ({first batch: dtype}): a
# corpus may continue in another dtype (float32 begun on an AVX2 CPU, bf16 on one with AMX).
DTYPE_SEGMENTS = "dtype_from_batch"


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl/.json file (a `prompt` field per line) or text (one per line)."""
    if path.suffix.lower() in (".jsonl", ".json"):
        prompts = []
        for where, record in iter_jsonl(path, what="prompt"):
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise EetuneError(f"{where}: expected an object with a non-empty string field 'prompt'")
            prompts.append(record["prompt"])
    else:
        prompts = read_lines(path, what="prompt")
    if not prompts:
        raise EetuneError(f"{path} holds no prompts")
    return prompts


def read_lines(path: Path, what: str) -> list[str]:
    """Non-blank lines of a text file; lines starting with # are comments."""
    lines = (line.strip() for line in read_text_file(path, what=what).split("\n"))
    return [line for line in lines if line and not line.startswith("#")]


def read_templates(path: Path) -> list[str]:
    templates = read_lines(path, what="template")
    bad = [t for t in templates if "{topic}" not in t]
    if bad:
        raise EetuneError(f"{path}: every template needs a {{topic}} placeholder; this one has none: {bad[0]!r}")
    return templates


def sample_seed(seed: int, *keys: int) -> int:
    """A well-mixed sampling seed fixed by (cfg.seed, keys...)."""
    text = ":".join(str(k) for k in ("eetune-distill", seed, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def distill_record(record_id: str, tokens: int, conversation: list[dict[str, str]], chat: bool) -> dict[str, Any]:
    """A record `data=jsonl` reads back: the chat turns, or (one turn, chat=false) the prompt and
    completion as one text. `tokens` counts the generated ones."""
    head = {"id": record_id, "tokens": tokens}
    if chat:
        return {**head, "messages": conversation}
    return {**head, "text": "".join(turn["content"] for turn in conversation)}


def user_turn(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def follow_up_question(follow_ups: Sequence[str], seed: int, prompt: int, sample: int, turn: int) -> str:
    """The user's question opening `turn` (1-based after the first) of conversation (prompt, sample)."""
    return random.Random(sample_seed(seed, prompt, sample, turn, -2)).choice(follow_ups)


def answer_seed(seed: int, prompt: int, sample: int, turn: int) -> int:
    """The sampling seed of one answer; the first turn's is the single-turn corpus's."""
    return sample_seed(seed, prompt, sample) if turn == 0 else sample_seed(seed, prompt, sample, turn)


def _path(value: str, default: Path) -> Path:
    return default if value == "bundled" else Path(value).expanduser()


def excluded(prompt: str, keywords: Sequence[str]) -> bool:
    """Whether the prompt mentions any keyword (whole words, any case; a keyword may end in *)."""
    return any(_keyword_re(k).search(prompt) for k in keywords)


def _keyword_re(keyword: str) -> re.Pattern[str]:
    suffix = r"\w*" if keyword.endswith("*") else ""
    return re.compile(r"\b" + re.escape(keyword.rstrip("*")) + suffix + r"\b", re.IGNORECASE)


# -- decoding ---------------------------------------------------------------------------------


class Jobs:
    """Decode jobs: follow-up turns first (queued as answers arrive), then new conversations.
    Unlike a generator it may be drawn from again after running dry, once a follow-up is queued."""

    def __init__(self, first_turns: Iterable[tuple[Any, Any, int]]) -> None:
        self.first_turns = iter(first_turns)
        self.follow_ups: deque[tuple[Any, Any, int]] = deque()

    def __iter__(self) -> Jobs:
        return self

    def __next__(self) -> tuple[Any, Any, int]:
        return self.follow_ups.popleft() if self.follow_ups else next(self.first_turns)


@dataclass
class Decoder:
    """The base model with its tokenizer, decoding chat or raw prompts with continuous batching:
    a finished answer's row takes the next prompt at once, so no row idles until its batch's
    longest answer ends. Every prompt has its own sampling seed, so an answer does not depend
    on what it was decoded beside."""

    scheduler: BatchScheduler
    tokenizer: Any
    stop_ids: frozenset[int]
    chat: bool

    def stream(self, jobs: Iterable[tuple[Any, str | list[dict[str, str]], int]], d: DistillConfig,
               max_new_tokens: int | None = None) -> Iterator[tuple[Any, str, int]]:
        """Decode (key, prompt or conversation, seed) jobs; yield (key, completion text, generated
        tokens) as each finishes, in finishing order. Closing the iterator early cancels the answers
        in flight."""
        jobs = iter(jobs)
        live: dict[BatchRequest, Any] = {}
        try:
            while True:
                while self.scheduler.has_room and (job := next(jobs, None)) is not None:
                    key, prompt, seed = job
                    settings = DecodeSettings(
                        max_new_tokens=max_new_tokens or d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                        seed=seed, stop_ids=self.stop_ids,
                    )
                    ids = (chat_prompt_ids(self.tokenizer, prompt) if isinstance(prompt, list)
                           else build_prompt_ids(self.tokenizer, prompt, self.chat))
                    request = BatchRequest(ids, settings)
                    if self.scheduler.admit(request):
                        yield self._answer(key, request)
                    else:
                        live[request] = key
                if not live:
                    return
                for request in self.scheduler.step():
                    yield self._answer(live.pop(request), request)
        finally:
            for request in live:
                self.scheduler.cancel(request)

    def converse(self, starts: Iterable[tuple[Any, str, int, int]], d: DistillConfig, follow_ups: Sequence[str],
                 seed: int) -> Iterator[tuple[Any, list[dict[str, str]], int]]:
        """Decode `d.turns`-turn conversations from (key, prompt, prompt index, sample index);
        yield (key, its turns, its generated tokens) as each ends. Each answer's seed is fixed by
        (prompt, sample, turn), so a conversation does not depend on what it was decoded beside."""
        talks: dict[Any, tuple[list[dict[str, str]], int, int, int]] = {}  # key -> (turns so far, tokens, i, j)

        def first_turns() -> Iterator[tuple[Any, str | list[dict[str, str]], int]]:
            for key, prompt, i, j in starts:
                opening = [user_turn(prompt)]
                talks[key] = (opening, 0, i, j)
                yield (key, 0), opening if self.chat else prompt, answer_seed(seed, i, j, 0)

        jobs = Jobs(first_turns())
        answers = self.stream(jobs, d)
        try:
            for (key, turn), text, n in answers:
                so_far, generated, i, j = talks.pop(key)
                conversation = [*so_far, {"role": "assistant", "content": text}]
                if turn + 1 == d.turns:
                    yield key, conversation, generated + n
                    continue
                # The user asks a follow-up; its answer sees the whole conversation. It is queued
                # ahead of new conversations, so a conversation ends soon after it starts.
                conversation.append(user_turn(follow_up_question(follow_ups, seed, i, j, turn + 1)))
                talks[key] = (conversation, generated + n, i, j)
                jobs.follow_ups.append(((key, turn + 1), conversation, answer_seed(seed, i, j, turn + 1)))
        finally:
            answers.close()  # cancels the answers in flight

    def _answer(self, key: Any, request: BatchRequest) -> tuple[Any, str, int]:
        tokens = request.result.tokens
        return key, self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens)


def extract_question(text: str) -> str | None:
    """The question in a model's reply: a quoted one ('A curious person might ask: "...?"'), else
    a first line that is one; None when the reply holds no question of sensible length."""
    quoted = re.search(r'"([^"\n]{15,300}\?)"', text)
    if quoted:
        return quoted.group(1).strip()
    first = text.strip().split("\n")[0].strip()
    return first if first.endswith("?") and 15 <= len(first) <= 300 else None


def model_questions(decoder: Decoder, topics: list[str], d: DistillConfig, seed: int, console: Console) -> list[str]:
    """`questions_per_topic` questions the model writes about each topic, deduplicated."""
    requests = [QUESTION_REQUEST.format(topic=t) for t in topics for _ in range(d.questions_per_topic)]
    questions: list[str] = []
    seen: set[str] = set()
    jobs = ((k, request, sample_seed(seed, -1, k)) for k, request in enumerate(requests))
    replies: dict[int, str] = {}
    with _progress(console, "questions") as progress:
        task = progress.add_task("questions", total=len(requests))
        for k, text, _ in decoder.stream(jobs, d, min(QUESTION_MAX_TOKENS, d.max_new_tokens)):
            replies[k] = text
            progress.advance(task)
    for k in range(len(requests)):  # in request order: the same questions however they finished
        question = extract_question(replies[k])
        if question is not None and question.lower() not in seen:
            seen.add(question.lower())
            questions.append(question)
    return questions


# -- the corpus file ------------------------------------------------------------------------


def completed_batches(out: Path, batch_sizes: Sequence[int]) -> tuple[int, int, int]:
    """(batches complete from the start, their generated tokens, their byte length) in `out`.

    A batch counts only when all its records are there and whole; whatever follows the last
    complete batch (a batch cut off mid-write) is to be dropped.
    """
    done = tokens = good_bytes = 0
    in_batch = batch_tokens = 0
    offset = 0
    with out.open("rb") as f:
        for raw in f:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
                batch = int(str(record["id"]).split(":")[0].removeprefix("b"))
                count = int(record["tokens"])
            except (ValueError, KeyError, TypeError):
                break
            if batch != done or done >= len(batch_sizes):
                break
            in_batch += 1
            batch_tokens += count
            if in_batch == batch_sizes[done]:
                done, tokens, good_bytes = done + 1, tokens + batch_tokens, offset
                in_batch = batch_tokens = 0
    return done, tokens, good_bytes


def _append(out: Path, lines: list[str]) -> None:
    """One batch's records in one write, durable before the next batch starts."""
    with out.open("a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def _progress(console: Console, what: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]distill[/] {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console,
    )


# -- the stage --------------------------------------------------------------------------------


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _questions_path(out: Path) -> Path:
    return out.with_name(out.name + ".questions.txt")


def _settings(cfg: EetuneConfig) -> dict[str, Any]:
    """What fixes the content of every batch: recorded beside the corpus, compared on resume."""
    return {"seed": cfg.seed, "model": cfg.model.name, "checkpoint_dir": cfg.model.checkpoint_dir,
            "dtype": cfg.model.dtype, "distill": _distill_settings(cfg.distill)}


def _distill_settings(d: DistillConfig) -> dict[str, Any]:
    return {key: value for key, value in to_container(d).items() if key != "out"}


def _check_resume(out: Path, cfg: EetuneConfig) -> None:
    meta = _meta_path(out)
    if not meta.is_file():
        raise EetuneError(f"resume=true but {meta} is missing: {out} was not written by a resumable distill run")
    old, new = json.loads(meta.read_text(encoding="utf-8")), _settings(cfg)
    # A setting added since the corpus was begun had its default then.
    old["distill"] = {**_distill_settings(DistillConfig()), **old["distill"]}
    for key in RESUMABLE_KEYS:
        old["distill"].pop(key, None)
        new["distill"].pop(key, None)
    for settings in (old, new):
        for key in ("dtype", DTYPE_SEGMENTS):
            settings.pop(key, None)
    changed = changed_keys(old, new)
    if changed:
        raise EetuneError(
            f"cannot resume {out}: its settings differ ({', '.join(changed)}); only distill.max_tokens and "
            "model.dtype may change on resume; resume with the original settings or choose another distill.out"
        )


def _record_dtype(out: Path, first_batch: int, dtype: str) -> None:
    """Note in the meta that batches from `first_batch` on are decoded in `dtype` (if that changes)."""
    path = _meta_path(out)
    meta = json.loads(path.read_text(encoding="utf-8"))
    segments = meta.get(DTYPE_SEGMENTS, {"0": meta["dtype"]})
    if segments[max(segments, key=int)] == dtype:
        return
    # A segment begun at or after `first_batch` holds no batch yet: this run replaces it.
    kept = {k: v for k, v in segments.items() if int(k) < first_batch}
    if not kept or kept[max(kept, key=int)] != dtype:
        kept[str(first_batch)] = dtype
    atomic_write_json(path, {**meta, DTYPE_SEGMENTS: kept})


def conversation_positions(d: DistillConfig) -> int:
    """Cache positions a conversation needs: per turn a prompt or follow-up (a few dozen tokens) and its answer."""
    return d.turns * (MAX_PROMPT_TOKENS + d.max_new_tokens)


def read_follow_ups(d: DistillConfig) -> list[str]:
    """The follow-up questions multi-turn conversations draw from (none for one turn)."""
    if d.turns == 1:
        return []
    path = _path(d.follow_ups, DEFAULT_FOLLOW_UPS)
    follow_ups = read_lines(path, what="follow-up")
    if not follow_ups:
        raise EetuneError(f"distill.follow_ups={path} holds no follow-up questions")
    return follow_ups


def gather_prompts(d: DistillConfig, decoder: Decoder, seed: int, out: Path, console: Console) -> list[str]:
    """Prompt file + topics x templates + model-written questions, minus excluded keywords."""
    prompts = read_prompts(_path(d.prompts, DEFAULT_PROMPTS)) if d.prompts else []
    if d.topics:
        topics = read_lines(_path(d.topics, DEFAULT_TOPICS), what="topic")
        templates = read_templates(_path(d.templates, DEFAULT_TEMPLATES)) if d.templates else []
        prompts += [t.format(topic=topic) for topic in topics for t in templates]
        if d.questions_per_topic:
            cached = _questions_path(out)
            if cached.is_file():  # written once, so a resumed run drafts the same questions
                questions = read_lines(cached, what="questions")
            else:
                questions = model_questions(decoder, topics, d, seed, console)
                atomic_write_text(cached, "".join(q + "\n" for q in questions))
            prompts += questions
    keywords = read_lines(Path(d.exclude).expanduser(), what="exclude") if d.exclude else []
    kept = list(dict.fromkeys(p for p in prompts if not excluded(p, keywords)))
    if len(kept) < len(prompts):
        console.print(f"distill: {len(prompts) - len(kept)} duplicate or excluded prompts dropped")
    if not kept:
        raise EetuneError("distill: no prompts left (check distill.prompts, distill.topics and distill.exclude)")
    return kept


def run(cfg: EetuneConfig, console: Console | None = None) -> Path:
    """Generate the corpus into `distill.out` (default `<run_dir>/distill.jsonl`)."""
    d = cfg.distill
    console = console or make_console()
    d.validate_run()
    out = Path(d.out).expanduser() if d.out else Path(cfg.run_dir) / DEFAULT_OUT_NAME
    if out.exists() and not cfg.resume:
        raise EetuneError(
            f"{out} already exists: choose another distill.out=... (it is never overwritten), "
            "or pass resume=true to continue it"
        )
    if cfg.resume and out.exists():
        _check_resume(out, cfg)
    elif cfg.resume:
        raise EetuneError(f"resume=true but {out} does not exist: start without resume=true")
    out.parent.mkdir(parents=True, exist_ok=True)
    follow_ups = read_follow_ups(d)

    base = load_base_model(**vars(cfg.model))
    if base.tokenizer is None:
        raise EetuneError(f"model {base.name} has no tokenizer: distillation needs one to read prompts")
    positions = min(base.model.max_seq_len, conversation_positions(d))
    decoder = Decoder(
        BatchScheduler(Engine(EarlyExitModel(base.model, [])), max_batch_size=d.batch_size, max_seq_len=positions),
        base.tokenizer, frozenset(stop_token_ids(base.tokenizer)), d.chat,
    )
    prompts = gather_prompts(d, decoder, cfg.seed, out, console)

    # Items (prompt, sample) in a fixed shuffled order: a token budget then covers every topic.
    items = [(i, j) for j in range(d.samples_per_prompt) for i in range(len(prompts))]
    random.Random(cfg.seed).shuffle(items)
    batches = [items[s : s + d.batch_size] for s in range(0, len(items), d.batch_size)]
    if not out.exists():
        atomic_write_json(_meta_path(out), _settings(cfg))
        out.touch()
    done, tokens, good_bytes = completed_batches(out, [len(b) for b in batches])
    if out.stat().st_size > good_bytes:
        console.print(f"distill: dropping an incomplete batch at the end of {out}")
        os.truncate(out, good_bytes)
    _record_dtype(out, done, cfg.model.dtype)

    budget = d.max_tokens
    start_tokens, t0 = tokens, time.perf_counter()
    if budget is not None and tokens >= budget:
        batches = batches[:done]  # nothing left to decode
    with _progress(console, "answers") as progress:
        task = progress.add_task("answers", total=budget if budget else len(items),
                                 completed=tokens if budget else min(done * d.batch_size, len(items)))
        starts = (((b, k), prompts[i], i, j) for b in range(done, len(batches)) for k, (i, j) in enumerate(batches[b]))
        answers: dict[int, dict[int, tuple[list[dict[str, str]], int]]] = {}
        answer_stream = decoder.converse(starts, d, follow_ups, cfg.seed)
        b = done
        for (batch_index, k), conversation, n in answer_stream:
            answers.setdefault(batch_index, {})[k] = (conversation, n)
            # Batches are written whole and in order, each in one durable append.
            while b < len(batches) and len(answers.get(b, {})) == len(batches[b]):
                if budget is not None and tokens >= budget:
                    break
                batch, got = batches[b], answers.pop(b)
                lines = [
                    json.dumps(distill_record(f"b{b}:p{i}:s{j}", got[k][1], got[k][0], d.chat),
                               ensure_ascii=False) + "\n"
                    for k, (i, j) in enumerate(batch)
                ]
                _append(out, lines)
                batch_tokens = sum(n for _, n in got.values())
                tokens += batch_tokens
                progress.advance(task, batch_tokens if budget else len(batch))
                if not console.is_terminal:  # a log file gets a line per batch instead of a live bar
                    rate = (tokens - start_tokens) / (time.perf_counter() - t0)
                    console.print(f"distill: batch {b + 1}/{len(batches)}, {tokens} tokens, {rate:.1f} tokens/s")
                b += 1
            if b == len(batches) or (budget is not None and tokens >= budget):
                answer_stream.close()  # later batches' answers in flight are dropped
                break
    elapsed = time.perf_counter() - t0
    rate = (tokens - start_tokens) / elapsed if elapsed > 0 else 0.0
    console.print(
        f"distill: {out} holds {tokens} generated tokens from {len(prompts)} prompts "
        f"({tokens - start_tokens} new, {rate:.1f} tokens/s)",
    )
    return out
