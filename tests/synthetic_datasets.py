"""Small synthetic datasets in the real on-disk layouts (NIGHTS, BAPPS, THINGS in both formats, custom)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from conftest import make_picture

NIGHTS_HEADER = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split",
                 "is_imagenet", "prompt"]


def make_nights(root: Path, rows: list[dict] | None = None, n: int = 12, size=(48, 48)) -> Path:
    """NIGHTS: ref/XXX/YYY.png, distort/XXX/YYY_{0,1}.png and data.csv (extra column 'prompt').

    A row may give ``left_vote`` too (vote counts); by default it is ``1 - right_vote``.
    """
    root.mkdir(parents=True, exist_ok=True)
    if rows is None:
        splits = ["train", "val", "test", "test"]
        rows = [{"id": i, "right_vote": i % 2, "votes": 6 + (i % 3), "split": splits[i % 4],
                 "is_imagenet": i % 3 == 0} for i in range(n)]
    with open(root / "data.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=NIGHTS_HEADER)
        writer.writeheader()
        for row in rows:
            i = int(row["id"])
            folder = f"{i // 10:03d}"
            ref, left, right = (f"ref/{folder}/{i:03d}.png", f"distort/{folder}/{i:03d}_0.png",
                                f"distort/{folder}/{i:03d}_1.png")
            for k, rel in enumerate((ref, left, right)):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                make_picture(1000 + 3 * i + k, size).save(root / rel)
            right_vote = row.get("right_vote", 1)
            writer.writerow({"id": i, "left_vote": row.get("left_vote", 1 - right_vote), "right_vote": right_vote,
                             "votes": row.get("votes", 6), "ref_path": ref, "left_path": left, "right_path": right,
                             "split": row.get("split", "test"), "is_imagenet": row.get("is_imagenet", False),
                             "prompt": "An image of a thing"})
    return root


def make_bapps(root: Path, subsets=("traditional", "cnn"), n: int = 4, split: str = "val", stems=None) -> Path:
    """BAPPS: 2afc/<split>/<subset>/{ref,p0,p1}/NNNNNN.png and judge/NNNNNN.npy (fraction choosing p1).

    ``stems``: file names (without .png) instead of NNNNNN; the judgement of the i-th is (i % 5) / 4.
    """
    for s_i, subset in enumerate(subsets):
        base = root / "2afc" / split / subset
        for folder in ("ref", "p0", "p1", "judge"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        for i, stem in enumerate(stems if stems is not None else [f"{k:06d}" for k in range(n)]):
            for k, folder in enumerate(("ref", "p0", "p1")):
                make_picture(5000 + 100 * s_i + 3 * i + k, (64, 64)).save(base / folder / f"{stem}.png")
            np.save(base / "judge" / f"{stem}.npy", np.array([(i % 5) / 4], dtype=np.float32))
    return root


def make_bapps_triplets(root: Path, subset: str, rows, split: str = "val") -> Path:
    """BAPPS triplets by hand: rows of (stem, ref seed, p0 seed, p1 seed, judgement); equal seeds = equal images."""
    base = root / "2afc" / split / subset
    for folder in ("ref", "p0", "p1", "judge"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for stem, *seeds, judge in rows:
        for folder, seed in zip(("ref", "p0", "p1"), seeds):
            make_picture(seed, (64, 64)).save(base / folder / f"{stem}.png")
        np.save(base / "judge" / f"{stem}.npy", np.array([judge], dtype=np.float32))
    return root


def make_things_hebart(root: Path, rows, header: str | None = "image1\timage2\timage3\tchoice\tRT",
                       list_name: str = "image_paths.txt") -> Path:
    """THINGS in Hebart et al.'s format: a tab-separated triplet file of 1-based indices into an image list of
    1854 paths (relative to ROOT), ``choice`` = position 1-3 of the odd one out. Only images the rows use exist."""
    entries = [f"images/concept{k:04d}/img{k:04d}.jpg" for k in range(1, 1855)]
    for k in sorted({k for row in rows for k in row[:3]}):
        (root / entries[k - 1]).parent.mkdir(parents=True, exist_ok=True)
        make_picture(7000 + k, (40, 40)).save(root / entries[k - 1])
    (root / list_name).write_text("\n".join(entries) + "\n")
    lines = ([header] if header else []) + ["\t".join(str(v) for v in row) for row in rows]
    (root / "triplets.txt").write_text("\n".join(lines) + "\n")
    return root


def make_things(root: Path, n_images: int = 6, triplets=((0, 1, 2), (3, 4, 5), (0, 3, 5))) -> Path:
    """THINGS: images in concept folders plus triplets.txt of image names (third = odd one out)."""
    for i in range(n_images):
        folder = root / "images" / f"concept{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        make_picture(7000 + i, (40, 40)).save(folder / f"img{i:02d}.jpg")
    (root / "triplets.txt").write_text("\n".join(" ".join(f"img{j:02d}.jpg" for j in t) for t in triplets) + "\n")
    return root


def make_custom(root: Path, labels=("left", "right", "0", "1", "0.25")) -> Path:
    """custom: triplets.csv with ref,left,right,label (paths relative to the CSV)."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(labels):
        names = [f"imgs/{i}_{k}.png" for k in ("r", "a", "b")]
        for k, name in enumerate(names):
            make_picture(9000 + 3 * i + k, (32, 32)).save(root / name)
        rows.append({"ref": names[0], "left": names[1], "right": names[2], "label": label})
    with open(root / "triplets.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["label", "right", "ref", "left"])  # any column order
        writer.writeheader()
        writer.writerows(rows)
    return root / "triplets.csv"


def make_revisited(root: Path, scenes: int = 3, size=(160, 120), junk: bool = True) -> Path:
    """Revisited Oxford layout (jpg/ + gnd_roxford5k.pkl), known answers by construction.

    Per scene: two near-identical database copies (easy), a mirrored copy (junk, with ``junk``), an
    unrelated picture (hard: it ranks wherever the model puts it), and a query: the scene pasted at
    (30, 25) into a noisy canvas 60 px larger each way, its box around the scene.
    """
    import pickle

    from PIL import Image

    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    width, height = size
    imlist, gnd = [], []
    for s in range(scenes):
        scene = make_picture(10 + s, size)
        idx = len(imlist)
        names = [f"s{s}_a", f"s{s}_b"] + ([f"s{s}_m"] if junk else []) + [f"s{s}_u"]
        scene.save(root / "jpg" / f"{names[0]}.jpg", quality=95)
        brighter = Image.fromarray(np.clip(np.asarray(scene).astype(int) + 3, 0, 255).astype(np.uint8))
        brighter.save(root / "jpg" / f"{names[1]}.jpg", quality=90)
        if junk:
            scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "jpg" / f"{names[2]}.jpg", quality=95)
        make_picture(100 + s, size).save(root / "jpg" / f"{names[-1]}.jpg", quality=95)
        imlist += names
        canvas = Image.fromarray(rng.integers(0, 256, (height + 60, width + 60, 3), dtype=np.uint8))
        canvas.paste(scene, (30, 25))
        canvas.save(root / "jpg" / f"query{s}.jpg", quality=95)
        gnd.append({"bbx": [30.0, 25.0, 30.0 + width, 25.0 + height], "easy": [idx, idx + 1],
                    "hard": [idx + len(names) - 1], "junk": [idx + 2] if junk else []})
    data = {"imlist": imlist, "qimlist": [f"query{s}" for s in range(scenes)], "gnd": gnd}
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(data))
    return root
