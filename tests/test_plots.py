"""refsnn plot and refsnn.plots: learning curves from run folders' metrics.jsonl."""

import json

import pytest
from click.testing import CliRunner

from refsnn.cli import main
from refsnn.errors import DataError
from refsnn.plots import read_history, run_curves


def _run_folder(path, accs):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as fh:
        for e, (tr, te) in enumerate(accs, 1):
            fh.write(json.dumps({"epoch": e, "train_acc": tr, "test_acc": te}) + "\n")
    return path


def test_curves_are_the_folders_accuracies_in_percent(tmp_path):
    a = _run_folder(tmp_path / "a", [(0.5, 0.4), (0.75, 0.6)])
    b = _run_folder(tmp_path / "b", [(0.25, 0.125)])
    curves = run_curves([a, b])
    assert [c.label for c in curves] == ["a test", "a train", "b test", "b train"]
    assert curves[0].y == [40.0, 60.0] and curves[1].y == [50.0, 75.0]
    assert curves[1].dashed and curves[1].color_of == 0
    assert [c.label for c in run_curves([a, b], train=False)] == ["a test", "b test"]


def test_plot_command_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = _run_folder(tmp_path / "a", [(0.5, 0.4), (0.75, 0.6), (0.8, 0.7)])
    out = tmp_path / "c.png"
    res = CliRunner().invoke(main, ["plot", str(a), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))                 # written atomically, no leftovers


@pytest.mark.parametrize("content, says", [
    (None, "no metrics.jsonl"),
    ("", "no epoch yet"),
    ('{"epoch": 1, "test_acc": 0.5}\n{"epoch": 2, "te', "line 2: not JSON"),
])
def test_bad_run_folders_get_a_one_line_error(tmp_path, content, says):
    d = tmp_path / "run"
    d.mkdir()
    if content is not None:
        (d / "metrics.jsonl").write_text(content)
    with pytest.raises(DataError, match=says):
        read_history(d)
    res = CliRunner().invoke(main, ["plot", str(d), "-o", str(tmp_path / "c.png")])
    assert res.exit_code != 0 and says in res.output and "Traceback" not in res.output
    assert not (tmp_path / "c.png").exists()
