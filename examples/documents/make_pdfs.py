"""Write the example's two PDFs into docs/ (they are shipped; run this to make them again).

A tiny generator on pypdf alone: one Helvetica text block per page, no layout engine, so the
files stay a few KB and pypdf reads their text back exactly.
"""

from __future__ import annotations

from pathlib import Path

from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

DOCS = Path(__file__).resolve().parent / "docs"

PDFS: dict[str, list[list[str]]] = {
    "invoice-acme-2026-031.pdf": [
        [
            "ACME Office Supplies Ltd.",
            "12 Harbour Road, Bristol BS1 4QA, United Kingdom",
            "VAT GB 123 4567 89",
            "",
            "INVOICE  INV-2026-031",
            "Date: 2026-03-14        Due: 2026-04-13",
            "Bill to: Northwind Analytics GmbH, Torstrasse 5, 10119 Berlin",
            "",
            "Description                          Qty   Unit price   Amount",
            "Ergonomic office chair, black          4       189.00   756.00",
            "Standing desk 160x80                   2       420.00   840.00",
            "Monitor arm, dual                      4        65.00   260.00",
        ],
        [
            "INV-2026-031, page 2",
            "",
            "Delivery and assembly                  1       120.00   120.00",
            "",
            "Subtotal                                               1976.00",
            "VAT 20%                                                 395.20",
            "Total due                                        GBP   2371.20",
            "",
            "Payment by bank transfer within 30 days.",
            "IBAN GB29 NWBK 6016 1331 9268 19, reference INV-2026-031.",
        ],
    ],
    "invoice-ledgerly-88213.pdf": [
        [
            "Ledgerly Inc.",
            "500 Market Street, San Francisco, CA 94105",
            "",
            "Invoice number: 88213",
            "Invoice date: 2026-11-02",
            "Customer: Blue Harbour Cafe, account BH-2291",
            "",
            "Ledgerly Team plan, November 2026 (5 seats)      USD 245.00",
            "Extra storage, 50 GB                             USD  10.00",
            "Credit for outage on 2026-10-21                  USD -12.25",
            "",
            "Total                                            USD 242.75",
            "Charged to the card ending 4242 on 2026-11-02. Thank you!",
        ]
    ],
}


def write_pdf(path: Path, pages: list[list[str]]) -> None:
    writer = PdfWriter()
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    for lines in pages:
        page = writer.add_blank_page(595, 842)  # A4 in points
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        text = " T* ".join(f"({_escape(line)}) Tj" for line in lines)
        content = DecodedStreamObject()
        content.set_data(f"BT /F1 10 Tf 56 780 Td 15 TL {text} ET".encode("latin-1"))
        page.replace_contents(content)
    writer.write(path)


def _escape(line: str) -> str:
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    for name, pages in PDFS.items():
        write_pdf(DOCS / name, pages)
        print(f"wrote docs/{name} ({len(pages)} pages)")


if __name__ == "__main__":
    main()
