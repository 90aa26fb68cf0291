"""The README's Python examples run as written, and its command synopsis is the parser's."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("torch.Size([2, 32, 256])")
    assert out[-1].endswith("False")
    assert (tmp_path / "runs" / "api-demo" / "summary.json").is_file()


def test_the_readme_synopsis_is_the_generated_one():
    """Issue 27: the README's command synopsis is what the parser writes (a flag added, renamed or dropped in the
    CLI changes it: regenerate it with spannorm.cli.synopsis)."""
    from spannorm.cli import synopsis

    block = README.read_text().split("## Command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.strip() == synopsis(), "README.md's command synopsis is stale: regenerate it (spannorm.cli.synopsis)"
    assert synopsis().count("\n") + 1 == 12 and "spannorm config show " in synopsis()
