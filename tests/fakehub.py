"""A fake Hugging Face Hub for `stencil models pull` tests: file listings per revision, PR refs, a fake
snapshot_download that filters with the real allow/ignore matching and lays files out like the real cache."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# What the official repos keep besides the files stencil needs: pickles in every framework, an ONNX folder,
# a half-precision variant, the model card.
EXTRA_FILES = [
    ".gitattributes",
    "README.md",
    "pytorch_model.bin",
    "tf_model.h5",
    "flax_model.msgpack",
    "onnx/config.json",
    "onnx/model.onnx",
    "model.fp16.safetensors",
]


@dataclass
class FakeRepo:
    """One Hub repo: files per revision ("main", "refs/pr/N"), the bot's PR numbers, a local file source."""

    revisions: dict[str, list[str]]
    bot_prs: list[int] = field(default_factory=list)
    source: Path | None = None  # a folder whose files stand in for the downloaded ones


@dataclass
class FakeHub:
    """Repos by id, and every snapshot_download call made (repo, revision, allow, ignore, kept files)."""

    repos: dict[str, FakeRepo]
    cache: Path
    downloads: list[dict[str, Any]] = field(default_factory=list)
    listed: list[tuple[str, str | None]] = field(default_factory=list)

    def repo(self, repo_id: str) -> FakeRepo:
        """The repo, or the Hub's not-found error."""
        from huggingface_hub.errors import RepositoryNotFoundError

        if repo_id not in self.repos:
            error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(error, f"404 Client Error: {repo_id}")
            raise error
        return self.repos[repo_id]

    def list_repo_files(self, repo_id: str, *, revision: str | None = None, **_: Any) -> list[str]:
        """HfApi.list_repo_files."""
        self.listed.append((repo_id, revision))
        return list(self.repo(repo_id).revisions[revision or "main"])

    def list_repo_refs(self, repo_id: str, *, include_pull_requests: bool = False, **_: Any) -> Any:
        """HfApi.list_repo_refs (only what stencil reads)."""
        revisions = self.repo(repo_id).revisions
        prs = [_ref(name) for name in revisions if name.startswith("refs/pr/")]
        return SimpleNamespace(
            branches=[_ref("refs/heads/main")],
            tags=[],
            converts=[],
            pull_requests=prs if include_pull_requests else None,
        )

    def get_repo_discussions(self, repo_id: str, *, author: str | None = None, **_: Any) -> Any:
        """HfApi.get_repo_discussions: the bot's pull requests when asked for its author."""
        numbers = self.repo(repo_id).bot_prs if author == "SFconvertbot" else []
        return iter([SimpleNamespace(num=n, author="SFconvertbot", is_pull_request=True) for n in numbers])

    def snapshot_download(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
        **_: Any,
    ) -> str:
        """huggingface_hub.snapshot_download: real pattern matching, real cache layout (refs + snapshots)."""
        from huggingface_hub.utils import filter_repo_objects

        repo = self.repo(repo_id)
        files = repo.revisions[revision or "main"]
        kept = sorted(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        self.downloads.append(
            {"repo_id": repo_id, "revision": revision, "allow": allow_patterns, "ignore": ignore_patterns,
             "files": kept}
        )  # fmt: skip
        folder = Path(cache_dir or self.cache) / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in kept:
            target = snapshot / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if repo.source is not None and (repo.source / name).is_file():
                shutil.copy(repo.source / name, target)
            else:
                target.write_text("{}" if name.endswith(".json") else "x")
        ref_file = folder / "refs" / (revision or "main")
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)
        return str(snapshot)


def _ref(name: str) -> Any:
    return SimpleNamespace(name=name, ref=name, target_commit="0" * 40)


def install(monkeypatch: pytest.MonkeyPatch, cache: Path, repos: dict[str, FakeRepo]) -> FakeHub:
    """Point HfApi's listing calls and snapshot_download at a FakeHub; HF cache = `cache`; online."""
    import huggingface_hub

    hub = FakeHub(repos, cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **k: hub.list_repo_files(*a, **k)
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_refs", lambda self, *a, **k: hub.list_repo_refs(*a, **k)
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "get_repo_discussions", lambda self, *a, **k: hub.get_repo_discussions(*a, **k)
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def eval_repos(dino_source: Path | None = None, clip_source: Path | None = None) -> dict[str, FakeRepo]:
    """The two official eval repos as they are on the Hub: pickles on main, safetensors only on a PR.

    DINO: PR 1 (a community PR that also adds model.safetensors) and PR 2 (the conversion bot's) -> PR 2.
    CLIP: PR 3 (a README fix) and PR 5 (safetensors; the bot list is empty) -> PR 5.
    """
    dino_files = ["config.json", "preprocessor_config.json"]
    clip_files = dino_files + ["tokenizer.json", "tokenizer_config.json"]
    weights = ["model.safetensors"]
    return {
        "facebook/dino-vits16": FakeRepo(
            {
                "main": dino_files + EXTRA_FILES[:5],
                "refs/pr/1": dino_files + EXTRA_FILES[:5] + weights,
                "refs/pr/2": dino_files + EXTRA_FILES + weights,
            },
            bot_prs=[2],
            source=dino_source,
        ),
        "openai/clip-vit-base-patch32": FakeRepo(
            {
                "main": clip_files + EXTRA_FILES[:5],
                "refs/pr/3": clip_files + EXTRA_FILES[:5],
                "refs/pr/5": clip_files + EXTRA_FILES + weights,
            },
            source=clip_source,
        ),
    }
