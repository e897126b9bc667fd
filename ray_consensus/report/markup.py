"""HTML pieces that the report's page (`render.py`) and its figures (`figures.py`) share: escaped
notes, figures, table cells and PNG data URIs. Every string from the data passes `html.escape` here or
in the caller before it reaches the page.
"""

from __future__ import annotations

import base64
import html
import math
from numbers import Integral, Real

import numpy as np

CONSENSUS_ID = "consensus"  # the model_id of the consensus's own row in the models table


def note(text: str, note_id: str) -> str:
    return f'<p class="note" id="{note_id}">{html.escape(text)}</p>\n'


def figure(figure_id: str, content: str, caption: str) -> str:
    """A <figure>; `content` is HTML, `caption` is HTML built from escaped pieces."""
    return (f'<figure id="{figure_id}">\n{content}\n'
            f"<figcaption>{caption}</figcaption>\n</figure>\n")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def format_value(value: object, style: str = "auto") -> str:
    """Format one table cell; returns escaped HTML text. NaN/None render as an en dash."""
    if value is None or (isinstance(value, Real) and math.isnan(value)):
        return "–"
    if style == "p":
        return f"{value:.2g}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        return html.escape(str(value))
    if isinstance(value, Integral) or style == "int":
        return f"{int(value):d}"
    return f"{value:.3f}"
