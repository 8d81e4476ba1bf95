"""Quality of generated text: ROUGE-L (summaries, agreement with the full model), SQuAD F1 (QA),
and position-wise token agreement between two greedy outputs."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (rouge-score's tokenizer: lowercase alphanumeric words); max over references."""
    refs = [references] if isinstance(references, str) else list(references)
    return max(_rouge_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in refs)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1 between normalised answers; max over references."""
    refs = [references] if isinstance(references, str) else list(references)
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(ref).split()) for ref in refs)


def _f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:
        return float(predicted == reference)
    common = sum((Counter(predicted) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of the reference's positions where `tokens` has the same token (1.0 for an empty reference)."""
    if not reference:
        return 1.0
    same = sum(1 for a, b in zip(tokens, reference) if a == b)
    return same / len(reference)
