"""The README's quickstart runs as written."""

import pathlib

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_quickstart_runs():
    blocks = [part.split("```")[0] for part in README.read_text().split("```python")[1:]]
    namespace: dict = {}
    for source in blocks:
        exec(compile(source, "README.md", "exec"), namespace)
    assert namespace["out"].mean.shape == (20, 4, 1) and namespace["out"].covariance.shape == (20, 4, 4)
    assert namespace["k"].nngp.shape == (10, 4)
    assert namespace["d"].ntk.shape == (10,)
    assert namespace["f"].shape == (10, 1)
