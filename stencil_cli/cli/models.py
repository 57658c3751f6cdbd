"""Model commands: `models ls|pull|check`, `config get|set|unset|ls`, and `doctor`."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Annotated, Any

import typer
from rich.table import Table

from stencil_cli import __version__
from stencil_cli import models as m
from stencil_cli.base.errors import EXIT_FAILURE, BadInputError, StencilError
from stencil_cli.base.paths import default_root
from stencil_cli.cli.kit import JsonOption, handle_errors
from stencil_cli.cli.options import DeviceOption, NoT5Option, PrecisionOption
from stencil_cli.cli.output import escape, human_bytes, info, print_json, settings, stdout_console
from stencil_cli.store.db import open_store
from stencil_cli.store.settings import DEFAULTS
from stencil_cli.store.settings import resolve_setting as setting

models_app = typer.Typer(help="Models: presets, what is downloaded, downloading.", no_args_is_help=True)
config_app = typer.Typer(
    help="Stored settings: subject_model, context_model, device, precision.", no_args_is_help=True
)

ENV_VARS: dict[str, str] = {
    "subject_model": "STENCIL_SUBJECT_MODEL",
    "context_model": "STENCIL_CONTEXT_MODEL",
    "device": "STENCIL_DEVICE",
    "precision": "STENCIL_PRECISION",
}


def _print_table(table: Table) -> None:
    stdout_console().print(table)  # piped: never cut to 80 columns (a Hub id must survive `| cat`)


# -- models ---------------------------------------------------------------------------------------------


def model_rows() -> list[dict[str, Any]]:
    """Presets (diffusion and eval models) and other diffusers models in the HF cache, presence and size."""
    cache = m.cached_repos()
    rows: list[dict[str, Any]] = []
    preset_repos = set()
    for preset in m.PRESETS.values():
        status = m.model_status(preset.name, m.SUBJECT if preset.role == "both" else preset.role, cache)
        preset_repos.add(preset.repo_id)
        draft = preset.draft
        rows.append(
            {
                "name": preset.name,
                "preset": True,
                "role": preset.role,
                "source": preset.repo_id or "built locally",
                "gated": preset.gated,
                "licence": preset.licence or None,
                "draft_steps": draft.steps if draft else None,
                "draft_guidance": draft.guidance if draft else None,
                "t5": draft.t5 if draft else None,
                "present": status["present"],
                "path": status["path"],
                "size_bytes": status["size_bytes"],
            }
        )
    for repo_id, entry in sorted(cache.items()):
        if repo_id in preset_repos:
            continue
        rows.append(
            {
                "name": repo_id,
                "preset": False,
                "role": None,
                "source": repo_id,
                "gated": False,
                "licence": None,
                "draft_steps": None,
                "draft_guidance": None,
                "t5": None,
                "present": True,
                "path": entry["path"],
                "size_bytes": entry["size_bytes"],
            }
        )
    return rows


def _draft_cell(row: dict[str, Any]) -> str:
    """A draft preset's default steps and guidance, and its T5 need (e.g. '4 steps, cfg 0, needs T5')."""
    if row["draft_steps"] is None:
        return "-"
    t5 = ", needs T5" if row["t5"] == "required" else ""
    return f"{row['draft_steps']} steps, cfg {row['draft_guidance']:g}{t5}"


@handle_errors
def models_ls(json_output: JsonOption = False) -> None:
    """List the presets and the models in the Hugging Face cache (works offline)."""
    rows = model_rows()
    if json_output:
        print_json(rows)
        return
    table = Table(box=None)
    table.add_column("name", no_wrap=True)  # names are what a user types: never shortened
    table.add_column("role", no_wrap=True)
    for column in ("source", "licence", "draft"):
        table.add_column(column, overflow="fold")
    table.add_column("present", no_wrap=True)
    table.add_column("size", no_wrap=True)
    for row in rows:
        source = row["source"] + (" (gated)" if row["gated"] else "")
        table.add_row(
            escape(row["name"]),
            row["role"] or "-",
            escape(source),
            escape((row["licence"] or "-").removesuffix(" License")),
            _draft_cell(row),
            "yes" if row["present"] else "no",
            human_bytes(row["size_bytes"]),
        )
    _print_table(table)
    info(f"[dim]Hugging Face cache: {escape(str(m.hub_cache_dir()))}[/dim]")
    if any(not row["present"] and row["preset"] and row["source"] != "built locally" for row in rows):
        info(
            "[dim]download a preset with `stencil models pull sd15` (or sd3-medium, flux-schnell, ...; "
            "`dino clip` for `stencil eval`)[/dim]"
        )


@handle_errors
def models_pull(
    refs: Annotated[
        list[str] | None,
        typer.Argument(
            help="sd15, sdxl, sd3-medium, sd35-medium, sd35-large-turbo, flux-schnell, tiny, tiny-sdxl, "
            "tiny-sd35, tiny-flux, dino, clip (the eval models), a Hub id (owner/name, or "
            "owner/name@revision for a transformers model) [default: the configured subject and context "
            "models]"
        ),
    ] = None,
    no_t5: Annotated[
        bool,
        typer.Option(
            "--no-t5",
            help="Leave out the T5 encoder of SD3 / SD3.5 models (9.5 GB less; then run them with --no-t5). "
            "FLUX needs its T5.",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Download models into the Hugging Face cache (safetensors only) so they work offline."""
    if not refs:
        store = open_store()
        refs = [setting(store, "subject_model", None), setting(store, "context_model", None)]
    results = []
    for ref in refs:
        info(f"pulling {escape(ref)} ...")
        pulled = m.pull(ref, progress=not settings.quiet and not json_output, no_t5=no_t5)
        results.append(
            {
                "ref": ref,
                "path": str(pulled.path),
                "size_bytes": m.folder_size(pulled.path),
                "repo_id": pulled.repo_id,
                "revision": pulled.revision,
                "layout": pulled.layout,
            }
        )
        if pulled.revision is not None:
            info(f"{escape(pulled.repo_id or ref)}: safetensors from revision {escape(pulled.revision)}")
        info(f"[green]ready:[/green] {escape(ref)} ({human_bytes(results[-1]['size_bytes'])})")
    if json_output:
        print_json(results)
    else:
        for row in results:
            typer.echo(row["path"])


RoleOption = Annotated[
    str,
    typer.Option("--role", help="auto | subject | context: which loader to use (auto: from the model)."),
]


@handle_errors
def models_check(
    ref: Annotated[str, typer.Argument(help="A preset, Hub id or local diffusers folder.")],
    role: RoleOption = "auto",
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    no_t5: NoT5Option = False,
    json_output: JsonOption = False,
) -> None:
    """Load a model the way stencil will, and report its components (checks it works offline)."""
    if role not in ("auto", "subject", "context"):
        raise BadInputError(f"unknown --role {role!r}: use auto, subject or context")
    store = open_store()
    device_name = setting(store, "device", device)
    precision_name = setting(store, "precision", precision)
    if role == "auto":
        preset = m.PRESETS.get(ref)
        if preset is not None and preset.role != "both":
            role = preset.role
        else:
            _source, index = m.inspect_ref(ref, m.SUBJECT)
            role = "subject" if (not index or "unet" in index) else "context"
    if role == "subject":
        pipe = m.load_subject_pipeline(ref, device=device_name, precision=precision_name)
    else:
        pipe = m.load_context_pipeline(ref, device=device_name, precision=precision_name, no_t5=no_t5)
    components = {}
    for name, component in pipe.components.items():
        if component is None:
            continue
        params = sum(p.numel() for p in component.parameters()) if hasattr(component, "parameters") else None
        components[name] = {"class": type(component).__name__, "parameters": params}
    result = {
        "ref": ref,
        "role": role,
        "pipeline": type(pipe).__name__,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "components": components,
    }
    m.free_pipeline(pipe)
    if json_output:
        print_json(result)
        return
    info(
        f"[green]ok:[/green] {escape(ref)} loads as {result['pipeline']} ({role} model) "
        f"on {result['device']} in {result['dtype']}"
    )
    table = Table("component", "class", "parameters", box=None)
    for name, comp in components.items():
        count = comp["parameters"]
        table.add_row(name, comp["class"], f"{count / 1e6:.1f} M" if count is not None else "-")
    _print_table(table)


# -- config ---------------------------------------------------------------------------------------------


def _check_key(key: str) -> str:
    if key not in DEFAULTS:
        raise BadInputError(f"unknown config key {key!r}: use one of {', '.join(DEFAULTS)}")
    return key


def validate_config_value(key: str, value: str) -> str:
    """Check a config value (model refs resolve, devices and precisions are known); return it cleaned."""
    value = value.strip()
    if key in ("subject_model", "context_model"):
        m.resolve_ref(value, m.SUBJECT if key == "subject_model" else m.CONTEXT)
    elif key == "device":
        if not m.DEVICE_PATTERN.match(value.lower()):
            raise BadInputError(f"unknown device {value!r}: use auto, cpu, cuda, cuda:N or mps")
        value = value.lower()
    elif key == "precision":
        if value.lower() not in m.PRECISIONS:
            raise BadInputError(f"unknown precision {value!r}: use {', '.join(m.PRECISIONS)}")
        value = value.lower()
    return value


def effective_settings(stored: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each setting's value and where it comes from (env > config > default); `stored`: the stored config
    when already read (else the store is opened)."""
    if stored is None:
        stored = open_store().all_config()
    rows = []
    for key, default in DEFAULTS.items():
        env = os.environ.get(ENV_VARS[key])
        if env:
            rows.append({"key": key, "value": env, "source": f"env {ENV_VARS[key]}"})
        elif stored.get(key):
            rows.append({"key": key, "value": stored[key], "source": "config"})
        else:
            rows.append({"key": key, "value": default, "source": "default"})
    return rows


@handle_errors
def config_get(
    key: Annotated[str, typer.Argument(help="subject_model | context_model | device | precision")],
    json_output: JsonOption = False,
) -> None:
    """Print a setting's effective value (env > config > default)."""
    _check_key(key)
    row = next(r for r in effective_settings() if r["key"] == key)
    if json_output:
        print_json(row)
        return
    typer.echo(row["value"])


@handle_errors
def config_set(
    key: Annotated[str, typer.Argument(help="subject_model | context_model | device | precision")],
    value: Annotated[str, typer.Argument(help="The value to store.")],
    json_output: JsonOption = False,
) -> None:
    """Store a setting in the store's config."""
    _check_key(key)
    value = validate_config_value(key, value)
    open_store().set_config(key, value)
    overridden = bool(os.environ.get(ENV_VARS[key]))
    if json_output:
        env = ENV_VARS[key] if overridden else None
        print_json({"key": key, "value": value, "stored": True, "overridden_by": env})
        return
    info(f"{key} = {escape(value)}")
    if overridden:
        info(f"[yellow]note:[/yellow] {ENV_VARS[key]} is set and takes precedence")


@handle_errors
def config_unset(
    key: Annotated[str, typer.Argument(help="The key to reset to its default.")],
    json_output: JsonOption = False,
) -> None:
    """Remove a stored setting (back to its default)."""
    _check_key(key)
    open_store().set_config(key, None)
    if json_output:
        print_json({"key": key, "value": DEFAULTS[key], "stored": False})
        return
    info(f"{key} reset to its default ({DEFAULTS[key]})")


@handle_errors
def config_ls(json_output: JsonOption = False) -> None:
    """List every setting with its effective value and where it comes from."""
    rows = effective_settings()
    if json_output:
        print_json(rows)
        return
    table = Table("key", "value", "source", box=None)
    for row in rows:
        table.add_row(row["key"], escape(row["value"]), row["source"])
    _print_table(table)


# -- doctor ---------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_report() -> dict[str, Any]:
    """What compute is available: CUDA devices with free memory, MPS, and what `auto` picks."""
    import torch

    report: dict[str, Any] = {
        "auto": str(m.resolve_device("auto")),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "mps_available": m.mps_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            report["gpus"].append(
                {
                    "index": index,
                    "name": torch.cuda.get_device_name(index),
                    "free_bytes": int(free),
                    "total_bytes": int(total),
                    "bf16": torch.cuda.is_bf16_supported(),
                }
            )
    auto = m.resolve_device("auto")
    report["auto_precision"] = str(m.resolve_dtype("auto", auto)).replace("torch.", "")
    report["auto_context_precision"] = str(m.context_dtype("auto", auto)).replace("torch.", "")
    report["cpu_native_bf16"] = m.cpu_computes_bf16()
    return report


def store_report() -> tuple[dict[str, Any], dict[str, str]]:
    """The store's health (a damaged or read-only database, folders without rows, missing photo files)
    and its stored config ({} when the database cannot be read)."""
    report: dict[str, Any] = {
        "path": str(default_root()),
        "ok": True,
        "error": None,
        "read_only": False,
        "integrity": [],
        "unindexed_folders": [],
        "missing_files": [],
    }
    try:
        store = open_store()
        report["path"] = str(store.root)
        report["read_only"] = store.read_only
        report["integrity"] = store.integrity_problems()
        config = store.all_config() if not report["integrity"] else {}
        report["unindexed_folders"] = store.unindexed_folders()
        report["missing_files"] = [
            {"subject": image["subject"], "id": image["id"], "file": image["file"]}
            for image in store.missing_files()
        ]
    except StencilError as error:
        report["error"] = str(error)
        config = {}
    report["ok"] = not (report["error"] or report["integrity"])
    return report, config


def doctor_report() -> dict[str, Any]:
    """Everything `stencil doctor` checks, as a JSON-ready dict (no secrets, no network)."""
    store, stored_config = store_report()
    settings_rows = {row["key"]: row for row in effective_settings(stored_config)}
    cache = m.cached_repos()
    model_checks = []
    for key, role in (("subject_model", m.SUBJECT), ("context_model", m.CONTEXT)):
        ref = settings_rows[key]["value"]
        try:
            status = m.model_status(ref, role, cache)
            status["error"] = None
        except BadInputError as error:
            status = {"ref": ref, "present": False, "error": str(error)}
        status["setting"] = key
        model_checks.append(status)
    return {
        "stencil": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "versions": {
            name: _version(name)
            for name in (
                "torch",
                "diffusers",
                "transformers",
                "huggingface_hub",
                "accelerate",
                "safetensors",
                "openai",
            )
        },
        "device": device_report(),
        "store": store["path"],
        "store_check": store,
        "hf_cache": str(m.hub_cache_dir()),
        "hf_offline": m.is_offline(),
        "hf_token_set": m.hf_token_present(),
        "openai_api_key_set": bool(os.environ.get("OPENAI_API_KEY")),
        "settings": {
            key: {"value": row["value"], "source": row["source"]} for key, row in settings_rows.items()
        },
        "models": model_checks,
        "presets_present": {row["name"]: row["present"] for row in model_rows() if row["preset"]},
    }


@handle_errors
def doctor(json_output: JsonOption = False) -> None:
    """Check the installation: versions, device and GPU memory, store and cache paths, models, keys.

    Also checks the store: a damaged database (exit 1), subject folders without rows, missing photo files.
    """
    report = doctor_report()
    if json_output:
        print_json(report)
        if not report["store_check"]["ok"]:
            raise typer.Exit(EXIT_FAILURE)
        return
    device = report["device"]
    plain: list[tuple[str, str]] = [
        ("stencil", report["stencil"]),
        ("python", f"{report['python']} ({report['executable']})"),
    ]
    plain += [(name, version or "not installed") for name, version in report["versions"].items()]
    plain.append(
        (
            "device (auto)",
            f"{device['auto']}, precision {device['auto_precision']}"
            f" (a real-size context model {device['auto_context_precision']})",
        )
    )
    for gpu in device["gpus"]:
        free = f"{human_bytes(gpu['free_bytes'])} free of {human_bytes(gpu['total_bytes'])}"
        plain.append((f"cuda:{gpu['index']}", f"{gpu['name']}, {free}"))
    if not device["cuda_available"]:
        plain.append(("cuda", "not available"))
    plain += [
        ("store", report["store"]),
        ("hf cache", report["hf_cache"]),
        ("hf offline", "yes (HF_HUB_OFFLINE)" if report["hf_offline"] else "no"),
        ("hf token", "set" if report["hf_token_set"] else "not set (needed for sd3-medium: `hf auth login`)"),
        (
            "openai key",
            "set"
            if report["openai_api_key_set"]
            else "not set (needed for --captioner openai; use --captioner template offline)",
        ),
    ]
    plain += [(key, f"{row['value']} ({row['source']})") for key, row in report["settings"].items()]
    lines = [(key, escape(value)) for key, value in plain]
    lines += _store_lines(report["store_check"])
    for check in report["models"]:
        if check.get("error"):
            state = f"[red]{escape(check['error'])}[/red]"
        elif check["present"]:
            state = "[green]present[/green]"
        else:
            state = f"[yellow]not downloaded[/yellow]: stencil models pull {escape(check['ref'])}"
        lines.append((check["setting"].replace("_", " "), f"{escape(check['ref'])}: {state}"))
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in lines:
        table.add_row(key, value)
    _print_table(table)
    if not report["store_check"]["ok"]:
        raise typer.Exit(EXIT_FAILURE)


def _store_lines(check: dict[str, Any]) -> list[tuple[str, str]]:
    """The store check as (label, rich text) rows for the doctor table."""
    if check["error"]:
        return [("store database", f"[red]{escape(check['error'])}[/red]")]
    if check["integrity"]:
        found = "; ".join(check["integrity"][:3])
        state = (
            f"[red]damaged ({escape(found)})[/red]: move stencil.db aside, then `stencil store repair` "
            "(docs/store.md)"
        )
    else:
        state = "[green]ok[/green]"
        if check["read_only"]:
            state += " (read-only: commands that change it will refuse)"
    lines = [("store database", state)]
    if check["unindexed_folders"]:
        names = escape(", ".join(check["unindexed_folders"]))
        lines.append(
            ("subject folders", f"[yellow]without a database row: {names}[/yellow]: `stencil store repair`")
        )
    for image in check["missing_files"][:10]:
        lines.append(
            (
                "missing photo",
                f"[yellow]photo {image['id']} of {escape(image['subject'])}[/yellow]: "
                f"{escape(image['file'])}",
            )
        )
    if len(check["missing_files"]) > 10:
        lines.append(("missing photo", f"... and {len(check['missing_files']) - 10} more"))
    return lines


def register(app: typer.Typer) -> None:
    """Register the models, config and doctor commands on `app`."""
    models_app.command("ls")(models_ls)
    models_app.command("pull")(models_pull)
    models_app.command("check")(models_check)
    config_app.command("get")(config_get)
    config_app.command("set")(config_set)
    config_app.command("unset")(config_unset)
    config_app.command("ls")(config_ls)
    app.add_typer(models_app, name="models")
    app.add_typer(config_app, name="config")
    app.command()(doctor)
