"""The `eetune` command line: compose a config (recipe + groups + overrides), call a stage.

Commands never hold logic of their own: each one composes the config and calls the
stage's `run(cfg)`. A user error prints one line and exits 2.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.table import Table

from eetune.config import EetuneConfig, compose_config, config_groups, list_recipes, recipe_path, validate
from eetune.config.schema import CHOICES, to_yaml
from eetune.console import make_console
from eetune.errors import EetuneError
from eetune.infer.policy import parse_thresholds

app = typer.Typer(
    name="eetune",
    help="Turn a pretrained decoder LLM into an early-exit LLM (EE-Tuning), measure it, serve it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make tuning data.", no_args_is_help=True)
export_app = typer.Typer(
    help="Hand a run's exits to other tools: a draft model (HF dir or GGUF) or the base model + exits.",
    no_args_is_help=True,
)
recipes_app = typer.Typer(help="List, show and copy recipes to start your own.", no_args_is_help=True)
import_app = typer.Typer(help="Convert checkpoints from other formats into Hugging Face dirs.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(import_app, name="import")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")

console = make_console()

OVERRIDES = typer.Argument(
    None,
    metavar="[recipe=NAME|PATH] [KEY=VALUE]...",
    help="Recipe and Hydra overrides, e.g. recipe=smollm2_135m exits.layers=[8,16,24] exits.arch=mlp",
    show_default=False,
)
PRINT_CONFIG = typer.Option(False, "--print-config", help="Print the resolved config and exit.")


def _compose(stage: str, overrides: Optional[List[str]], print_config: bool) -> EetuneConfig | None:
    cfg = compose_config(stage, overrides or [])
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return None
    return cfg


@app.command()
def augment(overrides: Optional[List[str]] = OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Stage one: add exits to the frozen model and write them to a run dir."""
    cfg = _compose("augment", overrides, print_config)
    if cfg is not None:
        from eetune.stages import augment as stage

        stage.run(cfg, console=console)


@app.command()
def tune(overrides: Optional[List[str]] = OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Stage two: train only the exits (backbone frozen); resumable with resume=true."""
    cfg = _compose("tune", overrides, print_config)
    if cfg is not None:
        from eetune.stages import tune as stage

        stage.run(cfg, console=console)


@app.command("eval")
def evaluate(overrides: Optional[List[str]] = OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Measure tuned exits: per-exit metrics, a threshold sweep, tasks, calibration, a report with plots."""
    cfg = _compose("eval", overrides, print_config)
    if cfg is not None:
        from eetune.stages import eval as stage

        stage.run(cfg, console=console)


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def lm_eval_command(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own CLI with the `eetune` model type registered (all its flags work).

    e.g. eetune lm-eval --model eetune --model_args run_dir=runs/quick,mode=early_exit,threshold=0.8 --tasks my.yaml
    """
    from eetune.eval import harness

    harness.main(list(ctx.args))


@app.command()
def plan(overrides: Optional[List[str]] = OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Estimate per-GPU memory and tokens/s of `tune` on a mesh (plan.nodes x plan.gpus_per_node GPUs)."""
    cfg = _compose("plan", overrides, print_config)
    if cfg is not None:
        from eetune.stages import plan as stage

        stage.run(cfg, console=make_console(stderr=False))


@data_app.command("distill")
def data_distill(overrides: Optional[List[str]] = OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Generate a self-distillation corpus (JSONL) from the base model itself."""
    cfg = _compose("distill", overrides, print_config)
    if cfg is not None:
        from eetune.stages import distill as stage

        stage.run(cfg)


@app.command()
def generate(
    overrides: Optional[List[str]] = OVERRIDES,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (a user message with --chat)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap the prompt in the chat template."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", min=0.0, help="0 = greedy."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    mode: Optional[str] = typer.Option(None, "--mode", help=" | ".join(CHOICES["generate.mode"])),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="augment/tune run dir with the exits."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="early_exit confidence threshold, (0, 1]."),
    exit_thresholds: Optional[str] = typer.Option(
        None, "--exit-thresholds", help="early_exit: one threshold per exit, shallowest first, e.g. 0.9/0.8/1 "
        "(1: never leave there)."
    ),
    confidence: Optional[str] = typer.Option(None, "--confidence", help=" | ".join(CHOICES["generate.confidence"])),
    draft_exit: Optional[int] = typer.Option(None, "--draft-exit", help="self_speculative: the drafting exit."),
    draft_len: Optional[int] = typer.Option(None, "--draft-len", help="self_speculative: tokens per draft."),
    draft_schedule: Optional[str] = typer.Option(
        None, "--draft-schedule", help="self_speculative: " + " | ".join(CHOICES["generate.draft_schedule"])
        + " (adaptive: as many drafts as pay, up to --draft-len)."
    ),
    draft_vocab: Optional[int] = typer.Option(
        None, "--draft-vocab", help="self_speculative: draft over the N most frequent tokens (FR-Spec)."
    ),
    draft_confidence: Optional[float] = typer.Option(
        None, "--draft-confidence", help="self_speculative: end a draft where the exit's estimator falls below this."
    ),
    color: Optional[bool] = typer.Option(None, "--color/--no-color", help="Colour tokens by the exit they left at."),
    print_config: bool = PRINT_CONFIG,
) -> None:
    """Generate text (full model, early exit or lossless self-speculative), streaming to the terminal."""
    flags = {
        "generate.prompt": prompt,
        "generate.chat": chat,
        "generate.max_new_tokens": max_new_tokens,
        "generate.temperature": temperature,
        "generate.seed": seed,
        "generate.mode": mode,
        "generate.run_dir": run_dir,
        "generate.threshold": threshold,
        "generate.exit_thresholds": (
            None if exit_thresholds is None else list(parse_thresholds(exit_thresholds, "--exit-thresholds"))
        ),
        "generate.confidence": confidence,
        "generate.draft_exit": draft_exit,
        "generate.draft_len": draft_len,
        "generate.draft_schedule": draft_schedule,
        "generate.draft_vocab": draft_vocab,
        "generate.draft_confidence": draft_confidence,
        "generate.color": color,
    }
    cfg = compose_config("generate", overrides or [])
    # Flags are applied after composition so prompts need no Hydra quoting.
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    validate(cfg)
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return
    from eetune.stages import generate as stage

    stage.run(cfg, console=console)


@app.command()
def serve(overrides: Optional[List[str]] = OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Serve the model over OpenAI-compatible HTTP (/v1/chat/completions, /v1/completions), early exit per request."""
    cfg = _compose("serve", overrides, print_config)
    if cfg is not None:
        from eetune.stages import serve as stage

        stage.run(cfg, console=console)


# `eetune export draft run_dir=R exit=24 out=D`: these bare keys are short for export.<key>.
EXPORT_SHORTHANDS = ("run_dir", "exit", "out", "dtype")
EXPORT_OVERRIDES = typer.Argument(
    None,
    metavar="run_dir=RUN [exit=L] out=PATH [dtype=float32|bfloat16|float16] [KEY=VALUE]...",
    help="The run dir with the exits, the drafting exit, the output and Hydra overrides.",
    show_default=False,
)


def _export(fmt: str, overrides: Optional[List[str]], print_config: bool) -> None:
    args = [f"export.{arg}" if arg.split("=", 1)[0] in EXPORT_SHORTHANDS else arg for arg in overrides or []]
    cfg = _compose("export", [*args, f"export.format={fmt}"], print_config)
    if cfg is not None:
        from eetune.stages import export as stage

        stage.run(cfg, console=console)


@export_app.command("draft")
def export_draft(overrides: Optional[List[str]] = EXPORT_OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Layers 1..L + the exit at L as a standard Hugging Face causal LM dir (a draft model)."""
    _export("draft", overrides, print_config)


@export_app.command("hf")
def export_hf(overrides: Optional[List[str]] = EXPORT_OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """The base model plus all exits as one Hugging Face dir that eetune loads back alone."""
    _export("hf", overrides, print_config)


@export_app.command("gguf")
def export_gguf(overrides: Optional[List[str]] = EXPORT_OVERRIDES, print_config: bool = PRINT_CONFIG) -> None:
    """Layers 1..L + the exit at L as an unquantised GGUF file (a llama.cpp draft model)."""
    _export("gguf", overrides, print_config)


@recipes_app.command("list")
def recipes_list() -> None:
    """List built-in recipes and config groups."""
    table = Table(title="recipes (eetune <stage> recipe=NAME)")
    table.add_column("name")
    table.add_column("description")
    for name in list_recipes():
        table.add_row(name, _description(recipe_path(name)))
    make_console(stderr=False).print(table)
    groups = Table(title="config groups (override with GROUP=OPTION)")
    groups.add_column("group")
    groups.add_column("options")
    for group, options in config_groups().items():
        groups.add_row(group, ", ".join(options))
    make_console(stderr=False).print(groups)


@recipes_app.command("show")
def recipes_show(
    name: str = typer.Argument(..., help="Recipe name or path."),
    resolved: bool = typer.Option(False, "--resolved", help="Show the fully composed config instead."),
) -> None:
    """Print a recipe's YAML (or its fully composed config)."""
    if resolved:
        typer.echo(to_yaml(compose_config("augment", [f"recipe={name}"])), nl=False)
    else:
        typer.echo(recipe_path(name).read_text(), nl=False)


@recipes_app.command("copy")
def recipes_copy(
    name: str = typer.Argument(..., help="Built-in recipe to copy."),
    dest: Path = typer.Argument(..., help="Destination file (or dir) for your own recipe."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy a recipe so you can edit it; run it with recipe=<path>."""
    source = recipe_path(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.suffix not in (".yaml", ".yml"):
        raise EetuneError(f"destination {target} must end in .yaml")
    if target.exists() and not force:
        raise EetuneError(f"{target} already exists: pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    console.print(f"copied {name} to {target}; run it with: eetune augment recipe={target}")


@import_app.command("gguf")
def import_gguf(
    gguf_file: Path = typer.Argument(..., help="A .gguf model file."),
    out_dir: Path = typer.Argument(..., help="Where to write the Hugging Face dir (must not exist)."),
) -> None:
    """Convert a GGUF file into a Hugging Face dir (dequantised weights, config, tokenizer)."""
    from eetune.models import import_gguf as convert

    convert(gguf_file, out_dir)
    console.print(f"wrote {out_dir}; use it with model.checkpoint_dir={out_dir}")


def _description(path: Path) -> str:
    """A recipe's first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def main() -> None:
    try:
        app(standalone_mode=False)
    except EetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
