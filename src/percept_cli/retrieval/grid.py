"""Contact sheets of retrievals: each query with its nearest pool items (and, under attack, the
attacked query with its new neighbours under it, as the paper's Figure 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from ..inversion import contact_sheet


@dataclass
class SheetRow:
    """One row: the query image and its caption, then the neighbours and theirs ((3,S,S) [0,1] tensors)."""

    query: torch.Tensor
    caption: str
    neighbours: Sequence[torch.Tensor]
    captions: Sequence[str]


def neighbour_sheet(rows: Sequence[SheetRow], tile: int = 160) -> Image.Image:
    """Rows stacked top to bottom, each as :func:`percept_cli.inversion.contact_sheet` draws it."""
    images = [contact_sheet(torch.stack(list(row.neighbours)) if len(row.neighbours) else torch.zeros(0, 3, 8, 8),
                            list(row.captions), target=row.query, target_label=row.caption, tile=tile)
              for row in rows]
    width = max(im.width for im in images)
    sheet = Image.new("RGB", (width, sum(im.height for im in images)), (255, 255, 255))
    y = 0
    for im in images:
        sheet.paste(im, (0, y))
        y += im.height
    return sheet
