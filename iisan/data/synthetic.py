"""Synthetic multimodal recommendation data with a latent structure shared by sequences, titles and
images, in the real files' formats (users TSV, items TSV, ``<item_id>.jpg``).

Items belong to topics. A title names its topic's words and the item's own word; an image is drawn in
its topic's colours with the item's own shape and position. Users walk inside a topic, mostly to the
next item of a topic-specific chain, sometimes to a popular item of the topic, rarely to another topic.
So content predicts the next item, and a most-popular baseline is beatable but not useless.

``length_profile`` also produces benchmark-shaped data (e.g. Scientific's user count, item count and
sequence-length histogram) with no text or image signal needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_path, write_text_atomic
from .image_build import write_image_lmdb

# Scientific after the protocol: users with 5, 6, ..., 13 kept interactions (counts sum to 12,076).
SCIENTIFIC_LENGTHS = {5: 4892, 6: 2652, 7: 1465, 8: 895, 9: 609, 10: 356, 11: 300, 12: 208, 13: 699}

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "xe", "zu", "po", "da", "fe", "gi", "hu", "je"]
SHAPES = ("circle", "square", "triangle", "bar")


def _word(rng: np.random.Generator, syllables: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES, syllables))


def generate(out_dir: str | Path, num_users: int = 1200, num_items: int = 400, num_topics: int = 20,
             seed: int = 0, images: str | None = "jpg", image_size: int = 224, min_len: int = 5, max_len: int = 16,
             length_profile: dict[int, int] | None = None) -> dict[str, Path]:
    """Write ``users.tsv``, ``items.tsv`` and images; return their paths.

    ``images``: 'jpg' (a folder of ``<item_id>.jpg``, as the real data comes), 'lmdb' (straight into
    ``images.lmdb``, no noise and no JPEG round trip: fast, for benchmarks) or None.
    ``length_profile`` (length -> users) fixes the sequence lengths and the user count instead of
    drawing them."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topic = np.sort(rng.integers(0, num_topics, num_items))
    topic_words = [(_word(rng), _word(rng, 2)) for _ in range(num_topics)]
    palette = rng.integers(30, 226, size=(num_topics, 2, 3))
    item_ids = [f"I{n:07d}" for n in range(num_items)]
    members = [np.flatnonzero(topic == t) for t in range(num_topics)]
    members = [m if len(m) else np.array([rng.integers(num_items)]) for m in members]
    chain = {int(i): int(m[(k + 1) % len(m)]) for m in members for k, i in enumerate(rng.permutation(m))}
    popularity = rng.zipf(1.6, num_items).clip(1, 50).astype(float)

    lines = []
    for n, item_id in enumerate(item_ids):
        t = topic[n]
        filler = " ".join(_word(rng, 2) for _ in range(rng.integers(1, 4)))
        lines.append(f"{item_id}\t{topic_words[t][0].title()} {topic_words[t][1]} {_word(rng)} {filler} "
                     f"No.{n % 97}")
    write_text_atomic(out / "items.tsv", "\n".join(lines) + "\n")

    if length_profile:
        lengths = np.repeat(list(length_profile), list(length_profile.values()))
        rng.shuffle(lengths)
    else:
        lengths = np.minimum(min_len + rng.geometric(0.25, num_users) - 1, max_len)
    users = []
    for u, length in enumerate(lengths):
        t = rng.integers(num_topics)
        weights = popularity[members[t]] / popularity[members[t]].sum()
        item = int(rng.choice(members[t], p=weights))
        seq = [item]
        for _ in range(length - 1):
            r = rng.random()
            if r < 0.08:  # another topic
                t = rng.integers(num_topics)
                weights = popularity[members[t]] / popularity[members[t]].sum()
                item = int(rng.choice(members[t], p=weights))
            elif r < 0.65:  # the next item of the topic's chain
                item = chain[item]
            else:  # a popular item of the topic
                item = int(rng.choice(members[topic[item]], p=weights if topic[item] == t else None))
            seq.append(item)
        users.append(f"U{u:07d}\t" + " ".join(item_ids[i] for i in seq))
    write_text_atomic(out / "users.tsv", "\n".join(users) + "\n")

    paths = {"users": out / "users.tsv", "items": out / "items.tsv"}
    if images == "jpg":
        image_dir = out / "images"
        image_dir.mkdir(exist_ok=True)
        for n, item_id in enumerate(item_ids):
            with atomic_path(image_dir / f"{item_id}.jpg", bulk=True) as tmp:
                draw_item(palette[topic[n]], n, image_size, rng).save(tmp, format="JPEG", quality=90)
        paths["images"] = image_dir
    elif images == "lmdb":
        row = {item_id: n for n, item_id in enumerate(item_ids)}

        def pixels_of(item_id):
            n = row[item_id]
            return np.asarray(draw_item(palette[topic[n]], n, image_size, None), dtype=np.uint8), None

        write_image_lmdb(out / "images.lmdb", item_ids, pixels_of, image_size, progress=False, source="synthetic",
                         overwrite=True)  # this folder's own store, regenerated
        paths["lmdb"] = out / "images.lmdb"
    return paths


def draw_item(colours: np.ndarray, n: int, size: int, rng: np.random.Generator | None) -> Image.Image:
    """Topic colours as background and shape; the item's own shape, size and position."""
    background, foreground = (tuple(int(c) for c in colours[0]), tuple(int(c) for c in colours[1]))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    shape = SHAPES[n % len(SHAPES)]
    r = size * (0.15 + 0.25 * ((n * 7919) % 100) / 100)
    cx = size * (0.3 + 0.4 * ((n * 104729) % 97) / 97)
    cy = size * (0.3 + 0.4 * ((n * 1299709) % 89) / 89)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=foreground)
    elif shape == "square":
        draw.rectangle(box, fill=foreground)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=foreground)
    else:
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=foreground)
    if rng is None:
        return img
    noise = rng.integers(-12, 13, size=(size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)
