"""What a batch made, at a glance: contact_sheet.png (first frame of each job, labelled) and index.html."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .files import write_whole
from .manifest import DONE

CELL, PADDING, LINE_HEIGHT = 256, 8, 16
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv"}


def _label_lines(entry: dict) -> list[str]:
    lines = [f"{name}={value}" for name, value in entry["parameters"].items()]
    return lines + ([] if entry["status"] == DONE else [entry["status"].upper()])


def _first_frame(output_dir: Path, entry: dict) -> Image.Image | None:
    for name in entry.get("files", []):
        try:
            with Image.open(output_dir / name) as image:  # an animated WEBP or GIF opens on its first frame
                frame = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            continue  # a video, another non-image output, or an image too broken or too big to show
        return ImageOps.contain(frame, (CELL, CELL))  # small test-size outputs are scaled up to the cell too
    return None


def _fitted(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def write_contact_sheet(output_dir: Path, entries: list[dict]) -> Path:
    """A grid with one cell per job: its first image (or first frame), its parameters underneath."""
    columns = max(1, math.ceil(math.sqrt(len(entries))))
    rows = max(1, math.ceil(len(entries) / columns))
    label_height = LINE_HEIGHT * max((len(_label_lines(entry)) for entry in entries), default=1)
    cell_width, cell_height = CELL + 2 * PADDING, CELL + label_height + 2 * PADDING
    sheet = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for index, entry in enumerate(entries):
        left, top = (index % columns) * cell_width + PADDING, (index // columns) * cell_height + PADDING
        frame = _first_frame(output_dir, entry)
        if frame is None:
            draw.rectangle((left, top, left + CELL - 1, top + CELL - 1), fill="#ddd")
        else:
            sheet.paste(frame, (left + (CELL - frame.width) // 2, top + (CELL - frame.height) // 2))
        for line_number, line in enumerate(_label_lines(entry)):
            draw.text((left, top + CELL + 2 + line_number * LINE_HEIGHT), _fitted(draw, line, font, CELL),
                      fill="black", font=font)
    path = output_dir / "contact_sheet.png"
    encoded = io.BytesIO()
    sheet.save(encoded, format="PNG")
    write_whole(path, encoded.getvalue())
    return path


def write_index(output_dir: Path, entries: list[dict]) -> Path:
    """A page with every job's outputs (animated images and videos play) and its parameters."""
    cards = []
    for entry in entries:
        media = []
        for name in entry.get("files", []):
            # A name may hold "#", "%" or spaces: the link quotes it, the text shows it.
            source, text = html.escape(quote(name), quote=True), html.escape(name, quote=True)
            if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                media.append(f'<video src="{source}" controls loop muted></video>')
            else:
                media.append(f'<a href="{source}"><img src="{source}" alt="{text}"></a>')
        caption = "<br>".join(html.escape(line) for line in _label_lines(entry))
        if entry.get("error"):
            caption += f"<pre>{html.escape(entry['error'])}</pre>"
        cards.append(f"<figure>{''.join(media)}<figcaption>{caption}</figcaption></figure>")
    path = output_dir / "index.html"
    write_whole(path, (
        "<!doctype html>\n<meta charset=\"utf-8\"><title>Batch results</title>\n"
        "<style>body{font-family:sans-serif;display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;width:280px}img,video{max-width:100%}pre{white-space:pre-wrap;color:#a00}</style>\n"
        + "\n".join(cards) + "\n"
    ).encode(errors="replace"))  # a server's error message may carry lone surrogates
    return path
