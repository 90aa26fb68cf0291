import re

from conftest import check_page

from spannorm.cli import main


def test_compare_trains_reports_and_reuses(capsys, tmp_path, corpus):
    out = tmp_path / "cmp"
    argv = ["compare", "--config", "tiny", "--corpus", str(corpus), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^\| (pre|post|span) \| ([0-9.]+) \| (yes|no) \| ([0-9,]+) \|", printed, re.M)
    assert [r[0] for r in rows] == ["pre", "post", "span"]
    assert all(r[2] == "no" and 2.0 < float(r[1]) < 5.0 for r in rows)
    report = (out / "report.md").read_text()
    assert all(f"| {r[0]} | {r[1]} | {r[2]} |" in report for r in rows)
    assert "spannorm compare --config tiny" in report and "![loss curves](loss_curves.png)" in report
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the finished cells and prints the same table
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("reused finished run") == 3
    assert re.findall(r"^\| (?:pre|post|span) \| [0-9.]+ \|", again, re.M) == re.findall(
        r"^\| (?:pre|post|span) \| [0-9.]+ \|", printed, re.M
    )
    check_page(out / "report.html", "compare_report_html.png")  # (issue 32: compare's page too; last: it may skip)


def test_compare_refuses_a_directory_of_another_config(capsys, tmp_path, corpus):
    out = tmp_path / "cmp"
    base = ["compare", "--config", "tiny", "--corpus", str(corpus), "--out", str(out), "--quiet", "--schemes", "span"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--set", "train.lr=1e-3"]) == 2
    assert "holds a 'span' run with another config" in capsys.readouterr().err
