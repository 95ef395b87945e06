"""Human-judgement datasets in their real on-disk layouts, indexed and validated without decoding.

* NIGHTS (Fu et al., 2023): ``data.csv`` + ``ref/`` + ``distort/``; rows with ``votes >= 6``.
* BAPPS 2AFC (Zhang et al., 2018): ``2afc/{train,val}/<subset>/{ref,p0,p1,judge}``, paired by stem,
  in sorted path order (as the authors' loader lists them).
* THINGS odd-one-out (Hebart et al.): either a file of three image names per line (DreamSim's
  ``things_valset.txt``), or Hebart et al.'s tab-separated triplet file (1-based indices into an
  image list of 1854 paths; the fourth column is the position 1-3 of the odd one out).
* custom: a CSV ``ref,left,right,label`` with paths relative to the CSV.

Every problem (missing layout, missing column, unknown split, mismatched folders, a missing
image) is a :class:`BadInputError` naming the file and line, raised before any model work.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..decision import human_label
from ..errors import BadInputError
from ..io.images import IMAGE_EXTENSIONS

DATASETS = ("nights", "bapps", "things", "custom")
NIGHTS_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
NIGHTS_COLUMNS = ("id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "split",
                  "is_imagenet")
NIGHTS_MIN_VOTES = 6
BAPPS_SPLITS = ("train", "val")
BAPPS_VAL_SUBSETS = ("traditional", "cnn", "superres", "deblur", "color", "frameinterp")
BAPPS_FOLDERS = ("ref", "p0", "p1", "judge")
THINGS_IMAGES = 1854
THINGS_IMAGE_LIST = "image_paths.txt"


@dataclass(frozen=True)
class TwoAFCTriplet:
    """A reference and two candidates; ``p_right`` = fraction of people who chose the right one."""

    id: str
    ref: str
    left: str
    right: str
    p_right: float
    group: str

    @property
    def label(self) -> int:
        """The majority answer: 1 if the right candidate won (p_right > 0.5), else 0 (a 0.5 tie: left)."""
        return human_label(self.p_right)


@dataclass(frozen=True)
class OddOneOut:
    """Three images; people kept ``images[0]`` and ``images[1]`` together (the third is odd)."""

    id: str
    images: tuple[str, str, str]
    group: str


@dataclass
class DatasetIndex:
    """A validated list of items of one task (``2afc`` or ``odd-one-out``)."""

    name: str
    root: str
    task: str
    split: str | None
    items: list = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def distinct_images(self) -> list[str]:
        """Every image once, in order of first use."""
        seen: dict[str, None] = {}
        for item in self.items:
            for path in (item.images if isinstance(item, OddOneOut) else (item.ref, item.left, item.right)):
                seen.setdefault(path)
        return list(seen)


def load_dataset(name: str, root: str | Path, split: str | None = None, subsets: Sequence[str] = (),
                 triplets_file: str | Path | None = None, image_list: str | Path | None = None) -> DatasetIndex:
    """Index and validate a dataset. Raises BadInputError naming what is wrong and where.

    ``triplets_file`` / ``image_list``: THINGS only (defaults ``ROOT/triplets.txt``, ``ROOT/image_paths.txt``).
    """
    key = (name or "").strip().lower()
    if key not in DATASETS:
        raise BadInputError(f"unknown dataset '{name}'; use one of {', '.join(DATASETS)}.")
    root = Path(root)
    if not root.exists():
        raise BadInputError(f"dataset root {root} does not exist.")
    if key == "nights":
        return _nights(root, split or "test")
    if key == "bapps":
        return _bapps(root, split or "val", subsets)
    if key == "things":
        return _things(root, triplets_file, image_list)
    return _custom(root)


def subsample(index: DatasetIndex, n: int | None, seed: int) -> DatasetIndex:
    """A seeded random subset: n items per BAPPS subset, n items in total otherwise (same for every model)."""
    if not n:
        return index
    if n < 0:
        raise BadInputError(f"n must be positive; got {n}.")
    per_group = index.name == "bapps"
    pools = [[i for i, item in enumerate(index.items) if item.group == g] for g in index.groups] if per_group \
        else [list(range(len(index.items)))]
    chosen: list[int] = []
    for pool in pools:
        chosen.extend(pool if n >= len(pool) else random.Random(seed).sample(pool, n))
    return replace(index, items=[index.items[i] for i in sorted(chosen)])


def first_per_group(index: DatasetIndex, n: int) -> frozenset[str]:
    """Ids of the first ``n`` items of each BAPPS subset (of the whole index otherwise), in index order.

    Index order is the dataset's canonical order: sorted path order within a BAPPS subset, the
    row order of data.csv (NIGHTS) or of the CSV (custom), the line order of a THINGS file.
    """
    if n < 1:
        raise BadInputError(f"first must be positive; got {n}.")
    per_group = index.name == "bapps"
    taken: dict[str, int] = {}
    chosen = []
    for item in index.items:
        key = item.group if per_group else ""
        if taken.get(key, 0) < n:
            taken[key] = taken.get(key, 0) + 1
            chosen.append(item.id)
    return frozenset(chosen)


def _require_file(path: Path, where: str) -> str:
    if not path.is_file():
        raise BadInputError(f"{where}: image not found: {path}")
    return str(path)


def _read_csv(path: Path, required: Sequence[str]) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise BadInputError(f"{path}: missing column(s) {', '.join(missing)} "
                                    f"(found: {', '.join(columns) or 'no header'}).")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"{path}: cannot read CSV ({exc}).") from exc


def _number(text: str, where: str, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadInputError(f"{where}: column {column} is not a number: '{text}'.") from None


def _flag(text: str) -> bool:
    return text.strip().lower() in {"true", "1", "yes", "t"}


def _nights(root: Path, split: str) -> DatasetIndex:
    if split not in NIGHTS_SPLITS:
        raise BadInputError(f"unknown NIGHTS split '{split}'; use one of {', '.join(NIGHTS_SPLITS)}.")
    table = root / "data.csv"
    if not table.is_file():
        raise BadInputError(f"{root} is not a NIGHTS root: no data.csv (expected data.csv, ref/, distort/).")
    items = []
    for line, row in enumerate(_read_csv(table, NIGHTS_COLUMNS), start=2):
        where = f"{table}, line {line}"
        if _number(row["votes"], where, "votes") < NIGHTS_MIN_VOTES:
            continue
        row_split = row["split"]
        if split in ("test_imagenet", "test_no_imagenet"):
            if row_split != "test" or _flag(row["is_imagenet"]) != (split == "test_imagenet"):
                continue
        elif row_split != split:
            continue
        p_right = _vote_fraction(row, where)
        items.append(TwoAFCTriplet(row["id"], _require_file(root / row["ref_path"], where),
                                   _require_file(root / row["left_path"], where),
                                   _require_file(root / row["right_path"], where), p_right, split))
    if not items:
        raise BadInputError(f"{table}: no triplets with votes >= {NIGHTS_MIN_VOTES} in split '{split}'.")
    return DatasetIndex("nights", str(root), "2afc", split, items, [split])


def _vote_fraction(row: dict, where: str) -> float:
    """right_vote / (left_vote + right_vote): the same for fractions (summing to 1) and for vote counts."""
    right = _number(row["right_vote"], where, "right_vote")
    left = _number(row["left_vote"], where, "left_vote")
    if left < 0 or right < 0 or left + right <= 0:
        raise BadInputError(f"{where}: left_vote and right_vote must be non-negative and not both 0; "
                            f"got {left:g} and {right:g}.")
    return right / (left + right)


def _images_by_stem(folder: Path, suffixes) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes and p.is_file()}


def _bapps_base(root: Path) -> Path:
    for base in (root / "2afc", root):
        if any((base / s).is_dir() for s in BAPPS_SPLITS):
            return base
    raise BadInputError(f"{root} is not a BAPPS root: expected 2afc/train or 2afc/val "
                        "(or a 2afc folder holding train/ and val/).")


def _bapps(root: Path, split: str, subsets: Sequence[str]) -> DatasetIndex:
    if split not in BAPPS_SPLITS:
        raise BadInputError(f"unknown BAPPS split '{split}'; use train or val.")
    folder = _bapps_base(root) / split
    if not folder.is_dir():
        raise BadInputError(f"{folder} does not exist (BAPPS split '{split}').")
    present = sorted(p.name for p in folder.iterdir() if p.is_dir())
    wanted = list(subsets) or present
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise BadInputError(f"{folder}: no subset(s) {', '.join(unknown)} (found: {', '.join(present)}).")
    items = []
    for subset in wanted:
        sub = folder / subset
        missing = [f for f in BAPPS_FOLDERS if not (sub / f).is_dir()]
        if missing:
            raise BadInputError(f"{sub}: missing folder(s) {', '.join(missing)} (expected ref, p0, p1, judge).")
        maps = {f: _images_by_stem(sub / f, IMAGE_EXTENSIONS) for f in ("ref", "p0", "p1")}
        maps["judge"] = _images_by_stem(sub / "judge", {".npy"})
        stems = set(maps["ref"])
        for name, mapping in maps.items():
            if set(mapping) != stems:
                odd = sorted(stems.symmetric_difference(mapping))[:3]
                raise BadInputError(f"{sub}: folders ref/p0/p1/judge do not match ({len(maps['ref'])} ref, "
                                    f"{len(maps['p0'])} p0, {len(maps['p1'])} p1, {len(maps['judge'])} judge; "
                                    f"e.g. {', '.join(odd)} not in every folder).")
        for stem in sorted(stems, key=lambda s: str(maps["ref"][s])):  # sorted path order, as the authors
            judge = _judge(maps["judge"][stem])
            items.append(TwoAFCTriplet(f"{subset}/{stem}", str(maps["ref"][stem]), str(maps["p0"][stem]),
                                       str(maps["p1"][stem]), judge, subset))
    return DatasetIndex("bapps", str(root), "2afc", split, items, wanted)


def _judge(path: Path) -> float:
    try:
        value = float(np.asarray(np.load(path, allow_pickle=False), dtype=np.float64).mean())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read judgement ({exc}).") from exc
    if not 0.0 <= value <= 1.0:
        raise BadInputError(f"{path}: judgement {value} is not a fraction in [0, 1].")
    return value


def _things(root: Path, triplets_file: str | Path | None, image_list: str | Path | None) -> DatasetIndex:
    table = Path(triplets_file) if triplets_file else root / "triplets.txt"
    if not table.is_file():
        raise BadInputError(f"THINGS triplet file {table} not found.", option_hints={"--triplets": "Pass --triplets FILE."})
    try:
        lines = table.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{table}: cannot read ({exc}).") from exc
    rows = [(no, line) for no, line in enumerate(lines, start=1) if line.strip() and not line.strip().startswith("#")]
    if rows and len(rows[0][1].split("\t")) >= 4:  # Hebart et al.: image1, image2, image3, choice, ...
        items = _things_hebart(root, table, rows, image_list)
    else:
        items = _things_names(root, table, rows)
    if not items:
        raise BadInputError(f"{table}: no triplets.")
    return DatasetIndex("things", str(root), "odd-one-out", None, items, ["things"])


def _things_names(root: Path, table: Path, rows) -> list[OddOneOut]:
    """Three image names (name, stem or path relative to ROOT) per line; the third is the odd one out."""
    lookup: dict[str, Path | None] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        for key in {path.relative_to(root).as_posix(), path.name, path.stem}:
            lookup[key] = None if key in lookup and lookup[key] != path else path
    items = []
    for line_no, line in rows:
        names = [t for t in re.split(r"[,\s]+", line.strip()) if t]
        if len(names) != 3:
            raise BadInputError(f"{table}, line {line_no}: expected 3 image names, got {len(names)}.")
        paths = []
        for name in names:
            if name not in lookup:
                raise BadInputError(f"{table}, line {line_no}: image '{name}' not found under {root}.")
            if lookup[name] is None:
                raise BadInputError(f"{table}, line {line_no}: image name '{name}' is ambiguous under {root}; "
                                    "use its relative path.")
            paths.append(str(lookup[name]))
        items.append(OddOneOut(str(line_no), tuple(paths), "things"))
    return items


def _things_hebart(root: Path, table: Path, rows, image_list: str | Path | None) -> list[OddOneOut]:
    """Tab-separated ``image1 image2 image3 choice ...``: 1-based indices into the image list, and
    ``choice`` = the position (1, 2 or 3) of the odd one out. A non-numeric first line is a header."""
    if not rows[0][1].split("\t")[0].strip().isdigit():
        rows = rows[1:]
    listing, entries = _things_image_list(root, table, image_list)
    found: dict[int, str] = {}
    items = []
    for line_no, line in rows:
        where = f"{table}, line {line_no}"
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 4 or not all(f.isdigit() for f in fields[:4]):
            raise BadInputError(f"{where}: expected tab-separated image1, image2, image3 (1-based indices into "
                                f"{listing.name}) and choice (1-3); got '{line.strip()[:80]}'.")
        *index, choice = (int(f) for f in fields[:4])
        bad = [i for i in index if not 1 <= i <= THINGS_IMAGES]
        if bad:
            raise BadInputError(f"{where}: image index {bad[0]} is outside 1..{THINGS_IMAGES} ({listing}).")
        if not 1 <= choice <= 3:
            raise BadInputError(f"{where}: choice {choice} is not a position 1, 2 or 3 (the odd one out among the "
                                "three images of the row).")
        order = [k for k in range(3) if k != choice - 1] + [choice - 1]  # the kept pair first, the odd one last
        paths = []
        for k in order:
            i = index[k]
            if i not in found:
                found[i] = _require_file(root / entries[i - 1], f"{where} (image {i} = {listing}, line {i})")
            paths.append(found[i])
        items.append(OddOneOut(str(line_no), tuple(paths), "things"))
    return items


def _things_image_list(root: Path, table: Path, image_list: str | Path | None) -> tuple[Path, list[str]]:
    path = Path(image_list) if image_list else root / THINGS_IMAGE_LIST
    if not path.is_file():
        raise BadInputError(f"{table} uses image indices (Hebart et al.'s format), which need the list of the "
                            f"{THINGS_IMAGES} image paths (relative to the dataset root, one per line); {path} not "
                            "found.", option_hints={"--image-list": "Pass it with --image-list FILE."})
    try:
        entries = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read ({exc}).") from exc
    while entries and not entries[-1]:
        entries.pop()
    if "" in entries:
        raise BadInputError(f"{path}, line {entries.index('') + 1}: empty line in the image list.")
    if len(entries) != THINGS_IMAGES:
        raise BadInputError(f"{path}: expected {THINGS_IMAGES} image paths (one per THINGS concept), "
                            f"found {len(entries)}.")
    return path, entries


def _custom(table: Path) -> DatasetIndex:
    if table.is_dir():
        table = table / "triplets.csv"
    if not table.is_file():
        raise BadInputError(f"custom dataset CSV {table} not found (columns ref,left,right,label).")
    base = table.parent
    items = []
    for line, row in enumerate(_read_csv(table, ("ref", "left", "right", "label")), start=2):
        where = f"{table}, line {line}"
        label = row["label"].lower()
        if label in {"left", "right"}:
            p_right = float(label == "right")
        else:
            p_right = _number(label, where, "label")
            if not 0.0 <= p_right <= 1.0:
                raise BadInputError(f"{where}: label must be left, right, 0, 1 or a fraction in [0,1]; got '{label}'.")
        items.append(TwoAFCTriplet(row.get("id") or str(line - 1), _require_file(base / row["ref"], where),
                                   _require_file(base / row["left"], where), _require_file(base / row["right"], where),
                                   p_right, "custom"))
    if not items:
        raise BadInputError(f"{table}: no triplets.")
    return DatasetIndex("custom", str(table), "2afc", None, items, ["custom"])
