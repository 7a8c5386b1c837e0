"""The one Markdown table builder."""

from odconv_deploy.tables import markdown_table


def test_rows_are_padded_and_cells_escaped():
    lines = markdown_table(["a", "b", "c"], [(1, "x|y"), ("line\nbreak", 2.5, None)])
    assert lines == ["| a | b | c |", "|---|---|---|", "| 1 | x\\|y |  |",
                     "| line break | 2.5 | None |"]


def test_no_rows_gives_the_header():
    assert markdown_table(["only"], []) == ["| only |", "|---|"]
