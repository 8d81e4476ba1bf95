"""The typed config schema: one dataclass per section, registered in Hydra's ConfigStore.

Recipes (`recipes/*.yaml`) and groups (`configs/<group>/*.yaml`) are merged onto these
dataclasses, so an unknown key or a wrongly typed value fails at composition time.
Allowed values of string fields are listed in `CHOICES`; each section's `validate()` checks
them and every other value rule a type cannot express, with one-line `EetuneError` messages.
`compose_config` returns an `EetuneConfig` instance and calls `EetuneConfig.validate()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from eetune.errors import EetuneError
from eetune.exits.spec import ARCHS, HEADS, INITS, NORM_INITS
from eetune.exits.spec import CONFIDENCES as ESTIMATORS
from eetune.infer.policy import CONFIDENCES, MAX_DRAFT_LEN, MODES, check_threshold


@dataclass
class ModelConfig:
    """The frozen base model."""

    # Registry name (`eetune.models.list_models()`): picks the torchtune builder.
    name: str = "smollm2_135m"
    # Local Hugging Face checkpoint dir; None means the embedded SmolLM2 default.
    checkpoint_dir: Optional[str] = None
    # float32, bfloat16, float16, or auto: bfloat16 where the device computes it natively, else
    # float32 (fixed when the config is composed; `plan` sizes GPUs, so auto is bfloat16 there).
    dtype: str = "float32"
    # cpu, cuda, cuda:1, ...
    device: str = "cpu"
    # Longest sequence the model is built for (RoPE cache and KV cache size).
    max_seq_len: int = 2048

    def validate(self) -> None:
        check_choices(self, "model")
        check_positive(self, "model", "max_seq_len")


@dataclass
class ExitsConfig:
    """Where the early exits sit and what they are (the README's "Exits" table)."""

    # 1-based layer numbers: an exit reads the output of that layer (1..n_layers-1).
    layers: List[int] = field(default_factory=lambda: [8, 16, 24])
    arch: str = "mlp"
    init: str = "copy"
    # `shared` reuses the frozen LM head (cheap; the paper's tied-embedding setting),
    # `copy` gives each exit its own trainable copy of it.
    head: str = "shared"
    # Std of the normal init for `random` exits.
    init_std: float = 0.02
    # init=copy: `copy` takes the norms from the backbone too, `ones` starts them at identity.
    norm_init: str = "copy"
    # A tiny learned estimator per exit that predicts "my top-1 equals the final layer's",
    # so inference can skip the vocabulary head where it would not exit: none, linear, mlp.
    confidence: str = "none"

    def validate(self) -> None:
        check_choices(self, "exits")
        layers = list(self.layers)
        if not layers:
            raise EetuneError("exits.layers is empty: give at least one layer, e.g. exits.layers=[8,16,24]")
        if len(set(layers)) != len(layers):
            raise EetuneError(f"exits.layers={layers} has duplicates: each layer holds at most one exit")


@dataclass
class DataSourceConfig:
    """One entry of `data.mix`: a source and its share of the training windows."""

    source: str = "jsonl"
    path: Optional[str] = None
    weight: float = 1.0

    def validate(self, k: int, stage: str) -> None:
        if self.source not in CHOICES["data.source"]:
            raise EetuneError(f"data.mix[{k}].source={self.source!r} is not one of: {', '.join(CHOICES['data.source'])}")
        if not self.weight > 0:
            raise EetuneError(f"data.mix[{k}].weight={self.weight} must be positive")
        if self.source != "pydoc" and not self.path and stage != "plan":
            raise EetuneError(f"data.mix[{k}] (source {self.source}) needs a path")


@dataclass
class DataConfig:
    """Text the stages read: tuning data and the held-out split used to score exits."""

    # pydoc: the Python stdlib's `pydoc_data` topics (real English, no download);
    # text: a plain text file; jsonl: one JSON object per line (text or chat messages);
    # hf: a local file read by Hugging Face `datasets` (`hf_format` says which builder).
    source: str = "pydoc"
    path: Optional[str] = None
    text_field: str = "text"
    # jsonl/hf records holding chat turns: a list of {role, content} under this field.
    messages_field: str = "messages"
    hf_format: str = "json"
    # Chat data: also learn the user/system turns (false: only assistant tokens get loss).
    train_on_prompt: bool = True
    seq_len: int = 256
    batch_size: int = 4
    shuffle: bool = True
    # Held-out text, never trained on: `heldout_fraction` of the corpus, taken from the tail of
    # the token stream (tail) or as whole documents picked by a hash of their prompt (prompt:
    # all samples of a prompt land on one side, so held-out scores are on unseen prompts).
    heldout_fraction: float = 0.05
    heldout_by: str = "tail"
    # Several sources instead of source/path, each giving its weight's share of the training
    # windows, e.g. [{source: jsonl, path: chat.jsonl, weight: 0.8}, {source: pydoc, weight: 0.2}].
    mix: List[DataSourceConfig] = field(default_factory=list)
    # How many held-out sequences of `seq_len` tokens score each exit.
    heldout_sequences: int = 4
    # Store the frozen backbone's hidden states at the exits during the first epoch,
    # so later epochs skip the backbone entirely.
    cache_hidden: bool = False

    def validate(self, stage: str = "") -> None:
        """`stage`: `plan` reads no data, so it needs no data.path."""
        check_choices(self, "data")
        check_positive(self, "data", "seq_len", "heldout_sequences")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise EetuneError(f"data.heldout_fraction={self.heldout_fraction} must be in (0, 1)")
        if self.mix:
            for k, entry in enumerate(self.mix):
                entry.validate(k, stage)
        elif self.source in ("text", "jsonl", "hf") and not self.path and stage != "plan":
            raise EetuneError(f"data.source={self.source} needs data.path=<file>")

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        if self.batch_size < 1:
            raise EetuneError(f"data.batch_size={self.batch_size} must be >= 1")


@dataclass
class GenerateConfig:
    """Decoding settings for `eetune generate`."""

    prompt: Optional[str] = None
    # Wrap the prompt in the tokenizer's chat template as one user message.
    chat: bool = True
    system: Optional[str] = None
    max_new_tokens: int = 128
    # 0 means greedy.
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    # full | early_exit | self_speculative (the last two need exits: generate.run_dir)
    mode: str = "full"
    # An augment or tune run dir whose exits to load.
    run_dir: Optional[str] = None
    # early_exit: leave at the first exit whose confidence >= threshold (1.0 = full model).
    # None: the threshold `eetune eval` calibrated into the run dir, else 0.8.
    threshold: Optional[float] = None
    # max_prob (the paper) or learned (the exits' confidence estimators).
    confidence: str = "max_prob"
    # self_speculative: the exit that drafts (default: the deepest) and tokens per draft.
    draft_exit: Optional[int] = None
    draft_len: int = 4
    # self_speculative: draft over only the N most frequent tokens of the tuning data (FR-Spec;
    # output stays exact). null drafts over the whole vocabulary.
    draft_vocab: Optional[int] = None
    # self_speculative: end a draft early where the drafting exit's learned estimator puts its
    # agreement below this (adaptive draft length; needs exits.confidence). null: always draft_len.
    draft_confidence: Optional[float] = None
    # Colour each streamed token by the exit it left at.
    color: bool = False

    def validate(self) -> None:
        check_choices(self, "generate")
        check_positive(self, "generate", "max_new_tokens")
        if self.temperature < 0:
            raise EetuneError(f"generate.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise EetuneError(f"generate.top_p={self.top_p} must be in (0, 1]")
        if self.threshold is not None:
            check_threshold(self.threshold, "generate.threshold", self.confidence)
        if self.draft_len < 1:
            raise EetuneError(f"generate.draft_len={self.draft_len} must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise EetuneError(f"generate.top_k={self.top_k} must be >= 1")


@dataclass
class ServeConfig:
    """`eetune serve`: an OpenAI-compatible HTTP server (presets in configs/serve/)."""

    # An augment or tune run dir whose exits decode; None serves the full model only.
    run_dir: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    # The model's id in /v1/models and in responses; None: model.name.
    model_name: Optional[str] = None
    # Early-exit settings of a request that names none; each field of a request's
    # `early_exit` object overrides its default here (same meaning as in `generate`).
    mode: str = "full"
    # null: the threshold `eetune eval` calibrated into the run dir for the request's
    # confidence policy, else 0.8.
    threshold: Optional[float] = None
    confidence: str = "max_prob"
    draft_exit: Optional[int] = None
    draft_len: int = 4
    draft_vocab: Optional[int] = None
    draft_confidence: Optional[float] = None
    # Limits per request: prompt length, and the largest `max_tokens` a request may ask.
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    # `max_tokens` of a request that gives none (less where the prompt leaves less room).
    default_max_tokens: int = 256
    # Requests admitted at once (decoding or waiting); more get HTTP 503.
    queue_size: int = 32
    # Full-model requests decoding together (continuous batching: they join and leave the running
    # batch at each step); early exit with exits and self_speculative decode one at a time. 1: every
    # request alone, in arrival order.
    max_batch_size: int = 8
    log_level: str = "info"

    def validate(self) -> None:
        check_choices(self, "serve")

    def validate_run(self) -> None:
        """`serve`'s checks before loading anything (so a bad config fails in a second); not at
        composition, so `--print-config` shows a preset that still needs serve.run_dir."""
        if not 0 <= self.port <= 65535:
            raise EetuneError(f"serve.port={self.port} must be in 0..65535 (0 picks a free port)")
        for key in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "queue_size", "max_batch_size"):
            if getattr(self, key) < 1:
                raise EetuneError(f"serve.{key}={getattr(self, key)} must be >= 1")
        if self.default_max_tokens > self.max_tokens:
            raise EetuneError(
                f"serve.default_max_tokens={self.default_max_tokens} exceeds serve.max_tokens={self.max_tokens}"
            )
        if not 1 <= self.draft_len <= MAX_DRAFT_LEN:
            raise EetuneError(f"serve.draft_len={self.draft_len} must be in 1..{MAX_DRAFT_LEN}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise EetuneError(f"serve.draft_vocab={self.draft_vocab} must be >= 1 (or null for the whole vocabulary)")
        if self.draft_confidence is not None and not 0.0 < self.draft_confidence <= 1.0:
            raise EetuneError(f"serve.draft_confidence={self.draft_confidence} must be in (0, 1] (or null)")
        if self.threshold is not None:
            check_threshold(self.threshold, "serve.threshold", self.confidence)
        if self.mode != "full" and not self.run_dir:
            raise EetuneError(f"serve.mode={self.mode} needs exits: set serve.run_dir=<augment or tune run dir>")


@dataclass
class EvalTaskConfig:
    """One task of `eetune eval`: a JSONL file scored by `metric`."""

    name: str = "task"
    # A JSONL file; None means the bundled task of this name (eetune/data/tasks/<name>.jsonl).
    path: Optional[str] = None
    # rouge_l or f1: generation ({prompt, reference}); exact_match: multiple choice by
    # log-likelihood ({question, choices, answer}).
    metric: str = "rouge_l"


@dataclass
class EvalConfig:
    """`eetune eval run_dir=<tune run>`: per-exit metrics, a threshold sweep, tasks, a report."""

    # early_exit thresholds swept through the engine (1.0 is the full model).
    thresholds: List[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.6, 0.4, 0.2])
    # Confidence policies swept; `learned` only where every exit has an estimator.
    confidences: List[str] = field(default_factory=lambda: list(CONFIDENCES))
    # Also measure lossless self-speculative decoding (draft exit: the deepest, or draft_exit).
    self_speculative: bool = True
    draft_exit: Optional[int] = None
    draft_len: int = 4
    tasks: List[EvalTaskConfig] = field(
        default_factory=lambda: [
            EvalTaskConfig(name="summarize", metric="rouge_l"),
            EvalTaskConfig(name="qa", metric="f1"),
            EvalTaskConfig(name="mc", metric="exact_match"),
        ]
    )
    # Items used per task (None: all of them).
    max_items: Optional[int] = 6
    # Greedy tokens generated per prompt in the sweep.
    max_new_tokens: int = 32
    # Wrap generation prompts in the chat template.
    chat: bool = True
    # Bins of the reliability diagram / expected calibration error.
    ece_bins: int = 10
    # Timed repetitions of one layer step and one head evaluation (the cost model).
    timing_repeats: int = 30
    # Calibration: the fastest threshold whose greedy-token agreement with the full model
    # on the sweep's prompts is >= this, written to <run_dir>/calibration.json.
    target_agreement: float = 0.98
    calibrate: bool = True
    # Where report.{json,md} and the plots go; None: <run_dir>/eval-<time>. Never overwritten.
    out_dir: Optional[str] = None

    def validate(self) -> None:
        pass

    def validate_run(self) -> None:
        """Every value `eval` reads, checked by the stage before anything slow runs."""
        if not self.thresholds:
            raise EetuneError("eval.thresholds is empty: give thresholds in (0, 1], e.g. eval.thresholds=[1.0,0.8,0.4]")
        for t in self.thresholds:
            if not 0.0 < t <= 1.0:
                raise EetuneError(f"eval.thresholds has {t}: every threshold must be in (0, 1] (1.0 = the full model)")
        for c in self.confidences:
            if c not in CONFIDENCES:
                raise EetuneError(f"eval.confidences has {c!r}: choose from {', '.join(CONFIDENCES)}")
        if not 0.0 < self.target_agreement <= 1.0:
            raise EetuneError(f"eval.target_agreement={self.target_agreement} must be in (0, 1]")
        for key in ("max_new_tokens", "ece_bins", "timing_repeats", "draft_len"):
            if getattr(self, key) < 1:
                raise EetuneError(f"eval.{key}={getattr(self, key)} must be >= 1")
        if self.max_items is not None and self.max_items < 1:
            raise EetuneError(f"eval.max_items={self.max_items} must be >= 1 (or null for every item)")
        if not self.tasks:
            raise EetuneError("eval.tasks is empty: give at least one task (the bundled ones: summarize, qa, mc)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise EetuneError(f"eval.tasks names {names} repeat: give each task its own name")


@dataclass
class OptimConfig:
    """AdamW over exit parameters only, with warmup then decay."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    # After warmup: cosine, linear or constant.
    decay: str = "cosine"
    # The schedule ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    # Clip the global gradient norm of exit parameters (0 disables).
    grad_clip: float = 1.0
    grad_accum: int = 1

    def validate(self) -> None:
        check_choices(self, "optim")

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        if self.grad_accum < 1:
            raise EetuneError(f"optim.grad_accum={self.grad_accum} must be >= 1")


@dataclass
class LossConfig:
    """Sum over exits of w_i * loss_i.

    The backbone is frozen and exits share no trainable parameter, so a constant w_i only
    scales exit i's gradients, which AdamW normalises away per parameter: exit_weights change
    tuning only through gradient clipping and AdamW's eps. A linear/cosine warm-up changes
    w_i during the run, which AdamW does not cancel (scripts/bench/converge.py --weights and
    the README's Losses). They are kept because the paper has them.
    """

    # w_i per exit, in exits.layers order; empty means 1.0 for every exit.
    exit_weights: List[float] = field(default_factory=list)
    # constant: w_i fixed; linear/cosine: w_i warmed up from 0 over `warmup_steps`;
    # dynamic: each token's loss weighted by the exit's own (detached) max probability.
    weighting: str = "constant"
    warmup_steps: int = 0
    # CE against the data's next token (`labels`) or the final layer's argmax (`teacher`).
    ce_target: str = "labels"
    # Per-token loss = (1 - kd_alpha) * CE + kd_alpha * KL(final || exit).
    kd_alpha: float = 0.0
    kd_temperature: float = 1.0
    # Weight of the confidence estimators' BCE loss (when exits.confidence != none).
    confidence_weight: float = 1.0
    # Tokens per chunk of the fused head + loss: the [tokens, vocab] logits never exist whole.
    chunk_size: int = 1024

    def validate(self) -> None:
        check_choices(self, "loss")

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise EetuneError(f"loss.kd_alpha={self.kd_alpha} must be in [0, 1]")
        if self.kd_temperature <= 0:
            raise EetuneError(f"loss.kd_temperature={self.kd_temperature} must be > 0")
        if self.chunk_size < 1:
            raise EetuneError(f"loss.chunk_size={self.chunk_size} must be >= 1")


@dataclass
class TrainConfig:
    # Optimizer steps. A resume may raise it (or change the cadence keys below, flat_patience and
    # the logger): the lr schedule is then the one a run configured with the new total has,
    # evaluated from the current step on (warmup + decay recomputed for the new total).
    steps: int = 100
    log_every: int = 1
    # Score exits on held-out text every N steps (0: only at the end).
    eval_every: int = 0
    # Save resumable state every N steps (0: only at the end).
    checkpoint_every: int = 50
    # Start from the exits of an `augment` run dir instead of building them from `exits`.
    init_from: Optional[str] = None
    # Stop before `steps` once held-out exit losses flatten: after `flat_patience` held-out
    # evaluations (every `eval_every` steps) in which no exit's CE fell by more than
    # `flat_min_delta` (relative) below its best so far. 0 disables.
    flat_patience: int = 0
    flat_min_delta: float = 0.005

    def validate(self) -> None:
        pass

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        if self.steps < 1:
            raise EetuneError(f"train.steps={self.steps} must be >= 1")
        if self.flat_patience < 0 or self.flat_min_delta < 0:
            raise EetuneError("train.flat_patience and train.flat_min_delta must be >= 0")
        if self.flat_patience > 0 and self.eval_every < 1:
            raise EetuneError(
                "train.flat_patience needs held-out evaluations to watch: set train.eval_every to a step count"
            )


@dataclass
class LoggerConfig:
    # none: metrics.jsonl + plots only (no account needed); wandb: also Weights & Biases.
    kind: str = "none"
    project: str = "eetune"
    entity: Optional[str] = None
    name: Optional[str] = None
    # W&B mode: online, offline or disabled (WANDB_MODE in the environment also works).
    mode: Optional[str] = None

    def validate(self) -> None:
        check_choices(self, "logger")


@dataclass
class DistillConfig:
    """`eetune data distill`: a self-distillation corpus generated by the base model itself."""

    # Prompt file: one prompt per line (.txt) or JSONL with a `prompt` field; "bundled" is
    # eetune's own list; null: none (then topics must be set).
    prompts: Optional[str] = "bundled"
    # Topic file (one per line; "bundled": eetune's list). Each topic makes a prompt per template
    # and `questions_per_topic` questions the model writes about it itself.
    topics: Optional[str] = None
    # Template file, one per line with a {topic} placeholder ("bundled": eetune's list).
    templates: Optional[str] = "bundled"
    questions_per_topic: int = 0
    # Keyword file (one per line, `word*` matches any ending): prompts mentioning one are dropped,
    # e.g. to keep evaluation topics out of the tuning data.
    exclude: Optional[str] = None
    out: Optional[str] = None
    samples_per_prompt: int = 1
    # Stop once the corpus holds this many generated tokens (null: every prompt x sample).
    max_tokens: Optional[int] = None
    # Prompts decoded together: batch decoding shares each weight read across rows.
    batch_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: Optional[float] = 0.95
    chat: bool = True

    def validate(self) -> None:
        pass

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        for key in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise EetuneError(f"distill.{key}={getattr(self, key)} must be >= 1")
        if self.questions_per_topic < 0:
            raise EetuneError(f"distill.questions_per_topic={self.questions_per_topic} must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise EetuneError(f"distill.max_tokens={self.max_tokens} must be >= 1 (or null: every prompt x sample)")
        if self.temperature < 0:
            raise EetuneError(f"distill.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise EetuneError(f"distill.top_p={self.top_p} must be in (0, 1]")
        if not (self.prompts or self.topics):
            raise EetuneError("distill needs prompts: set distill.prompts=<file> and/or distill.topics=<file>")


@dataclass
class ExportConfig:
    """`eetune export draft|hf|gguf` (shorthand on the command line: run_dir= exit= out= dtype=)."""

    # draft: layers 1..exit + that exit as a Hugging Face causal LM; hf: the base model + all
    # exits in one Hugging Face dir; gguf: the draft as a GGUF file (set by the subcommand).
    format: str = "draft"
    # The augment or tune run dir (or `eetune export hf` dir) whose exits to export.
    run_dir: Optional[str] = None
    # draft/gguf: the exit layer whose sub-network becomes the draft model.
    exit: Optional[int] = None
    # A new dir (draft, hf) or a new .gguf file (gguf); never overwritten.
    out: Optional[str] = None
    # draft/gguf weights: float32 (exact), bfloat16 or float16 (gguf: float32 or float16).
    dtype: str = "float32"

    def validate(self) -> None:
        check_choices(self, "export")


@dataclass
class ParallelConfig:
    """The device mesh `tune` runs on (the README's "Scaling out"); world size = the product of the four.

    Mesh dims, outermost first: pp (pipeline stages), dp_replicate (HSDP replicas), dp_shard
    (FSDP2 shards), tp (tensor parallel, innermost: keep it within a node).
    """

    dp_replicate: int = 1
    # -1: whatever the world size leaves after the other dims.
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    # Rows per pipeline micro-batch (pp > 1): each step's micro-batch goes through the stages
    # in chunks of this many sequences, so stages work on different chunks at once.
    pp_microbatch_size: int = 1
    # Build and run only layers 1..deepest exit (EE-LLM's "partial pipeline"; the whole backbone
    # when a loss needs the final layer). false builds every layer, so held-out agreement with
    # the final layer is reported as in a single process.
    partial: bool = True
    # > 1: `eetune tune` re-launches itself under torchrun with this many processes (one node).
    # Under torchrun or Slurm (scripts/slurm/) the launcher has already started the processes.
    nproc_per_node: int = 1
    # auto: nccl on CUDA, gloo on CPU.
    backend: str = "auto"

    def validate(self) -> None:
        check_choices(self, "parallel")


@dataclass
class PlanConfig:
    """`eetune plan`: the cluster a mesh is sized for (per-rank memory and throughput estimate)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    # Dense bf16 peak per GPU (A100: 312, H100 SXM: 989) and the fraction of it a step reaches.
    gpu_tflops: float = 312.0
    mfu: float = 0.4

    def validate(self) -> None:
        pass


@dataclass
class EetuneConfig:
    """Everything a stage reads. The CLI sets `stage`; recipes set the rest."""

    stage: str = "augment"
    # Where the stage writes its results; created fresh, never overwritten.
    run_dir: str = "runs/${stage}-${now:%Y%m%d-%H%M%S}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Continue an interrupted `tune` in the same run_dir, or extend a finished one with a larger
    # train.steps (a finished run resumed without one changes nothing). Its config must match but
    # for train.steps, flat_patience, eval_every, log_every, checkpoint_every and the logger.
    # `data distill`: continue the corpus in distill.out (only distill.max_tokens may change).
    resume: bool = False

    def validate(self) -> None:
        """Every section's value checks the schema's types cannot express, made at composition.
        A stage checks the sections only it reads with their `validate_run()` before it starts."""
        self.model.validate()
        self.exits.validate()
        self.generate.validate()
        self.serve.validate()
        self.data.validate(self.stage)
        self.optim.validate()
        self.loss.validate()
        self.train.validate()
        self.logger.validate()
        self.distill.validate()
        self.eval.validate()
        self.export.validate()
        self.parallel.validate()
        self.plan.validate()

    def validate_tune(self) -> None:
        """`tune`'s checks before anything is written."""
        self.loss.validate_run()
        self.train.validate_run()
        self.optim.validate_run()
        self.data.validate_run()


# Closed sets of values for string fields, checked after composition.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "exits.arch": ARCHS,
    "exits.init": INITS,
    "exits.head": HEADS,
    "exits.norm_init": NORM_INITS,
    "exits.confidence": ESTIMATORS,
    # Decoding choices: the exit policy's own lists (eetune.infer.policy).
    "generate.mode": MODES,
    "generate.confidence": CONFIDENCES,
    "serve.mode": MODES,
    "serve.confidence": CONFIDENCES,
    "serve.log_level": ("critical", "error", "warning", "info", "debug"),
    "data.source": ("pydoc", "text", "jsonl", "hf"),
    "data.heldout_by": ("tail", "prompt"),
    "data.hf_format": ("json", "csv", "parquet", "text"),
    "optim.decay": ("cosine", "linear", "constant"),
    "loss.weighting": ("constant", "linear", "cosine", "dynamic"),
    "loss.ce_target": ("labels", "teacher"),
    "logger.kind": ("none", "wandb"),
    "export.format": ("draft", "hf", "gguf"),
    "export.dtype": ("float32", "bfloat16", "float16"),
    "parallel.backend": ("auto", "gloo", "nccl"),
}



def check_choices(section: Any, name: str) -> None:
    """The `CHOICES` of section `name` (e.g. "model": model.dtype)."""
    for key, allowed in CHOICES.items():
        head, _, field_name = key.partition(".")
        if head == name and getattr(section, field_name) not in allowed:
            raise EetuneError(f"{key}={getattr(section, field_name)!r} is not one of: {', '.join(allowed)}")


def check_positive(section: Any, name: str, *fields: str) -> None:
    for field_name in fields:
        value = getattr(section, field_name)
        if value <= 0:
            raise EetuneError(f"{name}.{field_name}={value} must be positive")


def to_typed(node: Any) -> EetuneConfig:
    """An `EetuneConfig` from a config tree (a DictConfig, a dict, or a YAML file loaded with
    OmegaConf.load): merged onto the schema, so keys it lacks take their defaults."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EetuneConfig), node))


def to_yaml(cfg: Any) -> str:
    """The YAML a run dir's config.yaml and `--print-config` hold."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def to_container(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts and lists (a dataclass instance or a DictConfig)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


SCHEMA_NAME = "eetune_schema"


def register_schema() -> None:
    """Store the schema so recipes can list it first in their defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=EetuneConfig)
