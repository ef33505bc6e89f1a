import pathlib
import re


def test_readme_example_runs_and_learns(capsys):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "13.19" not in out and "Model size" in out  # the summary printed
    acc = float(out.strip().splitlines()[-1].split()[-1])
    assert acc > 0.9
