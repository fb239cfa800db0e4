"""benchmarks/doc.py: one section of docs/benchmarks.md replaced, the rest and kept notes intact."""

from __future__ import annotations

from benchmarks.doc import section_of, write_section

DOC = """# Benchmarks

## Audit (step 0)

old audit table

### Reading the figures

notes by hand

## Pathways (step 3)

old cpu table

### Real shape on a GPU

H200 figures

## Tokens (step 4)

tokens table
"""


def test_section_bounds_by_level():
    a, b = section_of(DOC, "## Pathways (step 3)")
    assert DOC[a:b].startswith("## Pathways") and DOC[a:b].endswith("H200 figures\n\n")
    a, b = section_of(DOC, "### Real shape on a GPU")
    assert DOC[a:b] == "### Real shape on a GPU\n\nH200 figures\n\n"
    a, b = section_of(DOC, "## Tokens (step 4)")
    assert b == len(DOC)
    assert section_of(DOC, "## Missing") is None


def test_write_replaces_one_section_and_keeps_a_subsection(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(DOC)
    write_section("## Pathways (step 3)", "## Pathways (step 3)\n\nnew cpu table\n", keep="### Real shape on a GPU",
                  path=path)
    assert path.read_text() == DOC.replace("old cpu table", "new cpu table")
    write_section("## Audit (step 0)", "## Audit (step 0)\n\nnew audit\n", keep="### Reading the figures", path=path)
    assert "new audit\n\n### Reading the figures\n\nnotes by hand\n\n## Pathways" in path.read_text()
    write_section("## Tokens (step 4)", "## Tokens (step 4)\n\nnew tokens\n", path=path)
    assert path.read_text().endswith("## Tokens (step 4)\n\nnew tokens\n")
    write_section("## Explorer", "## Explorer\n\npage times\n", path=path)
    text = path.read_text()
    assert text.endswith("new tokens\n\n## Explorer\n\npage times\n") and text.count("## ") == 6


def test_write_without_the_kept_subsection(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(DOC.replace("### Real shape on a GPU\n\nH200 figures\n\n", ""))
    write_section("## Pathways (step 3)", "## Pathways (step 3)\n\nnew\n", keep="### Real shape on a GPU", path=path)
    assert "## Pathways (step 3)\n\nnew\n\n## Tokens" in path.read_text()


def test_write_a_subsection_into_its_parent(tmp_path):
    path = tmp_path / "benchmarks.md"
    no_gpu = DOC.replace("### Real shape on a GPU\n\nH200 figures\n\n", "")
    path.write_text(no_gpu)
    write_section("### Real shape on a GPU", "### Real shape on a GPU\n\nH100 figures\n",
                  parent="## Pathways (step 3)", path=path)
    assert path.read_text() == DOC.replace("H200 figures", "H100 figures")
    write_section("### Real shape on a GPU", "### Real shape on a GPU\n\nH200 figures\n",
                  parent="## Pathways (step 3)", path=path)
    assert path.read_text() == DOC
    path.write_text("# Benchmarks\n")
    write_section("### Sub", "### Sub\n\nx\n", parent="## Parent", path=path)
    assert path.read_text() == "# Benchmarks\n\n## Parent\n\n### Sub\n\nx\n"
