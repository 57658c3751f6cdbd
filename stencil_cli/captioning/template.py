"""The offline captioner: template captions around the subject's phrase ("a photo of a cat")."""

from __future__ import annotations

from collections.abc import Sequence

from stencil_cli.base.errors import StencilError
from stencil_cli.captioning.phrases import article, validate_phrase
from stencil_cli.captioning.protocol import CaptionJob, CaptionResult, Photo

TEMPLATES = (
    "a photo of {a} {phrase}",
    "a close-up photo of {a} {phrase}",
    "a good photo of the {phrase}",
    "a bright photo of the {phrase}",
    "a cropped photo of {a} {phrase}",
    "a photo of the {phrase} seen from the side",
    "a clean photo of {a} {phrase}",
    "a photo of my {phrase}",
)


def template_caption(phrase: str, index: int) -> str:
    """The `index`-th template caption for `phrase` ("a photo of a cat", "a close-up photo of a cat", ...)."""
    template = TEMPLATES[index % len(TEMPLATES)]
    return template.format(a=article(phrase), phrase=phrase)


class TemplateCaptioner:
    """Offline captions from templates ("a photo of a {phrase}"); needs a phrase, gives no description."""

    name = "template"

    def caption(self, request: CaptionJob) -> CaptionResult:
        """Caption each photo with a rotating template around the subject's phrase (or class word)."""
        phrase = validate_phrase(request.phrase) or validate_phrase(request.class_word)
        if phrase is None:
            raise StencilError(
                "the template captioner needs the subject's phrase, and this subject has none",
                hint="pass {phrase='cat'} (or set it with `stencil add NAME {add.phrase=...}`)",
                fields=("phrase", "add.phrase"),
            )
        captions = {photo.id: template_caption(phrase, index) for index, photo in enumerate(request.photos)}
        return CaptionResult(phrase=phrase, captions=captions, source="template")

    def write_draft_prompt(
        self, photos: Sequence[Photo], user_prompt: str, phrase: str, description: str | None
    ) -> str | None:
        """No vision model: None, so the prompt rules (`prompts.build_prompts`) write the draft prompt."""
        return None
