"""README.md: every python code block runs, top to bottom in one namespace, and does what the text says."""
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")


def code_blocks(text: str, language: str = "python") -> list[str]:
    """The fenced code blocks of one language in a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    # the project speaks of itself, not of how it was built
    assert not re.search(r"\b(session|issue)s?\b", text, re.I)


def test_readme_headline_table_is_rendered_from_results(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import results_table
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    copy = tmp_path / "README.md"
    copy.write_text(README.read_text())
    assert not results_table.update_readme(copy), (
        "README's headline table differs from results/: run python experiments/results_table.py --update-readme")


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist (real data)")
def test_readme_code_runs(capsys, tmp_path, monkeypatch):
    blocks = code_blocks(README.read_text())
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)  # the examples write files into the working directory
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md, python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Model size" in out and "Ratio of MACs that are binarized" in out  # the summary printed
    accuracy = float(re.search(r"^test accuracy (\S+)$", out, re.M).group(1))
    assert accuracy > 0.7  # one epoch on 10,000 images
    assert "same predictions: True" in out
    assert namespace["logits"].shape == (1000, 10)
    assert (tmp_path / "bnn.stablehlo").stat().st_size == namespace["size"]
    assert "QuantDense_0" in namespace["packed_variables"]["params"]
