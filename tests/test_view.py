"""`stencil view`: the subject's static HTML page, and the mask contact sheet of `show --masks`."""

from __future__ import annotations

import json
import shutil
import webbrowser
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from photos import add_subject
from PIL import Image, PngImagePlugin
from test_history import done_run, fake_image

from stencil_cli.store.db import Store
from stencil_cli.store.layout import LOSS_CURVE_NAME, MASKS_DIR, SAMPLES_DIR, mask_path
from stencil_cli.verbs.sheets import Layout
from stencil_cli.verbs.train import mask_files
from stencil_cli.verbs.view import mask_panels

HOSTILE = 'a toy robot <script>alert("x")</script> & <marquee>friends</marquee>'


VOID = {"img", "br", "meta", "link", "input", "hr", "source", "wbr"}


class Element:
    """One element of the parsed page: tag, attributes, children, text."""

    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Element | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Element] = []
        self.text: list[str] = []

    @property
    def classes(self) -> set[str]:
        """The element's CSS classes."""
        return set((self.attrs.get("class") or "").split())

    def iter(self) -> list[Element]:
        """This element and every element inside it, in document order."""
        found = [self]
        for child in self.children:
            found += child.iter()
        return found

    def find_all(self, tag: str | None = None, css: str | None = None) -> list[Element]:
        """The elements inside (or this one) with `tag` and/or the CSS class `css`."""
        return [e for e in self.iter() if (tag is None or e.tag == tag) and (css is None or css in e.classes)]

    def all_text(self) -> str:
        """The text inside, whitespace collapsed."""
        return " ".join(" ".join(t for e in self.iter() for t in e.text).split())


class Page(HTMLParser):
    """The parts of the page the tests look at: referenced files, text, any script element, and the tree."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.section_ids: list[str] = []
        self.attributes: list[str] = []
        self.root = Element("#document", {}, None)
        self.current = self.root
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        self.attributes += [name for name, _ in attrs]
        if tag == "img":
            self.images.append(values["src"] or "")
        elif tag == "a" and not (values.get("href") or "").startswith("#"):
            self.links.append(values["href"] or "")
        elif tag == "section":
            self.section_ids.append(values.get("id") or "")
        element = Element(tag, values, self.current)
        self.current.children.append(element)
        if tag not in VOID:
            self.current = element

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        self.current.text.append(data)

    @property
    def all_text(self) -> str:
        """The visible text, whitespace collapsed."""
        return " ".join(" ".join(self.text).split())

    def file(self, reference: str) -> Path:
        """The file a src/href points at, read as the browser would (relative to the page's folder)."""
        url = urlparse(reference)
        assert url.scheme in ("", "file"), f"the page reaches outside the disk: {reference}"
        if url.scheme == "file":
            return Path(unquote(url.path))
        return (self.path.parent / unquote(url.path)).resolve()

    def referenced(self) -> set[Path]:
        """Every file the page shows or links to."""
        return {self.file(reference) for reference in self.images + self.links}

    def section(self, anchor: str) -> Element:
        """The <section> with this id."""
        [found] = [e for e in self.root.find_all("section") if e.attrs.get("id") == anchor]
        return found


def subject_with_history(cli: Any, tmp_path: Path) -> Store:
    """`robot`: two photos (one captioned with markup), a mask picture for the first, a done run with a loss
    curve and two previews, and two generated images."""
    store = add_subject(cli, tmp_path)
    subject = store.get_subject("robot")
    first, second = subject.images
    assert cli("caption", "robot", "--set", str(first["id"]), HOSTILE).exit_code == 0
    mask = mask_path(store.subject_dir("robot") / MASKS_DIR, first)
    mask.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(mask)
    run = done_run(store, lr=3e-05, resolution=64)
    folder = store.run_dir("robot", run.id)
    Image.new("RGB", (64, 32), "white").save(folder / LOSS_CURVE_NAME)
    for step in (5, 10):
        (folder / SAMPLES_DIR).mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (step, 0, 0)).save(folder / SAMPLES_DIR / f"step-{step}.png")
    fake_image(store, "robot", run, "on the moon", 7, tau=60.0)
    fake_image(store, "robot", run, "in a <garden>", 8, tau=None)
    return store


def test_view_page_shows_every_photo_mask_run_and_image_and_only_files_that_exist(
    cli: Any, tmp_path: Path
) -> None:
    store = subject_with_history(cli, tmp_path)
    result = cli("view", "robot", "--no-open")
    assert result.exit_code == 0, result.output
    page_file = Path(result.stdout.strip())
    assert page_file == store.subject_dir("robot") / "view.html"
    page = Page(page_file)
    referenced = page.referenced()
    assert all(path.is_file() for path in referenced), [p for p in referenced if not p.is_file()]
    shown = {page.file(src) for src in page.images}
    subject = store.get_subject("robot")
    photos = {Path(image["file"]).resolve() for image in subject.images}
    generated = {g.image_file.resolve() for g in store.list_generations("robot") if g.image_file}
    assert photos <= shown and generated <= shown and len(generated) == 2
    [run] = store.list_runs("robot")
    run_folder = store.run_dir("robot", run.id).resolve()
    assert run_folder / LOSS_CURVE_NAME in shown
    assert {run_folder / SAMPLES_DIR / "step-5.png", run_folder / SAMPLES_DIR / "step-10.png"} <= shown
    masks = store.subject_dir("robot").resolve() / MASKS_DIR
    assert mask_path(masks, subject.images[0]) in shown
    text = page.all_text
    assert "no mask picture yet" in text  # the second photo has none
    facts = ("toy robot", "run 1", "done", "full", "4/4", "0.2500", "3e-05", "on the moon", "in a <garden>")
    for fact in facts:
        assert fact in text, fact
    assert "tau 60" in text and "seed 7" in text and "mode context" in text and "mode plain" in text
    assert page.section_ids == ["images", "runs", "photos"]  # the images first: within one screen


def test_view_escapes_text_so_a_caption_with_markup_is_shown_as_text(cli: Any, tmp_path: Path) -> None:
    subject_with_history(cli, tmp_path)
    page = Page(Path(cli("view", "robot", "--no-open").stdout.strip()))
    assert HOSTILE in page.all_text
    assert "script" not in page.tags and "marquee" not in page.tags


def test_view_shows_scores_after_eval(cli: Any, tmp_path: Path) -> None:
    store = subject_with_history(cli, tmp_path)
    before = Page(Path(cli("view", "robot", "--no-open").stdout.strip()))
    assert "DINO" not in before.all_text
    scored = cli("eval", "robot", "--eval-models", "tiny", "--json")
    assert scored.exit_code == 0, scored.output
    rows = {row["id"]: row["scores"] for row in json.loads(scored.stdout)["generations"]}
    after = Page(Path(cli("view", "robot", "--no-open").stdout.strip()))
    for generation in store.list_generations("robot"):
        scores = rows[generation.id]
        for key in ("dino", "clip_i", "clip_t"):
            assert f"{key.replace('_', '-').upper()} {scores[key]:.3f}" in after.all_text


def test_view_out_writes_elsewhere_with_paths_that_still_reach_the_store(cli: Any, tmp_path: Path) -> None:
    subject_with_history(cli, tmp_path)
    target = tmp_path / "somewhere" / "else" / "robot page.html"
    result = cli("view", "robot", "--out", target, "--no-open", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert Path(data["page"]) == target and data["photos"] == 2 and data["images"] == 2 and data["masks"] == 1
    page = Page(target)
    assert page.images and all(path.is_file() for path in page.referenced())
    folder = tmp_path / "pages"
    folder.mkdir()
    into = cli("view", "robot", "--out", folder, "--no-open")
    assert into.exit_code == 0 and Path(into.stdout.strip()) == folder / "robot.html"
    assert (folder / "robot.html").is_file()
    new_folder = cli("view", "robot", "--out", tmp_path / "new-pages", "--no-open")
    assert Path(new_folder.stdout.strip()) == tmp_path / "new-pages" / "robot.html"
    assert all(path.is_file() for path in Page(tmp_path / "new-pages" / "robot.html").referenced())


def test_view_opens_the_browser_unless_told_not_to(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_subject(cli, tmp_path)
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    result = cli("view", "robot")
    assert result.exit_code == 0, result.output
    assert opened == [Path(result.stdout.strip()).resolve().as_uri()]
    assert cli("view", "robot", "--no-open").exit_code == 0 and len(opened) == 1
    page = Page(Path(result.stdout.strip()))
    assert "no training runs yet: stencil train robot" in page.all_text


def test_view_shows_a_placeholder_for_a_missing_image_file(cli: Any, tmp_path: Path) -> None:
    store = subject_with_history(cli, tmp_path)
    gone = store.list_generations("robot")[0].image_file
    gone.unlink()
    result = cli("view", "robot", "--no-open")
    assert result.exit_code == 0, result.output
    assert "file missing" in " ".join(result.stderr.split()) and gone.name in result.stderr
    page = Page(Path(result.stdout.strip()))
    assert all(path.is_file() for path in page.referenced())
    assert "file missing" in page.all_text


def test_view_bad_input_is_one_line(cli: Any, tmp_path: Path) -> None:
    add_subject(cli, tmp_path)
    ghost = cli("view", "ghost", "--no-open")
    assert ghost.exit_code == 1 and "ghost" in ghost.stderr and "Traceback" not in ghost.output
    device = cli("view", "robot", "--out", "/dev/null", "--no-open")
    assert device.exit_code == 2 and "--out /dev/null is not a file" in " ".join(device.stderr.split())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    under_file = cli("view", "robot", "--out", blocker / "page.html", "--no-open")
    assert under_file.exit_code == 2 and "is a file, not a folder" in " ".join(under_file.stderr.split())
    unwritable = cli("view", "robot", "--out", "/proc/no-such/page.html", "--no-open")
    assert unwritable.exit_code == 1 and "cannot write the page" in " ".join(unwritable.stderr.split())
    assert not list(tmp_path.rglob("*.html"))


def test_view_out_is_refused_empty_or_inside_the_store(cli: Any, tmp_path: Path, monkeypatch: Any) -> None:
    store = add_subject(cli, tmp_path)
    monkeypatch.chdir(tmp_path)
    empty = cli("view", "robot", "--out", "", "--no-open")
    assert empty.exit_code == 2 and "--out is empty" in " ".join(empty.stderr.split())
    photo = Path(store.get_subject("robot").images[0]["file"])
    before = photo.read_bytes()
    inside = cli("view", "robot", "--out", photo, "--no-open")
    assert inside.exit_code == 2 and "is inside the store" in " ".join(inside.stderr.split())
    assert photo.read_bytes() == before and not list(tmp_path.glob("*.html"))
    assert cli("view", "robot", "--no-open").exit_code == 0  # the subject's own page is the store's to write


def test_show_masks_writes_a_contact_sheet_of_photos_beside_their_masks(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    none_yet = cli("show", "robot", "--masks", "--json")
    assert json.loads(none_yet.stdout)["contact_sheet"] is None
    subject = store.get_subject("robot")
    for image in subject.images:
        mask = mask_path(store.subject_dir("robot") / MASKS_DIR, image)
        mask.parent.mkdir(parents=True, exist_ok=True)
        text = PngImagePlugin.PngInfo()
        text.add_text("stencil:caption", f"a toy robot, photo {image['id']}, on a <desk>")
        text.add_text("stencil:coverage", "0.4")
        Image.new("RGB", (64, 64), (250, 0, 0)).save(mask, pnginfo=text)
    result = cli("show", "robot", "--masks")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 2  # one line per photo, as before
    sheet = store.subject_dir("robot") / MASKS_DIR / "contact-sheet.png"
    assert "contact sheet" in result.stderr and sheet.name in result.stderr
    assert json.loads(cli("show", "robot", "--masks", "--json").stdout)["contact_sheet"] == str(sheet)
    panels = mask_panels(mask_files(store, subject), 256)
    first = subject.images[0]["id"]
    assert [p.label for p in panels[0].pictures] == [f"photo {first}", "mask, 40% of the picture"]
    assert panels[0].caption == f"caption: a toy robot, photo {first}, on a <desk>"  # what it was asked for
    layout = Layout(256)
    with Image.open(sheet) as picture:
        pixels = picture.convert("RGB")
        assert picture.width > picture.height  # two pairs side by side
        middle = layout.pad + 128
        row = [pixels.getpixel((x, middle)) for x in range(pixels.width)]
        assert row.index((250, 0, 0)) > layout.pad + 200  # the mask to the right of photo 1
        assert row.index((250, 0, 0)) < layout.pad + 256 + 16


# -- the page shows each image beside its draft, grouped by prompt -----------------------------------------


def rendered(
    store: Store,
    run: Any,
    prompt: str,
    seed: int,
    tau: float | None,
    mode: str = "context",
    batch: str = "b1",
) -> int:
    """A generated image row with its image and (except plain) draft file, in distinct colours; its id."""
    subject = store.get_subject("robot")
    folder = store.generation_dir("robot") / batch
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"s{seed}-tau{tau}-{len(list(folder.iterdir()))}.png"
    Image.new("RGB", (32, 32), (seed % 255, 200, 10)).save(image)
    draft = None
    if mode != "plain":
        draft = folder / f"draft-s{seed}.png"
        Image.new("RGB", (32, 32), (10, seed % 255, 200)).save(draft)
    row = store.add_generation(
        subject,
        {
            "run_id": run.id,
            "prompt": prompt,
            "seed": seed,
            "tau": tau,
            "params": {"mode": mode, "batch": batch},
            "image_file": image,
            "draft_file": draft,
        },
    )
    return row.id


def pair_cards(page: Page) -> list[Element]:
    """The image/draft pairs of the images section, in page order."""
    return pair_cards_in(page.section("images"))


def pair_cards_in(element: Element) -> list[Element]:
    """The image/draft pairs inside `element`, in page order."""
    return element.find_all("figure", "pair-card")


def test_view_shows_every_image_beside_its_draft_or_the_users_picture(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = done_run(store)
    made = {
        rendered(store, run, "a toy robot on the moon", 1, 20.0): "draft",
        rendered(store, run, "a toy robot on the moon", 1, 60.0): "draft",
        rendered(store, run, "a toy robot in a hat", 2, 60.0, mode="edit", batch="b2"): "your picture",
        rendered(store, run, "a toy robot, plain", 3, None, mode="plain", batch="b3"): "no draft",
    }
    page = Page(Path(cli("view", "robot", "--no-open").stdout.strip()))
    rows = {g.id: g for g in store.list_generations("robot")}
    cards = pair_cards(page)
    assert len(cards) == len(made)
    for card in cards:
        generation = rows[int(card.attrs["id"].removeprefix("image-"))]
        source, result = card.find_all("figure", "side")
        assert "source" in source.classes and "result" in result.classes  # the draft on the left
        [result_img] = result.find_all("img")
        assert page.file(result_img.attrs["src"]) == generation.image_file.resolve()
        assert source.find_all("figcaption")[0].all_text() == made[generation.id]
        if generation.draft_file is None:
            assert not source.find_all("img") and "no draft" in source.all_text()
        else:
            [draft_img] = source.find_all("img")
            assert page.file(draft_img.attrs["src"]) == generation.draft_file.resolve()
        under = card.find_all("p", "under")[0].all_text()
        tau = f"{generation.tau:g}" if generation.tau is not None else "-"
        assert under == f"tau {tau} seed {generation.seed} run {run.id} mode {generation.params['mode']}"


def test_view_groups_images_by_prompt_with_the_newest_group_first(cli: Any, tmp_path: Path) -> None:
    store = add_subject(cli, tmp_path)
    run = done_run(store)
    moon = [rendered(store, run, "on the moon", seed, 60.0) for seed in (1, 2)]
    hat = [rendered(store, run, "in a hat", 3, 60.0, batch="b2")]
    moon += [rendered(store, run, "on the moon", seed, 60.0, batch="b3") for seed in (4, 5)]  # newest: moon
    beach = [rendered(store, run, "on a beach", 6, 60.0, batch="b4")]  # the newest group
    page = Page(Path(cli("view", "robot", "--no-open").stdout.strip()))
    groups = page.section("images").find_all("div", "group")
    assert [g.attrs["data-prompt"] for g in groups] == ["on a beach", "on the moon", "in a hat"]
    ids = [[int(card.attrs["id"].removeprefix("image-")) for card in pair_cards_in(g)] for g in groups]
    assert ids[1] == [moon[2], moon[3], moon[0], moon[1]]  # the newest batch first, each in rendered order
    assert ids[0] == beach and ids[2] == hat
    assert "“on the moon” · 4 images" in groups[1].all_text()
    assert all(path.is_file() for path in page.referenced())


def test_view_page_is_static_and_works_from_a_copy_of_the_store(cli: Any, tmp_path: Path) -> None:
    store = subject_with_history(cli, tmp_path)
    rendered(store, store.list_runs("robot")[0], "on the moon", 9, 20.0, batch="b9")
    assert cli("view", "robot", "--no-open").exit_code == 0
    copy = tmp_path / "copied store"
    shutil.copytree(store.root, copy)
    shutil.rmtree(store.root)  # only the copy is left
    page = Page(copy / "subjects" / "robot" / "view.html")
    assert page.images and all(urlparse(src).scheme == "" for src in page.images + page.links)
    for reference in page.images + page.links:
        target = page.file(reference)
        assert target.is_file() and copy.resolve() in target.parents, reference
    assert "script" not in page.tags and not [a for a in page.attributes if a.startswith("on")]
    assert not [link for link in page.links if link.startswith("javascript:")]


def test_view_run_cards_show_the_settings_as_one_small_table_beside_the_chart(
    cli: Any, tmp_path: Path
) -> None:
    store = subject_with_history(cli, tmp_path)
    page = Page(Path(cli("view", "robot", "--no-open").stdout.strip()))
    [card] = page.section("runs").find_all("article", "run")
    [table] = card.find_all("table", "settings")
    cells = [cell for row in table.find_all("tr") for cell in row.children]
    assert [cell.tag for cell in cells] == ["th", "td"] * (len(cells) // 2)  # key, value, key, value ...
    settings = {key.all_text(): value.all_text() for key, value in zip(cells[::2], cells[1::2], strict=True)}
    assert settings["lr"] == "3e-05" and settings["base model"] == "tiny" and settings["resolution"] == "64"
    [chart] = card.find_all("img", "chart")
    assert page.file(chart.attrs["src"]).name == LOSS_CURVE_NAME
    assert "full" in card.find_all("p", "headline")[0].all_text() and len(store.list_runs("robot")) == 1
