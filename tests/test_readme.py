"""The README's quickstart runs as written."""

import pathlib

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_quickstart_runs():
    source = README.read_text().split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    assert namespace["k"].nngp.shape == (10, 4)
    assert namespace["d"].ntk.shape == (10,)
    assert namespace["f"].shape == (10, 1)
