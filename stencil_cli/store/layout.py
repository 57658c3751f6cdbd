"""Where things live in the store: every file and folder name under the root, written here once.

Under the root (``STENCIL_HOME`` or the platform's user data folder)::

    stencil.db                                    subjects, images, runs, generations, config (SQLite)
    subjects/<name>/                              one folder per subject:
        images/<sha256>.jpg|.png                  the photos, named by content hash (`photo_relative`)
        masks/<id>-<sha256[:12]>.png              the latest mask picture of each photo (`mask_path`)
        masks/contact-sheet.png                   each photo beside its mask (`show --masks`)
        runs/<run id>/weights.safetensors         a training run: its weights,
        runs/<run id>/checkpoint.pt               its resumable state,
        runs/<run id>/loss.png                    its loss curve,
        runs/<run id>/masks/                      the mask pictures it trained with,
        runs/<run id>/samples/step-000050-p0.png  its previews (`sample_path`)
        generations/<batch>/<stem>.png            generated images (`batch_name`, `image_name`),
        generations/<batch>/draft-<stem>.png      their drafts (`draft_name`),
        generations/<batch>/grid.png              the batch's contact sheet
        generations/bench/                        the DreamBench runner's images
        recovered/                                runs and generations set aside by `store repair`
        view.html                                 the subject's page (`stencil view`)
        .train.lock                               held while the subject trains
    models/                                       locally built models (the models layer: `models_root`)
    locks/<name>.lock                             which commands use a subject (the base layer: `base.locks`)

The two last folders are named by the lower layers that own them (they cannot import the store). Paths kept
in the database are relative to the root (`photo_relative`), so a store moves as one folder.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DB_NAME = "stencil.db"
SUBJECTS_DIR = "subjects"

# inside subjects/<name>/
IMAGES_DIR = "images"
MASKS_DIR = "masks"
RUNS_DIR = "runs"
GENERATIONS_DIR = "generations"
RECOVERED_DIR = "recovered"
PAGE_NAME = "view.html"
TRAIN_LOCK_NAME = ".train.lock"

# inside runs/<run id>/
WEIGHTS_NAME = "weights.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"
LOSS_CURVE_NAME = "loss.png"
SAMPLES_DIR = "samples"

# pictures
GRID_NAME = "grid.png"  # a generation batch's contact sheet
CONTACT_SHEET_NAME = "contact-sheet.png"  # photos beside their masks (and a DreamBench subject's sheet)
# contact sheets: no generation row points at them, and `store clean` keeps them
SHEET_NAMES = frozenset({GRID_NAME, CONTACT_SHEET_NAME})
BENCH_BATCH = "bench"  # the generations folder of the DreamBench runner

PHOTO_FILE = re.compile(r"[0-9a-f]{64}\.(jpg|png)")  # how `add` names a stored photo


def subjects_folder(root: Path) -> Path:
    """The folder holding every subject's folder."""
    return Path(root) / SUBJECTS_DIR


def subject_folder(root: Path, name: str) -> Path:
    """The folder of subject `name` (a valid name; `Store.subject_dir` checks it and refuses links)."""
    return subjects_folder(root) / name


def run_folder(subject_folder: Path, run_id: int) -> Path:
    """The folder of training run `run_id` inside a subject's folder."""
    return subject_folder / RUNS_DIR / str(run_id)


def photo_name(sha256: str, suffix: str) -> str:
    """The file name of a stored photo: its content hash and its suffix (``.jpg`` or ``.png``)."""
    return f"{sha256}{suffix}"


def photo_relative(name: str, file_name: str) -> str:
    """The store-relative path of photo file `file_name` of subject `name`, as the database keeps it."""
    return f"{SUBJECTS_DIR}/{name}/{IMAGES_DIR}/{file_name}"


def mask_path(folder: Path, image: dict[str, Any]) -> Path:
    """Where a photo's mask picture lives in `folder` (named by photo id and content hash)."""
    return folder / f"{image['id']}-{image['sha256'][:12]}.png"


def sample_path(run_dir: Path, step: int, index: int) -> Path:
    """Where the preview of sample prompt `index` at training step `step` goes."""
    return run_dir / SAMPLES_DIR / f"step-{step:06d}-p{index}.png"


def batch_name() -> str:
    """A folder name for one generation call: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def image_name(stem: str) -> str:
    """The file name of a generated image."""
    return f"{stem}.png"


def draft_name(stem: str) -> str:
    """The file name of the context model's draft of a generated image."""
    return f"draft-{stem}.png"
