"""`stencil bench dreambench`: parse the options, launch the processes, present the table.

The runner (training, drafts, images, scores, merging, reports) is `stencil_cli/verbs/bench.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress

from stencil_cli.base import events
from stencil_cli.base.errors import BadInputError, StencilError
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.options import (
    ContextModelOption,
    DeviceOption,
    EvalModelsOption,
    NoT5Option,
    PrecisionOption,
    SubjectModelOption,
)
from stencil_cli.cli.output import escape, info, print_json, settings, warn
from stencil_cli.cli.progress import add_task, progress_bar
from stencil_cli.store.db import open_store
from stencil_cli.verbs.bench import (
    PLOT_FILE,
    RESULTS_JSON,
    RESULTS_MD,
    BenchConfig,
    SubjectStatus,
    check_out_folder,
    current_shard,
    launch_on_cpu,
    markdown_table,
    run_benchmark,
    settle_config,
)
from stencil_cli.verbs.generation_plan import MAX_SEED

bench_app = typer.Typer(help="Benchmarks: the DreamBench protocol end to end.", no_args_is_help=True)


# -- launching processes --------------------------------------------------------------------------------


def free_port() -> int:
    """An unused local TCP port for the processes' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(num_processes: int, child_args: list[str], *, cpu: bool) -> list[str]:
    """The `accelerate launch` command line that runs `stencil CHILD_ARGS` in `num_processes` processes."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # several local processes via torchrun; on a CPU the runner asks for gloo itself
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    if not cpu:
        command += ["--gpu_ids", "all"]
    return command + ["-m", "stencil_cli", *child_args]


def _eval_models_arg(config: BenchConfig) -> list[str]:
    return ["--eval-models", f"dino={config.eval_dino},clip={config.eval_clip}"]


# How each BenchConfig field reaches a launched process: its flag (the value rendered by its type), a
# function of the config, or None where it is not passed. Every field must be listed (a test repeats every
# setting through the launched command line), so a new setting cannot be left behind.
CHILD_ARGS: dict[str, str | Callable[[BenchConfig], list[str]] | None] = {
    "dataset": lambda config: [str(config.dataset)],
    "out": "--out",
    "subjects": "--subjects",
    "prompts": "--prompts",
    "images_per_prompt": "--images-per-prompt",
    "train_steps": "--train-steps",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "steps": "--steps",
    "inner_steps": "--inner-steps",
    "inversion": "--inversion",
    "draft_steps": "--draft-steps",
    "tau": "--tau",
    "seed": "--seed",
    "captioner": "--captioner",
    "caption_model": "--caption-model",
    "subject_model": "--subject-model",
    "context_model": "--context-model",
    "device": "--device",
    "precision": "--precision",
    "no_t5": "--no-t5",
    "eval_dino": _eval_models_arg,
    "eval_clip": None,  # passed with eval_dino
    "models_root": None,  # each process settles it again from the same store (STENCIL_HOME)
}


def _flag_args(flag: str, value: Any) -> list[str]:
    """One setting as flags: a switch when true, comma-joined lists, floats exactly, nothing for None."""
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, list):
        return [flag, ",".join(value)]
    return [flag, repr(value) if isinstance(value, float) else str(value)]


def child_args(config: BenchConfig) -> list[str]:
    """The `stencil ...` arguments that repeat this run in each launched process."""
    args = ["-q"] if settings.quiet else []
    args += ["bench", "dreambench"]
    for item in dataclasses.fields(config):
        how = CHILD_ARGS[item.name]  # a KeyError here: add the new setting to CHILD_ARGS
        if callable(how):
            args += how(config)
        elif how is not None:
            args += _flag_args(how, getattr(config, item.name))
    return args


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    return names or None


# -- the command ---------------------------------------------------------------------------------------


FLAGS = {"model": "--caption-model"}  # the captioner's `{model}` is bench's --caption-model


@bench_app.command("dreambench", no_args_is_help=True)
@handle_errors(flags=FLAGS)
def dreambench(
    dataset_dir: Annotated[
        Path, typer.Argument(help="The DreamBench folder (subject folders + prompts_and_classes.txt).")
    ],
    subjects: Annotated[
        str | None,
        typer.Option("--subjects", help="Comma-separated subjects. [default: every subject present]"),
    ] = None,
    prompts: Annotated[
        int | None,
        typer.Option("--prompts", help="Only the first N prompts per subject. [default: 25]", min=1),
    ] = None,
    images_per_prompt: Annotated[
        int, typer.Option("--images-per-prompt", help="Seeds per prompt.", min=1)
    ] = 4,
    out: Annotated[Path, typer.Option("--out", help="Results folder (resumable).")] = Path(
        "dreambench-results"
    ),
    train_steps: Annotated[
        int, typer.Option("--train-steps", help="Training steps per subject.", min=1)
    ] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.", min=1)] = 6,
    lr: Annotated[float, typer.Option("--lr", help="Training learning rate.")] = 2e-5,
    steps: Annotated[
        int, typer.Option("--steps", help="DDIM steps (inversion and denoising).", min=1, max=1000)
    ] = 50,
    inner_steps: Annotated[
        int, typer.Option("--inner-steps", help="Null-text iterations per step.", min=1)
    ] = 10,
    inversion: Annotated[
        str, typer.Option("--inversion", help="nti (null-text, the paper) or npi (negative-prompt, faster).")
    ] = "nti",
    draft_steps: Annotated[
        int | None,
        typer.Option(
            "--draft-steps",
            help="Draft-model steps per draft. [default: the draft model's preset, else 50]",
            min=1,
            show_default=False,
        ),
    ] = None,
    tau: Annotated[float, typer.Option("--tau", help="Guidance strength in [0, 1000].")] = 60.0,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help="Seed of image 0 of each prompt (image k: seed + k).",
            min=0,
            max=MAX_SEED,
        ),
    ] = 0,
    captioner: Annotated[
        str,
        typer.Option(
            "--captioner",
            help="openai (the vision model, as `stencil caption`: the paper's protocol; needs "
            "OPENAI_API_KEY) or template (offline; not comparable with the paper).",
        ),
    ] = "openai",
    caption_model: Annotated[
        str | None,
        typer.Option(
            "--caption-model",
            envvar="STENCIL_CAPTION_MODEL",
            help="Vision model for --captioner openai (default: gpt-4o).",
            show_default=False,
        ),
    ] = None,
    num_processes: Annotated[
        int,
        typer.Option(
            "--num-processes", help="Launch this many processes with accelerate (one per GPU).", min=1
        ),
    ] = 1,
    eval_models: EvalModelsOption = None,
    subject_model: SubjectModelOption = None,
    context_model: ContextModelOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    no_t5: NoT5Option = False,
    json_output: JsonOption = False,
) -> None:
    """Run the DreamBench protocol: per subject add, caption, train, generate every prompt, score; a table."""
    config = BenchConfig(
        dataset=dataset_dir.resolve(),
        out=out.expanduser().resolve(),
        subjects=[],
        prompts=prompts,
        images_per_prompt=images_per_prompt,
        train_steps=train_steps,
        batch_size=batch_size,
        lr=lr,
        steps=steps,
        inner_steps=inner_steps,
        inversion=inversion.strip().lower(),
        draft_steps=draft_steps,
        tau=tau,
        seed=seed,
        captioner=captioner,
        caption_model=caption_model,
        no_t5=no_t5,
    )
    user_store = open_store()
    notes = settle_config(
        user_store,
        config,
        subjects=_split(subjects),
        eval_models=eval_models,
        models=(subject_model, context_model, device, precision),
    )
    user_store.close()
    for note in notes:
        info(escape(note))
    if num_processes > 1:
        results = _launch(config, num_processes)
    else:
        results = _run_here(config)
        if results is None:  # not the main process: the main one reports
            return
    _present(config, results, json_output)


def _launch(config: BenchConfig, num_processes: int) -> dict[str, Any]:
    """Run the benchmark in `num_processes` processes with accelerate; the merged results."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise BadInputError("--num-processes inside `accelerate launch`: use one or the other")
    cpu = launch_on_cpu(config)
    check_out_folder(config)
    command = launch_command(num_processes, child_args(config), cpu=cpu)
    info(f"launching {num_processes} processes with accelerate ({'CPU, gloo' if cpu else 'one GPU each'})")
    completed = subprocess.run(command, stdout=subprocess.DEVNULL, check=False)
    if completed.returncode != 0:
        raise StencilError(f"the benchmark processes failed (exit code {completed.returncode}); see above")
    return json.loads((config.out / RESULTS_JSON).read_text(encoding="utf-8"))


@dataclass
class SubjectBars:
    """The runner's progress events on rich: one bar per subject (images made, what it is doing now), its
    notes and warnings as lines."""

    progress: Progress
    tasks: dict[str, int] = field(default_factory=dict)

    def status(self, subject: str, doing: str, done: int, total: int) -> None:
        """A subject's bar: images made of planned, and the current step."""
        if subject not in self.tasks:
            self.tasks[subject] = add_task(self.progress, escape(subject), total=total)
        label = "[green]done[/green]" if doing == "done" else doing
        self.progress.update(self.tasks[subject], completed=done, status=label)

    def __call__(self, event: events.Event) -> None:
        """The hook."""
        match event:
            case SubjectStatus(subject=subject, doing=doing, done=done, total=total):
                self.status(subject, doing, done, total)
            case events.Note(text=text):
                info(escape(text))
            case events.Warning(text=text):
                warn(text)


def _run_here(config: BenchConfig) -> dict[str, Any] | None:
    """This process's share (all of it without accelerate); the results on the main process."""
    shard = current_shard(config.device)
    with progress_bar() as progress:
        return run_benchmark(config, shard, SubjectBars(progress))


def _present(config: BenchConfig, results: dict[str, Any], json_output: bool) -> None:
    """The results as JSON, or the Markdown table (stdout) and where the files are (stderr)."""
    if json_output:
        print_json(results)
        return
    typer.echo(markdown_table(results), nl=False)
    info(
        f"results: {escape(str(config.out / RESULTS_MD))}, {escape(str(config.out / RESULTS_JSON))}, "
        f"{escape(str(config.out / PLOT_FILE))}"
    )


def register(app: typer.Typer) -> None:
    """Register `stencil bench dreambench`."""
    app.add_typer(bench_app, name="bench")
