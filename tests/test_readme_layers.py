"""The README's "Layers" section: every python block in it runs as written (on CPU)."""

import pathlib
import re
import warnings

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def layers_blocks() -> list[str]:
    text = README.read_text()
    section = re.search(r"^## Layers\n(.*?)^## ", text, flags=re.S | re.M)
    assert section, "README.md has no '## Layers' section followed by another '## ' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.S | re.M)


@pytest.mark.no_emulation("the FixedPointRNN example's arguments run the fixed_point_rnn_variants kernels, which "
                           "warn once that they have not run on a GPU (a snippet that warns fails here)")
def test_readme_layers_snippets_run(capsys):
    blocks = layers_blocks()
    assert blocks, "no python block in the README's Layers section"
    torch.manual_seed(0)
    for code in blocks:
        scope = {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a snippet that warns (e.g. does not converge) is a broken example
            exec(compile(code, str(README), "exec"), scope)
    # the FixedPointRNN example: the strict layer raised (and printed) its non-convergence, streaming matched
    assert "did not converge within max_iter=2" in capsys.readouterr().out
    torch.testing.assert_close(torch.cat([scope["y1"], scope["y2"]], 1), scope["out"], rtol=1e-4, atol=1e-4)
    assert scope["y_next"].shape == (2, 256)
