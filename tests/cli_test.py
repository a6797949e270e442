"""Every bad command line of `bad_inputs.CASES` stops before any work: exit status 2, one line
on stderr naming the problem, no traceback, no workdir made, a finished workdir untouched."""

import os

import bad_inputs
import pytest


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A finished workdir (and a snapshot of its bytes and times) and a plain file."""
    root = tmp_path_factory.mktemp("cli")
    finished, file = root / "finished", root / "a_file"
    bad_inputs.make_finished(str(finished))
    file.write_text("not a folder")
    return str(finished), str(file)


def snapshot(folder: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[path] = (f.read(), os.stat(path).st_mtime_ns)
    return out


@pytest.mark.parametrize(
    "name, args, words", bad_inputs.CASES, ids=[c[0] for c in bad_inputs.CASES]
)
def test_bad_input_stops_at_once_with_one_line(name, args, words, places, tmp_path):
    finished, file = places
    before = snapshot(finished)
    rc, err, _ = bad_inputs.run_case(args, str(tmp_path), finished, file)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert words.format(workdir=tmp_path) in lines[0], err
    assert not (tmp_path / "run").exists()  # No stage started: not even the workdir exists.
    assert snapshot(finished) == before
