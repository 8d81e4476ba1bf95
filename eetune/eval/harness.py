"""lm-evaluation-harness model type `eetune`: a run dir's early-exit model behind lm-eval's LM API.

    eetune lm-eval --model eetune --model_args run_dir=runs/quick,mode=early_exit,threshold=0.8 --tasks <task>

`eetune lm-eval` is lm-eval's own command line (every flag, the same output) run after this
module has registered the model type. lm-eval 0.4.13 discovers model types only from its
built-in table and from registrations in the running process (no entry-point plugins), so
its bare `lm_eval` script cannot see third-party models; from Python, `import
eetune.eval.harness` before `lm_eval.simple_evaluate(model="eetune", ...)` does the same.

- loglikelihood (multiple choice, perplexity): teacher-forced under the exit policy
  (eetune.eval.scoring): each token is scored by the exit the engine would leave at.
- generate_until: the decoding engine itself (full, early_exit or self_speculative).

model_args: run_dir (required), mode (full | early_exit | self_speculative), threshold (default:
the run's calibrated one, else 0.8), exit_thresholds (one per exit, shallowest first, joined by
"/": 0.9/0.8/1.0; instead of threshold), confidence (max_prob | learned | frequent), draft_exit, draft_len, draft_schedule,
dtype, max_length, max_gen_toks, seed, batch_size.

Batches: `--batch_size B` (or batch_size=B in model_args, which wins over the flag) scores B
log-likelihood requests in one right-padded forward, and decodes B generate_until requests
with the same generation kwargs together (Engine.generate_batch, lock step); each result
equals batch 1's (float32). self_speculative and sampled (do_sample) requests still decode
one at a time (sampling: so each request keeps its own seeded stream). `auto` / `auto:N`
mean AUTO_BATCH_SIZE (capped by --max_batch_size): there is no out-of-memory search.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in types first: the registry skips them once non-empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from omegaconf import OmegaConf
from tqdm import tqdm

from eetune.config.schema import ModelConfig
from eetune.errors import EetuneError
from eetune.eval.scoring import ExitPolicy, PolicyScorer, Scored
from eetune.exits import load_exits, read_manifest
from eetune.infer.engine import DecodeResult, DecodeSettings, Engine
from eetune.eval.calibration import run_calibration
from eetune.infer.policy import check_exit_settings, model_exit_rules, parse_thresholds, resolve_thresholds
from eetune.rundir import CONFIG_FILE, resolve_run_dir
from eetune.models import load_base_model
from eetune.data.chat import stop_token_ids
from eetune.infer.draft_vocab import load_token_order


# What `--batch_size auto` means here (lm-eval's own models search for the largest batch that fits).
AUTO_BATCH_SIZE = 8


@register_model("eetune")
class EetuneLM(TemplateLM):
    """An eetune run dir (augment or tune) decoded in `mode`."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> EetuneLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> EetuneLM:
        """model_args win over lm-eval's flags (its CLI passes batch_size=1 and a device even when unset)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def __init__(
        self,
        run_dir: str | None = None,
        mode: str = "full",
        threshold: float | None = None,
        exit_thresholds: str | None = None,
        confidence: str = "max_prob",
        draft_exit: int | None = None,
        draft_len: int = 4,
        draft_schedule: str = "constant",
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not run_dir:
            raise EetuneError("the eetune model type needs run_dir=<an eetune augment or tune run dir> in --model_args")
        run_dir = resolve_run_dir(run_dir)
        read_manifest(run_dir)
        model_cfg = _run_model_config(Path(run_dir), dtype, device)
        base = load_base_model(**vars(model_cfg))
        per_exit = None if exit_thresholds is None else parse_thresholds(exit_thresholds, "exit_thresholds")
        if threshold is not None and per_exit is not None:
            raise EetuneError("model_args give both threshold and exit_thresholds: give one threshold for every exit "
                              "or one per exit")
        calibrated = {} if threshold is not None or per_exit is not None else run_calibration(run_dir, base.model)
        threshold, per_exit = resolve_thresholds(
            None if threshold is None else float(threshold), per_exit, confidence, calibrated)
        self.policy = ExitPolicy(mode, float(threshold), confidence, per_exit)
        if base.tokenizer is None:
            raise EetuneError(f"model {base.name} has no tokenizer; lm-eval needs one")
        self.tokenizer = base.tokenizer
        self.model = load_exits(run_dir, base.model, base.fingerprint, base.checkpoint_dir)
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.stop_ids = frozenset(stop_token_ids(self.tokenizer))
        # As generate and serve decode: the `frequent` policy's head (and FR-Spec's) from the run's token frequencies.
        token_order = load_token_order(Path(run_dir), always=tuple(sorted(self.stop_ids)))
        self.engine = Engine(self.model, max_batch_size=self.batch_size, token_order=token_order)
        self.scorer = PolicyScorer(self.model, self.policy, token_order)
        self.draft_exit, self.draft_len, self.draft_schedule = draft_exit, int(draft_len), draft_schedule
        self.max_length = min(int(max_length or model_cfg.max_seq_len), base.model.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._device = base.model.tok_embeddings.weight.device
        # Decoding statistics over every generate_until request, for get_model_info().
        self.exit_counts: Counter[int] = Counter()
        self.decoded_tokens = 0
        self.decode_s = 0.0
        # Fail on bad settings now, not at the first request.
        check_exit_settings(self._settings(1, 0.0), **model_exit_rules(self.model), has_token_order=token_order is not None)

    # -- tokenisation ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- scoring ---------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # Keep the newest max_length + 1 tokens: the model sees max_length positions.
        pairs = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            pairs.append((whole[: len(whole) - len(continuation)], list(continuation)))
        scored = self._score(pairs, disable_tqdm, "eetune loglikelihood")
        out = [(s.logprob, s.is_greedy) for s in scored]
        for (request, _, _), answer in zip(requests, out):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = []  # (request index, context, continuation), every request's windows in order
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            ):
                windows.append((i, list(context), list(continuation)))
        scored = self._score([(c, k) for _, c, k in windows], disable_tqdm, "eetune loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for (i, _, _), s in zip(windows, scored):
            totals[i] += s.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool, desc: str) -> list[Scored]:
        """PolicyScorer.score of each (context, continuation), batch_size at a time, longest first."""
        collator = Collator(pairs, sort_fn=lambda p: -(len(p[0]) + len(p[1])))
        scored = []
        with tqdm(total=len(pairs), disable=disable_tqdm, desc=desc) as bar:
            for chunk in collator.get_batched(n=self.batch_size):
                scored += self.scorer.score_batch(chunk)
                bar.update(len(chunk))
        return collator.get_original(scored)

    # -- generation ------------------------------------------------------------------------

    def _settings(self, max_new_tokens: int, temperature: float, extra_stops: frozenset[int] = frozenset()) -> DecodeSettings:
        return DecodeSettings(
            mode=self.policy.mode, threshold=self.policy.threshold, exit_thresholds=self.policy.exit_thresholds,
            confidence=self.policy.confidence,
            draft_exit=self.draft_exit, draft_len=self.draft_len, draft_schedule=self.draft_schedule,
            max_new_tokens=max_new_tokens,
            temperature=temperature, seed=self.seed, stop_ids=self.stop_ids | extra_stops,
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation kwargs decode batch_size at a time (longest first);
        results come back in the requests' order."""
        args = [request.args for request in requests]
        collator = Collator(args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_fn=lambda a: a[1], group_by="gen_kwargs")
        out = []
        with tqdm(total=len(args), disable=disable_tqdm, desc="eetune generate_until") as bar:
            for chunk in collator.get_batched(n=self.batch_size):
                texts = self._generate_chunk([context for context, _ in chunk], chunk[0][1])
                for request_args, text in zip(chunk, texts):
                    self.cache_hook.add_partial("generate_until", request_args, text)
                out += texts
                bar.update(len(chunk))
        return collator.get_original(out)

    def _generate_chunk(self, contexts: list[str], gen_kwargs: dict | None) -> list[str]:
        """Decode contexts sharing gen_kwargs: together where the mode and sampling allow."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        # A stop string that is one token stops the engine itself; the rest are cut below.
        single = {tuple(self.tok_encode(s)) for s in until}
        extra = frozenset(t[0] for t in single if len(t) == 1)
        prompts = [self.tok_encode(context)[-max(self.max_length - max_gen, 1) :] for context in contexts]
        limits = [min(max_gen, self.max_length - len(ids)) for ids in prompts]
        results: list[DecodeResult | None] = [None] * len(prompts)
        together = len(prompts) > 1 and self.policy.mode != "self_speculative" and temperature == 0.0
        # Rows near max_length get fewer new tokens: one batch per limit (usually one in all).
        for limit in dict.fromkeys(limits):
            rows = [i for i, n in enumerate(limits) if n == limit]
            settings = self._settings(limit, temperature, extra)
            if together and len(rows) > 1:
                batch = self.engine.generate_batch([prompts[i] for i in rows], settings)
                self.decode_s += max(r.decode_s for r in batch)  # every row reports the batch's time
                results_of = dict(zip(rows, batch))
            else:
                results_of = {i: self.engine.generate(prompts[i], settings) for i in rows}
                self.decode_s += sum(r.decode_s for r in results_of.values())
            for i, result in results_of.items():
                results[i] = result
                self.exit_counts.update(result.exit_layers)
                self.decoded_tokens += max(len(result.tokens) - 1, 0)
        texts = []
        for result in results:
            text = self.tok_decode(result.tokens)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts

    def get_model_info(self) -> dict[str, Any]:
        """Goes into lm-eval's results["config"]: the policy and what decoding did."""
        total = sum(self.exit_counts.values())
        info: dict[str, Any] = {
            "eetune_mode": self.policy.mode,
            "eetune_threshold": self.policy.threshold if self.policy.exit_thresholds is None else None,
            "eetune_exit_thresholds": None if self.policy.exit_thresholds is None else list(self.policy.exit_thresholds),
            "eetune_confidence": self.policy.confidence,
            "eetune_exit_layers": self.model.exit_layers,
            "eetune_batch_size": self.batch_size,
        }
        if total:
            info["eetune_mean_exit_layer"] = sum(layer * n for layer, n in self.exit_counts.items()) / total
            info["eetune_exit_counts"] = {str(layer): n for layer, n in sorted(self.exit_counts.items())}
        if self.decode_s > 0:
            info["eetune_decode_tokens_per_s"] = self.decoded_tokens / self.decode_s
        return info


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval's batch_size (an int, its string, or auto / auto:N) as a fixed batch size."""
    if batch_size is None:
        return 1
    if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
        return max(1, min(AUTO_BATCH_SIZE, int(max_batch_size) if max_batch_size else AUTO_BATCH_SIZE))
    try:
        size = int(batch_size)
    except ValueError:
        raise EetuneError(f"batch_size={batch_size!r} must be a positive integer or auto") from None
    if size < 1:
        raise EetuneError(f"batch_size={batch_size!r} must be a positive integer or auto")
    return size


def _run_model_config(run_dir: Path, dtype: str | None, device: str | None) -> ModelConfig:
    """The run's own model section (what its exits were tuned on), with dtype/device overrides."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise EetuneError(f"{run_dir} has no {CONFIG_FILE}: is it an eetune augment or tune run dir?")
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path).model))
    if dtype:
        model_cfg.dtype = dtype
    # lm-eval's CLI passes --device (default cuda:0) to every model; use it only where it exists.
    if device and (device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())):
        model_cfg.device = device
    return model_cfg


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, in this process, with the `eetune` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()

