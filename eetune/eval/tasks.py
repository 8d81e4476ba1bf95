"""Evaluation tasks from local JSONL files, mirroring the paper's evaluation.

Two kinds, picked by the task's metric:

- generation (`rouge_l`, like CNN/DM and XSUM summaries; `f1`, like NarrativeQA answers):
  `{"prompt": str, "reference": str | [str, ...]}` per line; the score is the max over references.
- multiple choice (`exact_match`, like MMLU): `{"question": str, "choices": [str, ...],
  "answer": int | str}`; the model picks the choice with the highest log-likelihood of
  " <choice>" after "Question: <question>\\nAnswer:", and scores 1 when that is `answer`
  (a 0-based index, or the choice's text).

Bundled tasks (a few dozen items written for eetune) live in eetune/data/tasks/.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eetune.data.jsonl import iter_jsonl
from eetune.errors import EetuneError
from eetune.eval.text_metrics import rouge_l, token_f1

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data" / "tasks"
GENERATION_METRICS = ("rouge_l", "f1")
CHOICE_METRICS = ("exact_match",)
METRICS = GENERATION_METRICS + CHOICE_METRICS


@dataclass(frozen=True)
class GenerationItem:
    prompt: str
    references: tuple[str, ...]
    where: str  # path:line


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    where: str

    @property
    def context(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    def continuation(self, index: int) -> str:
        return f" {self.choices[index]}"


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    metric: str
    items: tuple[GenerationItem, ...] | tuple[ChoiceItem, ...]

    @property
    def is_generation(self) -> bool:
        return self.metric in GENERATION_METRICS

    def score_generation(self, text: str, item: GenerationItem) -> float:
        return rouge_l(text, item.references) if self.metric == "rouge_l" else token_f1(text, item.references)


def bundled_tasks() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.jsonl"))


def task_path(name: str, path: str | None) -> Path:
    """The task's file: `path`, or the bundled task called `name`."""
    if path:
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise EetuneError(f"task file not found: {path} (task '{name}'): give eval.tasks[...].path an existing JSONL file")
        return resolved
    bundled = BUNDLED_DIR / f"{name}.jsonl"
    if not bundled.is_file():
        raise EetuneError(
            f"task '{name}' has no path and is not a bundled task (bundled: {', '.join(bundled_tasks())}): "
            "set its path to a JSONL file"
        )
    return bundled


def load_task(name: str, path: str | None, metric: str, max_items: int | None = None) -> Task:
    """Read and check every line of a task file; a bad line fails as path:line with what is wrong."""
    if metric not in METRICS:
        raise EetuneError(f"task '{name}' has metric {metric!r}; choose one of {', '.join(METRICS)}")
    file = task_path(name, path)
    parse = _generation_item if metric in GENERATION_METRICS else _choice_item
    items = [parse(record, where) for where, record in iter_jsonl(file, what="task")]
    if not items:
        raise EetuneError(f"task file {file} holds no items")
    return Task(name, file, metric, tuple(items[:max_items] if max_items else items))


def _generation_item(record: Mapping[str, Any], where: str) -> GenerationItem:
    prompt, reference = record.get("prompt"), record.get("reference")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EetuneError(f"{where}: a generation item needs a non-empty string 'prompt'")
    references = [reference] if isinstance(reference, str) else reference
    if not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
        raise EetuneError(f"{where}: a generation item needs 'reference': a string or a non-empty list of strings")
    return GenerationItem(prompt, tuple(references), where)


def _choice_item(record: Mapping[str, Any], where: str) -> ChoiceItem:
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise EetuneError(f"{where}: a multiple-choice item needs a non-empty string 'question'")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EetuneError(f"{where}: a multiple-choice item needs 'choices': a list of at least 2 non-empty strings")
    if isinstance(answer, str):
        if answer not in choices:
            raise EetuneError(f"{where}: 'answer' {answer!r} is not one of its choices")
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise EetuneError(f"{where}: 'answer' must be a choice's 0-based index (0..{len(choices) - 1}) or its text")
    return ChoiceItem(question, tuple(choices), answer, where)
