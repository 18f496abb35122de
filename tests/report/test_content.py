"""What the report says: every section of a real run, several runs compared, hostile text
escaped, bad runs refused in one line, and the index page."""

import json
import os
import re
from html.parser import HTMLParser

import pytest

from stoker.cli import main
from stoker.report import load_run, write_index, write_report


class _Elements(HTMLParser):
    """Every start tag with its attributes, and all text."""

    def __init__(self):
        super().__init__()
        self.tags = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html):
    parser = _Elements()
    parser.feed(html)
    return parser


def test_every_section_of_a_real_resumed_run(real_runs):
    a, _ = real_runs
    path = write_report([a])
    assert path == a / "report.html"
    html = path.read_text()
    page = _parse(html)
    ids = {attrs.get("id") for _, attrs in page.tags}
    assert {"summary", "curves", "validation", "timeline", "doctor", "record"} <= ids
    text = " ".join(page.text)
    # Curves of every logged scalar, against step and against wall-clock.
    for name in ("loss", "lr", "tokens_per_s", "val_loss"):
        assert f"{name} against step" in html and f"{name} against wall-clock" in html
    # The timeline: the checkpoints on disk, the resume recorded in record.json.
    assert "checkpoint step-00000020" in text and "checkpoint step-00000040" in text
    assert "attempt 2 resumed from step 20 (changed: config.die_at)" in text
    assert html.count('class="marker resume"') >= 1
    # The doctor's breakdown and its verdict; the record: command, revision, config, packages.
    assert "where the step goes" in text and "forward" in text and "No findings" in text
    record = json.loads((a / "record.json").read_text())
    assert "tiny_job.py --doctor --die-at 25" in text
    assert record["git"]["revision"] in text
    assert "die_at" in text and "torch" in text and "packages (" in text
    # A killed attempt re-logged steps 21-25: its line is not joined to the resumed one.
    loss = load_run(a).metrics["loss"]
    assert loss.breaks and loss.steps[loss.breaks[0]] == 21
    # No script, no external resource: the page needs nothing but itself.
    assert not [t for t, _ in page.tags if t in ("script", "iframe", "object", "embed", "link")]
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_several_runs_overlaid_with_what_differs(real_runs, tmp_path):
    a, b = real_runs
    path = write_report([a, b], tmp_path / "compare.html")
    html = path.read_text()
    text = " ".join(_parse(html).text)
    assert "What differs" in text
    diff_rows = re.findall(r"<tr><td>config</td><td>lr</td>(.*?)</tr>", html)
    assert diff_rows and "0.05" in diff_rows[0] and "0.1" in diff_rows[0]
    assert "bias=True" in html  # the code edit, from the git trees of the two runs
    # One curve per run in the overlaid loss chart, in two colours.
    chart = html.split("loss against step", 1)[1].split("</svg>", 1)[0]
    strokes = re.findall(r'class="curve" d="[^"]+" stroke="(#[0-9a-f]{6})"', chart)
    assert len(strokes) >= 2 and len(set(strokes)) == 2
    # b's doctor finding, with the line of code it is about.
    assert "host-sync" in html and "stoker.backward(loss)" in html


def test_everything_from_the_run_is_escaped(hostile_run, hostile_text, tmp_path):
    html = write_report([hostile_run], tmp_path / "r.html").read_text()
    page = _parse(html)
    assert "<script" not in html.lower()
    assert not [t for t, _ in page.tags if t in ("script", "img", "iframe")]
    assert not [(t, a) for t, a in page.tags if any(k.startswith("on") for k in a)]
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert hostile_text in " ".join(page.text)  # shown, as text
    # The finding's location points out of the run's directory: its line is not read.
    assert "outside the run" not in html
    # The NaN loss is not drawn but said; the torn last line is skipped.
    assert "1 non-finite value(s) (first at step 3) not drawn" in html
    assert load_run(hostile_run).metrics["loss"].steps.tolist() == [1, 2, 3, 4, 5]


def test_a_finding_line_is_read_only_from_a_python_file_inside_the_run_cwd(hostile_run):
    record = json.loads((hostile_run / "record.json").read_text())
    record["command"]["cwd"] = str(hostile_run.parent)  # evil.py is now inside it
    (hostile_run / "record.json").write_text(json.dumps(record))
    doctor = json.loads((hostile_run / "doctor.json").read_text())
    for location, shown in (
        ("evil.py:1", True),
        (f"{hostile_run.parent}/evil.py:1", True),
        ("../evil.py:1", False),  # out of the working directory
        ("/etc/passwd:1", False),  # not Python source
        ("evil.py:7", False),  # no such line
    ):
        doctor["findings"][0]["location"] = location
        (hostile_run / "doctor.json").write_text(json.dumps(doctor))
        expected = {location: "SECRET = 'outside the run'"} if shown else {}
        assert load_run(hostile_run).sources == expected, location


def _one_line(capsys, argv, match):
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, err
    assert lines[0].startswith("stoker: error: ") and match in lines[0], lines[0]


def test_a_bad_run_is_one_line(hostile_run, tmp_path, capsys, finishes):
    _one_line(capsys, ["report", str(tmp_path / "nope")], "nope: no such run directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line(capsys, ["report", str(empty)], "has no record.json: it is not a stoker run")
    (hostile_run / "doctor.json").write_text("{not json")
    _one_line(capsys, ["report", str(hostile_run)], "doctor.json is not valid JSON")
    (hostile_run / "doctor.json").write_text('{"findings": 3}')
    _one_line(capsys, ["report", str(hostile_run)], "doctor.json has no findings list")
    (hostile_run / "doctor.json").unlink()
    (hostile_run / "record.json").write_text("[1, 2]")
    _one_line(capsys, ["report", str(hostile_run)], "holds a JSON array where a JSON object")
    (hostile_run / "record.json").write_bytes(b"\xff\xfe garbage")
    _one_line(capsys, ["report", str(hostile_run)], "record.json is not valid JSON")
    (hostile_run / "record.json").unlink()
    os.mkfifo(hostile_run / "record.json")  # would block a plain open() for ever
    finishes(lambda: _one_line(capsys, ["report", str(hostile_run)], "a FIFO (named pipe)"))
    _one_line(capsys, ["report", str(hostile_run), "-o", "/nonexistent/x.html"], "not a directory")
    assert not (hostile_run / "report.html").exists()


def test_report_cli_and_index(real_runs, capsys):
    a, b = real_runs
    assert main(["report", str(a)]) == 0
    assert capsys.readouterr().out == f"wrote {a / 'report.html'}\n"
    (b / "report.html").unlink(missing_ok=True)
    assert main(["runs", "--root", str(a.parent), "--html"]) == 0
    index = (a.parent / "index.html").read_text()
    assert capsys.readouterr().out.strip() == f"wrote {a.parent / 'index.html'}"
    assert 'href="a/report.html"' in index and 'href="b/report.html"' in index
    assert (b / "report.html").is_file()  # the missing report was written
    assert write_index(a.parent, a.parent / "elsewhere.html").is_file()
    assert main(["runs", "--root", str(a.parent), "--html", "-o", str(a.parent / "i.html")]) == 0
    assert (a.parent / "i.html").is_file()
    capsys.readouterr()


def test_runs_html_before_a_subcommand_is_one_clear_line(real_runs, capsys):
    a, _ = real_runs
    # `--html show ID` once read "show" as the index's file name.
    _one_line(capsys, ["runs", "--root", str(a.parent), "--html", "show", "a"], "--html writes")
    _one_line(capsys, ["runs", "--root", str(a.parent), "-o", "x.html"], "add --html")


def test_the_index_escapes_a_hostile_run(hostile_run, hostile_text):
    index = write_index(hostile_run.parent).read_text()
    assert "<script" not in index.lower()
    assert not [(t, a) for t, a in _parse(index).tags if any(k.startswith("on") for k in a)]
    assert hostile_text in " ".join(_parse(index).text)
    assert 'href="hostile/report.html"' in index


def test_thousands_of_metrics_are_tabled_not_all_charted(hostile_run, tmp_path):
    line = {"step": 1, "time": 1767225600.0, **{f"m{i:04d}": float(i) for i in range(1000)}}
    (hostile_run / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    html = write_report([hostile_run], tmp_path / "r.html").read_text()
    assert "m0999" in html and "960 more metrics are in the table above" in html
    assert html.count("<svg") < 100


def test_load_is_fast_enough_for_every_run(real_runs):
    # The whole real run (49 metric lines, 3 checkpoints, doctor, patch) in well under a second.
    import time

    t = time.perf_counter()
    write_report([real_runs[0]])
    assert time.perf_counter() - t < 2.0


@pytest.mark.parametrize("ref", ["a", "-2"])
def test_a_run_id_is_resolved_under_root(real_runs, ref, capsys):
    a, _ = real_runs
    assert main(["report", "--root", str(a.parent), ref]) == 0
    assert capsys.readouterr().out == f"wrote {a / 'report.html'}\n"


def _evaluation(name, accuracy, latency_1, file_bytes=4_000_000):
    stats = {"median": latency_1, "min": latency_1, "max": latency_1}
    return {
        "name": name,
        "params": 1_000_000,
        "nonzero_params": 500_000,
        "file_bytes": file_bytes,
        "linear_weight_bytes": 1,
        "latency_ms": {"1": stats, "32": {**stats, "median": 10 * latency_1}},
        "tokens_per_second": 12345.0,
        "accuracy": accuracy,
        "perplexity": 20.5,
        "threads": 2,
        "compiled": False,
    }


def test_compression_measurements_get_their_section(tmp_path, hostile_text):
    from stoker.records import RecordConfig, start_run

    run = start_run(RecordConfig(directory=tmp_path / "run", save_code=False))
    run.finish()
    compressed = run.dir / "compressed"
    compressed.mkdir()
    older = compressed / "a.json"
    older.write_text(json.dumps([_evaluation("fp32", 0.40, 9.0)]))
    os.utime(older, (1, 1))
    newer = [_evaluation("fp32", 0.41, 8.0), _evaluation(hostile_text, 0.39, 2.5, 1_000_000)]
    (compressed / "b.json").write_text(json.dumps(newer))
    (compressed / "garbage.json").write_text('{"not": "a list"}')
    data = load_run(run.dir)
    assert [r["name"] for r in data.compression] == ["fp32", hostile_text]
    assert data.compression[0]["accuracy"] == 0.41  # the newest measurement of a form
    html = write_report([run.dir]).read_text()
    page = _parse(html)
    assert "compression" in {attrs.get("id") for _, attrs in page.tags}
    text = " ".join(page.text)
    assert "latency ms (batch 1)" in text and "latency ms (batch 32)" in text
    assert "41.0%" in text and "39.0%" in text and "8.00" in text and "25.00" in text
    assert hostile_text not in html  # escaped like every string from a run
    assert "accuracy (%) against latency at batch 1 (ms)" in html


def test_no_compression_section_without_measurements(real_runs):
    a, _ = real_runs
    html = write_report([a]).read_text()
    assert 'id="compression"' not in html
