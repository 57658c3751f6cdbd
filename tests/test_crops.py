"""Crops that keep the subject: a non-square photo's square is placed on its subject's mask (from the mask
pass on the whole, letterboxed photo), the masks are then computed on that crop, and `show --masks` shows it.

The choice is tested with synthetic subject masks (on tiny random weights the mask pass means nothing); the
wiring (that training and the mask pictures use the chosen crop) is tested with the tiny pipeline, with the
whole-photo pass's mask replaced by a known one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stencil_cli.base.crops import (
    box_from_canvas_mask,
    centre_box,
    crop_resize,
    letterbox,
    subject_box,
)
from stencil_cli.base.images import center_crop_resize
from stencil_cli.core import training
from stencil_cli.core.training import TrainConfig, images_to_tensor, prepare_training_data

RESOLUTION = 512
LATENT = RESOLUTION // 8  # the mask pass's masks are at the latent size


def _coverage(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    left, top, right, bottom = box
    return float(mask[top:bottom, left:right].sum() / mask.sum())


def _dog_at_the_top(width: int = 600, height: int = 1200) -> tuple[Image.Image, np.ndarray]:
    """A tall photo with its subject (a brown blob) in the top third, and the subject's mask."""
    photo = Image.new("RGB", (width, height), (90, 140, 80))
    mask_image = Image.new("L", (width, height), 0)
    shape = [width * 0.25, height * 0.03, width * 0.75, height * 0.33]
    ImageDraw.Draw(photo).ellipse(shape, fill=(150, 100, 60))
    ImageDraw.Draw(mask_image).ellipse(shape, fill=1)
    return photo, np.asarray(mask_image, dtype=np.float64)


def _mask_pass_on_canvas(mask: np.ndarray) -> np.ndarray:
    """What a mask pass on the letterboxed photo finds for a subject with this mask: the mask letterboxed
    the same way, at the latent size, thresholded."""
    image = Image.fromarray((mask * 255).astype(np.uint8))
    canvas, _ = letterbox(image, RESOLUTION)
    small = canvas.convert("L").resize((LATENT, LATENT), Image.Resampling.BILINEAR)
    return (np.asarray(small) > 127).astype(np.float32)


def test_the_crop_keeps_a_subject_at_the_top_of_a_tall_photo() -> None:
    photo, mask = _dog_at_the_top()
    _, placed = letterbox(photo, RESOLUTION)
    box = box_from_canvas_mask(photo.size, _mask_pass_on_canvas(mask), placed, RESOLUTION)
    assert box[2] - box[0] == box[3] - box[1] == 600  # the shorter side, square
    assert _coverage(mask, box) >= 0.9
    assert _coverage(mask, centre_box(*photo.size)) < 0.5  # today's centre crop loses the head


@pytest.mark.parametrize("where", ["left", "right"])
def test_the_crop_follows_a_subject_to_either_end_of_a_wide_photo(where: str) -> None:
    mask = np.zeros((400, 1000))
    columns = slice(20, 300) if where == "left" else slice(700, 980)
    mask[100:300, columns] = 1
    box = subject_box(1000, 400, mask)
    assert _coverage(mask, box) == 1.0
    assert (box[0] == 0) if where == "left" else (box[2] == 1000)


def test_a_subject_larger_than_the_crop_is_centred_on() -> None:
    mask = np.zeros((1000, 300))
    mask[100:700] = 1  # taller than the 300 px square: many positions hold as much of it
    left, top, right, bottom = subject_box(300, 1000, mask)
    assert abs((top + bottom) / 2 - 400) <= 1000 / len(mask)  # centred on the subject, not pushed to an end


def test_a_coarse_mask_over_the_photo_places_the_crop_in_photo_pixels() -> None:
    mask = np.zeros((64, 32))  # a latent-sized map over a 1000x2000 photo
    mask[48:60, 8:24] = 1
    left, top, right, bottom = subject_box(1000, 2000, mask)
    assert (left, right) == (0, 1000) and bottom - top == 1000
    full = np.kron(mask, np.ones((2000 // 64 + 1, 1000 // 32 + 1)))[:2000, :1000]
    assert _coverage(full, (left, top, right, bottom)) >= 0.9


@pytest.mark.parametrize(
    "subject",
    [np.zeros((60, 30)), np.full((60, 30), np.nan), np.zeros(5)],
    ids=["empty", "not-finite", "not-a-map"],
)
def test_no_usable_subject_map_keeps_the_centre_crop(subject: np.ndarray) -> None:
    assert subject_box(300, 600, subject) == centre_box(300, 600)


def test_a_square_photo_is_cropped_bit_for_bit_as_before() -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8))
    box = subject_box(700, 700, rng.random((64, 64)))
    assert box == (0, 0, 700, 700)
    before = center_crop_resize(photo, RESOLUTION)
    assert crop_resize(photo, box, RESOLUTION).tobytes() == before.tobytes()
    pixels, crops = images_to_tensor([photo], RESOLUTION, [box])
    assert crops[0].tobytes() == before.tobytes()
    old = torch.from_numpy(np.asarray(before, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(pixels[0], old)


# -- wiring: training and the mask pictures use the chosen crop ------------------------------------------


PHRASE = "toy robot"
CAPTION = "a photo of a toy robot on a table"


@pytest.fixture
def whole_photo_mask_at_the_top(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Replace the mask pass on letterboxed photos (only that one) by a subject in the top 20% of the
    canvas; record the latents each later mask pass (on the crops) is given."""
    real = training.compute_masks
    seen: list[torch.Tensor] = []
    canvas_done = []

    def fake_on_canvas(unet: Any, scheduler: Any, latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = real(unet, scheduler, latents, *args, **kwargs)
        if canvas_done:
            seen.append(latents.clone())
            return result
        canvas_done.append(True)  # the first pass is the one on the letterboxed photos
        masks = torch.zeros_like(result.masks)
        masks[..., : masks.shape[-2] // 5, :] = 1
        return type(result)(masks=masks, maps=result.maps)

    monkeypatch.setattr(training, "compute_masks", fake_on_canvas)
    return seen


def _tall_photo() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (640, 320, 3), dtype=np.uint8))


def test_training_data_is_the_crop_on_the_subject_and_its_masks_are_computed_there(
    tiny_subject_pipe: Any, whole_photo_mask_at_the_top: list[torch.Tensor]
) -> None:
    photo = _tall_photo()
    config = TrainConfig(resolution=64, steps=1, batch_size=1)
    data = prepare_training_data(tiny_subject_pipe, [photo], [CAPTION], PHRASE, config)
    assert data.boxes == [(0, 0, 320, 320)]  # the top square, where the whole-photo mask put the subject
    assert data.crops[0].tobytes() == crop_resize(photo, (0, 0, 320, 320), 64).tobytes()
    expected = training.encode_latents(tiny_subject_pipe.vae, images_to_tensor([photo], 64, data.boxes)[0])
    assert torch.equal(data.latents, expected)
    assert len(whole_photo_mask_at_the_top) == 1  # the masks that are trained come from a pass on the crop
    assert torch.equal(whole_photo_mask_at_the_top[0], data.latents)


def test_square_photos_take_no_extra_pass_and_train_on_the_same_data(
    tiny_subject_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    photos = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(2)]
    calls: list[int] = []
    real = training.compute_masks
    monkeypatch.setattr(training, "compute_masks", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = TrainConfig(resolution=64, steps=1, batch_size=2)
    data = prepare_training_data(tiny_subject_pipe, photos, [CAPTION] * 2, PHRASE, config)
    assert calls == [1]  # one mask pass, on the crops, as before
    assert [crop.tobytes() for crop in data.crops] == [center_crop_resize(p, 64).tobytes() for p in photos]
    pixels, _ = images_to_tensor(photos, 64)
    assert torch.equal(data.latents, training.encode_latents(tiny_subject_pipe.vae, pixels))


def test_no_mask_training_centre_crops_without_a_mask_pass(
    tiny_subject_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "compute_masks", lambda *a, **k: pytest.fail("no mask pass without masks"))
    photo = _tall_photo()
    config = TrainConfig(resolution=64, steps=1, batch_size=1, use_mask=False)
    data = prepare_training_data(tiny_subject_pipe, [photo], [CAPTION], PHRASE, config)
    assert data.boxes == [centre_box(320, 640)]
    assert data.crops[0].tobytes() == center_crop_resize(photo, 64).tobytes()


def test_mask_pictures_and_the_contact_sheet_show_the_trained_crop(
    cli: Any, tiny_preset: Path, tmp_path: Path, whole_photo_mask_at_the_top: list[torch.Tensor]
) -> None:
    from stencil_cli.store.db import open_store

    top, bottom = (250, 30, 30), (30, 30, 250)
    photo = Image.new("RGB", (300, 600), bottom)
    photo.paste(top, (0, 0, 300, 300))  # the top square red, the bottom one blue
    path = tmp_path / "tall.png"
    photo.save(path)
    assert cli("add", "robot", path, "--phrase", PHRASE).exit_code == 0
    store = open_store()
    image_id = store.get_subject("robot").images[0]["id"]
    store.set_captions("robot", {image_id: CAPTION}, "manual")
    result = cli("train", "robot", "--subject-model", "tiny", "--masks-only", "--json")
    assert result.exit_code == 0, result.output
    picture_path = Path(json.loads(result.stdout)["masks"][0]["file"])
    with Image.open(picture_path) as picture:
        assert picture.info["stencil:crop"] == "0,0,300,300"
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    red, _, blue = pixels[-pixels.shape[0] // 10 :].reshape(-1, 3).mean(axis=0)
    assert red > blue  # the overlay's bottom rows are of the top (red) square; the centre's would be blue
    shown = cli("show", "robot", "--masks", "--json")
    sheet = Path(json.loads(shown.stdout)["contact_sheet"])
    with Image.open(sheet) as picture:
        photo_tile = picture.convert("RGB").crop((0, 0, 256, 256))
    assert photo_tile.getpixel((128, 200)) == top  # the photo beside its mask is the trained crop


def test_centre_crops_can_be_asked_for_and_take_no_extra_pass(
    tiny_subject_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = training.compute_masks
    monkeypatch.setattr(training, "compute_masks", lambda *a, **k: calls.append(1) or real(*a, **k))
    photo = _tall_photo()
    config = TrainConfig(resolution=64, steps=1, batch_size=1, crop="centre")
    data = prepare_training_data(tiny_subject_pipe, [photo], [CAPTION], PHRASE, config)
    assert calls == [1] and data.boxes == [centre_box(320, 640)]
    assert "crop" in config.to_params()  # recorded with the run and in the weights' metadata


def test_a_run_begun_before_subject_crops_resumes_with_its_centre_crops(cli: Any, tmp_path: Path) -> None:
    from photos import add_subject

    from stencil_cli.verbs.train import TrainRequest, resumed_config

    store = add_subject(cli, tmp_path)
    old_params = {key: value for key, value in TrainConfig().to_params().items() if key != "crop"}
    old = store.create_run("robot", old_params, "tiny")
    config, _ = resumed_config(store, old, TrainRequest("robot", resume=True))
    assert config.crop == "centre"
    new = store.create_run("robot", TrainConfig().to_params(), "tiny")
    assert resumed_config(store, new, TrainRequest("robot", resume=True))[0].crop == "subject"


def test_an_unknown_crop_choice_is_refused_by_field() -> None:
    from stencil_cli.base.errors import FieldError

    with pytest.raises(FieldError) as caught:
        TrainConfig(crop="middle").validate()  # type: ignore[arg-type]
    assert caught.value.fields == ("crop",)
