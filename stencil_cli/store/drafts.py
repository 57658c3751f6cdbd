"""The draft-prompt cache: draft prompts a vision model wrote for a subject, kept so that the same request
does not ask (and pay) again. A new phrase or description changes the key, so a stale draft prompt is never
used."""

from __future__ import annotations

import hashlib

from stencil_cli.store.connection import translate_errors
from stencil_cli.store.records import Subject, now
from stencil_cli.store.subjects import SubjectQueries

CACHE_KEY = ("subject_id", "user_prompt", "model", "description_hash")


def description_hash(phrase: str | None, description: str | None) -> str:
    """The key of the subject's look in the draft prompt cache: a hash of its phrase and description (a new
    caption or phrase makes the cached draft prompts stale)."""
    text = f"{phrase or ''}\n{description or ''}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DraftPromptCache(SubjectQueries):
    """The `draft_prompts` table: one draft prompt per subject, user prompt, model and description hash."""

    @translate_errors
    def cached_draft_prompt(
        self, subject: Subject, user_prompt: str, model: str, description_hash: str
    ) -> str | None:
        """The draft prompt `model` wrote for `subject` and `user_prompt` (from the phrase and description
        that `description_hash` stands for), or None when none is stored."""
        row = next(
            iter(
                self.db.query(
                    "select draft_prompt from draft_prompts where subject_id = ? and user_prompt = ? "
                    "and model = ? and description_hash = ?",
                    [subject.id, user_prompt, model, description_hash],
                )
            ),
            None,
        )
        return row["draft_prompt"] if row else None

    @translate_errors
    def cache_draft_prompt(
        self, subject: Subject, user_prompt: str, model: str, description_hash: str, draft_prompt: str
    ) -> None:
        """Keep the draft prompt `model` wrote (replacing an older one for the same key)."""
        with self.write():
            self.check_subject(subject.name, subject.id)
            self.db["draft_prompts"].upsert(
                {
                    "subject_id": subject.id,
                    "user_prompt": user_prompt,
                    "model": model,
                    "description_hash": description_hash,
                    "draft_prompt": draft_prompt,
                    "created": now(),
                },
                pk=CACHE_KEY,
            )
