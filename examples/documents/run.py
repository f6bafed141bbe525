"""Document processing: a folder of PDF and HTML files -> text chunks -> invoice fields.

    python run.py            # offline: the job runs against overnight's fake OpenAI API
    python run.py --real     # the same job on OpenAI itself (OPENAI_API_KEY)

1. Every file of docs/ is read (PDF pages with pypdf, HTML with the standard library's
   html.parser, scripts and styles left out) and cut into chunks of about CHUNK_CHARS
   characters on paragraph boundaries: out/chunks.jsonl, one record per chunk with its
   chunk_id, doc_id, page and chunk number.
2. extract.toml runs over the chunks: one JSON object per chunk, valid against
   invoice.schema.json (out/fields.jsonl). Rerunning computes only new or changed chunks.
3. The chunks' fields are merged per document (out/documents.jsonl): the first value found
   for each field, in page and chunk order, and every chunk's line items.

Offline, the fake's answers are valid against the schema but made up (picked by hash of the
prompt): the pipeline is real, the field values are not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

from pypdf import PdfReader

import overnight

HERE = Path(__file__).resolve().parent
CHUNK_CHARS = 400
SCALARS = ["vendor", "invoice_number", "invoice_date", "currency", "total"]


# -- 1. documents -> chunks ------------------------------------------------------------------


class _Text(HTMLParser):
    """The visible text of an HTML page, a line break at each block element."""

    BLOCKS = {"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "table", "ul", "ol"}
    BLOCKS |= {"header", "footer", "main", "section", "article", "nav", "title"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def pages_of(path: Path) -> list[str]:
    """The text of each page: a PDF's pages, an HTML file as one page."""
    if path.suffix.lower() == ".pdf":
        return [page.extract_text() or "" for page in PdfReader(path).pages]
    return [html_text(path)]


def chunk(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Paragraphs (blank-line separated; lines if a paragraph is too long) packed into chunks
    of at most `size` characters; a single longer line is a chunk of its own."""
    pieces: list[str] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if para:
            pieces.extend([para] if len(para) <= size else para.splitlines())
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= size:
            chunks[-1] += "\n" + piece
        else:
            chunks.append(piece)
    return chunks


def write_chunks(docs: Path, path: Path) -> int:
    path.parent.mkdir(exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as out:
        for doc in sorted(docs.iterdir()):
            if doc.suffix.lower() not in (".pdf", ".html", ".htm"):
                continue
            for page_no, text in enumerate(pages_of(doc), start=1):
                for chunk_no, piece in enumerate(chunk(text), start=1):
                    record = {
                        "chunk_id": f"{doc.stem}#p{page_no}#c{chunk_no}",
                        "doc_id": doc.stem,
                        "file": doc.name,
                        "page": page_no,
                        "chunk": chunk_no,
                        "text": piece,
                    }
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    n += 1
    return n


# -- 3. one result per chunk -> one per document ------------------------------------------


def merge(fields: Path, path: Path) -> list[dict]:
    rows = [json.loads(line) for line in fields.read_text(encoding="utf-8").splitlines()]
    rows.sort(key=lambda r: (r["doc_id"], r["page"], r["chunk"]))
    docs: dict[str, dict] = {}
    for row in rows:
        found = row["output"]
        doc = docs.setdefault(
            row["doc_id"],
            {"doc_id": row["doc_id"], "chunks": 0, "is_invoice": False, "line_items": []}
            | dict.fromkeys(SCALARS),
        )
        doc["chunks"] += 1
        doc["is_invoice"] = doc["is_invoice"] or bool(found.get("is_invoice"))
        for key in SCALARS:
            if doc[key] is None and found.get(key) is not None:
                doc[key] = found[key]
        doc["line_items"].extend(found.get("line_items") or [])
    merged = list(docs.values())
    with path.open("w", encoding="utf-8") as out:
        for doc in merged:
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return merged


# -- the run ---------------------------------------------------------------------------------


def run_job(job_file: Path, real: bool) -> overnight.Report:
    """The job as its file says (real), or pointed at the fake provider (offline).

    Offline runs keep a ledger (and response cache) of their own, .overnight/offline/: the
    ledger does not tell one base_url from another, so a --real run after an offline one
    would otherwise keep the fake's answers.
    """
    if real:
        return overnight.Job.from_file(job_file).run()
    job = overnight.Job.from_file(job_file, state=HERE / ".overnight" / "offline" / "ledger.db")
    from overnight.testing.fake_provider import FakeProvider

    os.environ.setdefault("OPENAI_API_KEY", "sk-fake")  # the fake takes any key
    with FakeProvider() as fake:
        model = job.spec.model.model_copy(update={"base_url": fake.openai_url})
        job.spec = job.spec.model_copy(update={"model": model})
        return job.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="call OpenAI, not the fake")
    args = parser.parse_args()
    os.chdir(HERE)
    n = write_chunks(HERE / "docs", HERE / "out" / "chunks.jsonl")
    print(f"chunked docs/ into {n} chunks: out/chunks.jsonl")
    report = run_job(HERE / "extract.toml", args.real)
    print(
        f"extracted {report.counts['succeeded']} of {report.counts.total} chunks "
        f"({report.processed} computed in this run): out/fields.jsonl"
    )
    if report.exit_code != 0:
        print(f"the job ended with exit code {report.exit_code}: `overnight failures extract.toml`")
        sys.exit(report.exit_code)
    merged = merge(HERE / "out" / "fields.jsonl", HERE / "out" / "documents.jsonl")
    print(f"merged into {len(merged)} documents: out/documents.jsonl")
    for doc in merged:
        print(
            f"  {doc['doc_id']:<28} {doc['chunks']} chunks  invoice={doc['is_invoice']!s:<5} "
            f"total={doc['total']} {doc['currency']}  {len(doc['line_items'])} line items"
        )


if __name__ == "__main__":
    try:
        main()
    except overnight.UsageError as exc:  # a missing key, a wrong job file: exit 2, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
