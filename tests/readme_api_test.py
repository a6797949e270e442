"""The examples of README.md's "Library API" section run as written: each python block in a
fresh namespace, the rule example on a workdir after a tiny meta-training (`L2R_WORKDIR`)."""

import os
import re

import pytest
from rule_setup import meta_workdir

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "## Library API"


def section_blocks() -> list[str]:
    """The ```python blocks between the section's heading and the next `## ` heading."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```$", body, flags=re.M | re.S)


def test_the_section_has_a_probe_and_a_rule_example():
    blocks = section_blocks()
    assert len(blocks) == 2, len(blocks)
    assert "l2r.readout_accuracy(" in blocks[0] and "l2r.layer_cka(" in blocks[0]
    assert "l2r.load_rule(" in blocks[1] and "l2r.as_optax(" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["probes", "rule"])
def test_example_runs(index, tmp_path_factory, monkeypatch, capsys):
    if index == 1:
        saved = meta_workdir(str(tmp_path_factory.getbasetemp() / "meta_workdir"))
        monkeypatch.setenv("L2R_WORKDIR", saved.path)
    code = section_blocks()[index]
    exec(compile(code, f"README.md:{SECTION}[{index}]", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert printed.strip(), "the example prints its results"
    if index == 0:
        readout, cka_rotated, cka_unrelated = printed.splitlines()[:3]
        assert float(readout.split()[-1]) > 0.8 and float(cka_rotated) > 0.999
        assert float(cka_unrelated) < 0.2
    else:
        assert printed.count("loss") == 5
