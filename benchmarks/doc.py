"""Writing one section of docs/benchmarks.md, shared by the scripts/bench_*.py scripts."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def section_of(doc: str, heading: str) -> tuple[int, int] | None:
    """(start, end) of the section that begins with `heading`, up to the next heading of the same
    or a higher level ('## ' ends a '## ' or a '### ' section; '### ' ends only a '### ')."""
    start = doc.find(heading)
    if start < 0:
        return None
    level = heading.split(" ", 1)[0]
    ends = [doc.find("\n" + "#" * n + " ", start + len(heading)) for n in range(2, len(level) + 1)]
    ends = [e for e in ends if e >= 0]
    return start, (min(ends) + 1 if ends else len(doc))


def write_section(heading: str, text: str, keep: str | None = None, parent: str | None = None,
                  path: Path = DOC) -> None:
    """Replace the section `heading` with `text`. When it is absent, `text` goes at the end of the
    section `parent` (a subsection; the parent heading is added if missing) or of the document.
    When `keep` names a subsection of the old section (hand-written notes, a GPU measurement),
    that subsection stays below `text`."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    text = text.rstrip("\n") + "\n"
    span = section_of(doc, heading)
    if span and keep:
        old = doc[span[0]:span[1]]
        sub = section_of(old, keep)
        if sub:
            text = text + "\n" + old[sub[0]:].rstrip("\n") + "\n"
    if not span and parent:
        if section_of(doc, parent) is None:
            doc = doc.rstrip("\n") + "\n\n" + parent + "\n"
        at = section_of(doc, parent)[1]
        doc = doc[:at].rstrip("\n") + "\n\n" + text + ("\n" + doc[at:] if at < len(doc) else "")
    elif span:
        doc = doc[:span[0]] + text + ("\n" + doc[span[1]:] if span[1] < len(doc) else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc.rstrip("\n") + "\n")
