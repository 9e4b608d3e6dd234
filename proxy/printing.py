"""Printable PDF bundles (a subject access package, a disclosure) with fpdf2: a cover sheet, what is included
and what was left out and why, every record as its fields, then any tables (the access history).

Text is set in DejaVu Sans when the machine has it (Debian's fonts-dejavu-core, which `make test` installs),
so every name prints as written; without it, in the PDF core font, where a character outside Latin-1 prints
as "?" and the cover says so (the JSON beside the PDF is always exact).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fpdf import FPDF
from fpdf.enums import XPos, YPos

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))
LOSSY = "This machine has no Unicode font: characters outside Latin-1 print as ?; the JSON file is exact."


@dataclass(slots=True)
class Bundle:
    """What a printable bundle holds, in the order it is printed."""

    title: str
    cover: list[tuple[str, str]]
    included: list[str]
    withheld: list[str]
    records: dict[str, list[list[tuple[str, str]]]] = field(default_factory=dict)  # heading -> records' fields
    tables: list[tuple[str, Sequence[str], list[Sequence[str]]]] = field(default_factory=list)  # (heading, cols, rows)
    warnings: list[str] = field(default_factory=list)


def _font(pdf: FPDF) -> bool:
    """DejaVu Sans if installed (True), else the core Helvetica (False)."""
    for folder in FONT_DIRS:
        regular, bold = folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"
        if regular.exists() and bold.exists():
            pdf.add_font("DejaVu", "", str(regular))
            pdf.add_font("DejaVu", "B", str(bold))
            return True
    return False


def render_pdf(b: Bundle) -> bytes:
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    unicode = _font(pdf)
    family = "DejaVu" if unicode else "Helvetica"

    def clean(text: object) -> str:
        value = "".join(c if c.isprintable() or c == "\n" else " " for c in str(text))
        return value if unicode else value.encode("latin-1", "replace").decode("latin-1")

    def line(text: str, size: float = 10, bold: bool = False) -> None:
        pdf.set_font(family, "B" if bold else "", size)
        pdf.multi_cell(0, size * 0.5, clean(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def pairs(rows: Iterable[tuple[str, str]]) -> None:
        with pdf.table(col_widths=(35, 65), text_align="LEFT", first_row_as_headings=False) as table:
            for k, v in rows:
                row = table.row()
                row.cell(clean(k))
                row.cell(clean(v) or "-")

    pdf.add_page()
    line(b.title, 16, bold=True)
    pdf.ln(3)
    pdf.set_font(family, "", 10)
    pairs(b.cover)
    for heading, items in (("Included", b.included), ("Not included, and why", b.withheld)):
        pdf.ln(3)
        line(heading, 12, bold=True)
        for item in items or ["nothing"]:
            line(f"- {item}")
    for warning in [*b.warnings, *([] if unicode else [LOSSY])]:
        pdf.ln(2)
        line(f"Warning: {warning}", bold=True)
    for heading, records in b.records.items():
        pdf.add_page()
        line(heading, 13, bold=True)
        for fields in records:
            pdf.ln(2)
            pdf.set_font(family, "", 9)
            pairs(fields)
    for heading, columns, rows in b.tables:
        pdf.add_page()
        line(heading, 13, bold=True)
        pdf.ln(2)
        pdf.set_font(family, "", 8)
        with pdf.table(text_align="LEFT") as table:
            head = table.row()
            for c in columns:
                head.cell(clean(c))
            for values in rows or [["(none)", *([""] * (len(columns) - 1))]]:
                row = table.row()
                for v in values:
                    row.cell(clean(v) or "-")
    return bytes(pdf.output())
