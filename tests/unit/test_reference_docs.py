"""The generated tables in docs/ match the code they are generated from (make docs)."""

from __future__ import annotations

import pytest

from medserve import reference_docs
from medserve.reference_docs import BEGIN, END, render_page, stale_pages


def test_generated_pages_match_the_code(repo_root):
    stale = stale_pages(repo_root)
    assert stale == [], f"{', '.join(stale)} out of date with the code: run make docs"


def test_generated_blocks_are_marked(repo_root):
    assert "do not edit" in BEGIN
    for relative in reference_docs.PAGES:
        text = (repo_root / relative).read_text()
        assert text.count(BEGIN) == 1 and text.count(END) == 1, relative
        assert text.startswith("Documents "), relative


def test_render_page_replaces_only_the_generated_block():
    page = f"Documents x.\n\nprose before\n\n{BEGIN}\nold table\n{END}\n\nprose after\n"
    rendered = render_page(page, "| new |")
    assert rendered == f"Documents x.\n\nprose before\n\n{BEGIN}\n| new |\n{END}\n\nprose after\n"
    assert render_page(rendered, "| new |") == rendered


@pytest.mark.parametrize("page", ["no markers", f"{BEGIN}\n{BEGIN}\n{END}\n", f"{END}\n{BEGIN}\n"])
def test_render_page_refuses_a_page_without_one_block(page):
    with pytest.raises(ValueError, match="generated block"):
        render_page(page, "| t |")


def test_tables_escape_pipes_inside_cells():
    # A Literal type and a union render with "|" between alternatives: escaped, or the row splits.
    for row in reference_docs.settings_table().splitlines()[2:]:
        assert row.replace("\\|", "").count("|") == 5, row


def test_check_mode_reports_drift(tmp_path, capsys):
    for relative in reference_docs.PAGES:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(f"Documents x.\n\n{BEGIN}\nstale\n{END}\n")
    assert reference_docs.main(["--root", str(tmp_path), "--check"]) == 1
    assert "run make docs" in capsys.readouterr().err
    assert reference_docs.main(["--root", str(tmp_path)]) == 0
    assert reference_docs.main(["--root", str(tmp_path), "--check"]) == 0
