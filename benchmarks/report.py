"""The HTML report of a long run: writing it, and opening it in a headless browser; and what
the live meters that feed it cost per training step.

A synthetic run directory with ``--steps`` (100,000) logged steps (loss, lr, tokens/s and MFU
every step, val_loss every 1,000), a kill and a resume half-way (the re-logged steps are in
``metrics.jsonl`` twice, as in a real resumed run), a checkpoint every 10,000 steps and a
doctor report, made with stoker's own writers (``start_run``, the checkpoint manifest, the
doctor's ``Report``). Two comparisons, each against a same-run baseline:

- ``write``: ``write_report`` against parsing ``metrics.jsonl`` alone (``read_metrics``, the
  least any reader of the run pays). Target: < 5 s.
- ``open``: the report opened in Debian's chromium (Playwright, network cut off) until every
  chart is laid out, against opening a blank page. Target: < 2 s.
- ``meters``: one training step through a ``Stoker`` with the meters on (the default: a line
  every 25 steps into a real run directory) against the same step with ``meters=False``,
  interleaved in the same run, on the tiny MLP and the MLM step of ``overhead.py`` (fp32, the
  MLM passing ``tokens=``). Target: on / off <= 1.01.

    python benchmarks/report.py            # full run
    python benchmarks/report.py --parts write,open   # only the report (seconds, not minutes)
    python benchmarks/report.py --quick    # smoke test (the same 100k steps, fewer rounds;
                                           # a smaller MLM batch for the meters)
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from stoker import Stoker
from stoker.bench import Bench, Candidate, autorange, bench_parser
from stoker.checkpoint import Manifest
from stoker.doctor import Finding, Report
from stoker.meters import MetersConfig
from stoker.records import RecordConfig, read_metrics, read_record, start_run
from stoker.report import write_report

parser = bench_parser("Writing and opening the HTML report of a 100k-step run.", repeats=10)
parser.add_argument("--steps", type=int, default=100_000, help="logged steps of the run")
parser.add_argument("--keep", action="store_true", help="keep the synthetic run and report")
parser.add_argument("--chromium", default=os.environ.get("STOKER_CHROMIUM", "/usr/bin/chromium"))
parser.add_argument(
    "--parts", default="meters,write,open", help="what to measure (comma-separated; %(default)s)"
)
args = parser.parse_args()
PARTS = {p for p in args.parts.split(",") if p}
if not PARTS or PARTS - {"meters", "write", "open"}:
    parser.error(f"--parts {args.parts}: choose from meters, write, open")
if args.steps < 10:
    parser.error(f"--steps {args.steps}: use at least 10 logged steps")
WRITE_TARGET_S, OPEN_TARGET_S = 5.0, 2.0
METERS_TARGET = 1.01  # per-step time with the meters on / off


def metered_step(workload: str, meters: bool, root: Path) -> tuple[Callable[[], None], Stoker]:
    """One training step of ``workload`` (``overhead.py``'s) through a Stoker recording into
    ``root``, with the meters on or off; every candidate gets the same weights and batch."""
    from overhead import mlm_workload, mlp_workload, optimizer_for

    from stoker.data.mlm import mlm_loss

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    if workload == "mlp":
        wl = mlp_workload(cpu)
    else:
        seq, batch = (64, 8) if args.quick else (128, 32)
        wl = mlm_workload(cpu, preset="tiny", seq=seq, batch_size=batch, vocab=8192)
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        doctor=False,
        meters=meters,
        record=RecordConfig(
            directory=root / f"{workload}-{'on' if meters else 'off'}",
            save_code=False,
            tee_console=False,
        ),
    )
    model = copy.deepcopy(wl.model)
    model, optimizer = stoker.prepare(model, optimizer_for(model))
    forward, batch = wl.forward, wl.batch

    def step() -> None:
        out = forward(model, batch)
        if workload == "mlm":
            loss, n = mlm_loss(out, batch["labels"])
            stoker.backward(loss, tokens=n)
        else:
            stoker.backward(wl.loss(out, batch))
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):  # past the meters' FLOP-counted second step, before any timing
        step()
    return step, stoker


def meters_overhead(bench: Bench, root: Path) -> dict[str, float]:
    ratios = {}
    for workload in ("mlp", "mlm"):
        off, stoker_off = metered_step(workload, False, root)
        on, stoker_on = metered_step(workload, True, root)
        # A window closes every 25 steps and at least every 0.5 s: on these steps, one sample in
        # many pays for a window's hand-over (~tens of µs), which the median over rounds hides;
        # spread over the window's steps it is below 0.02% of a step (the time per window is
        # in the table's max column).
        number = max(autorange(off), MetersConfig().every_steps)
        result = bench.compare(
            f"meters on vs off, {workload} step (fp32)",
            [Candidate("meters off", off), Candidate("meters on", on)],
            baseline="meters off",
            number=number,
            repeats=None if args.quick else max(args.repeats or 0, 20),
        )
        ratios[workload] = result["meters on"].ratio
        assert stoker_on.meters is not None and stoker_off.meters is None
        stoker_on.close()
        stoker_off.close()
        summary = read_record(root / f"{workload}-on")["summary"]["meters"]
        mfu = summary.get("mfu")
        if mfu is not None and not mfu <= 1.0:
            raise SystemExit(f"MFU {mfu:.1%} > 100% on the {workload} step: a wrong peak or count")
        bench.meta[f"meters_{workload}_mfu"] = mfu
    return ratios


def make_run(root: Path, steps: int) -> Path:
    """A finished run directory: ``steps`` logged steps, killed at 52% and resumed from 50%."""
    run = start_run(
        RecordConfig(directory=root / "run", tee_console=False), user_config={"steps": steps}
    )
    started = _dt.datetime.fromisoformat(run.record["started"]).timestamp()
    rng = random.Random(0)
    ckpt_every = max(1, steps // 10)
    resume_at = ckpt_every * 5
    killed_at = resume_at + max(1, steps // 50)
    lines, t = [], started + 20.0

    def log(step: int) -> None:
        nonlocal t
        t += 0.25 * (1 + 0.1 * rng.random())
        loss = 7.0 * math.exp(-step / (steps / 4)) + 1.5 + 0.05 * rng.gauss(0, 1)
        if rng.random() < 1e-4:
            loss *= 3  # an occasional bad batch: the spikes downsampling must keep
        lr = 1e-3 * min(1.0, step / 1000) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rec = {"step": step, "time": round(t, 3), "loss": loss, "lr": lr}
        rec.update(tokens_per_s=32_000 * (1 + 0.05 * rng.gauss(0, 1)), mfu=0.31)
        lines.append(json.dumps(rec))
        if step % 1000 == 0:
            lines.append(json.dumps({"step": step, "time": round(t, 3), "val_loss": loss + 0.2}))

    for step in range(1, killed_at + 1):
        log(step)
    t += 60.0  # the job was down for a minute
    resumed = _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat()
    for step in range(resume_at + 1, steps + 1):
        log(step)
    with open(run.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for step in range(ckpt_every, steps + 1, ckpt_every):
        directory = run.dir / "checkpoints" / f"step-{step:08d}"
        directory.mkdir(parents=True)
        when = started + 20 + 0.27 * step + (60 if step > resume_at else 0)
        created = _dt.datetime.fromtimestamp(when, _dt.timezone.utc).isoformat()
        Manifest(step=step, world_size=1, created=created).write(directory)
    attempts = [
        *run.record["attempts"],
        {"started": resumed, "argv": ["train.py"], "resumed_from": {"step": resume_at}},
    ]
    run.update(attempts=attempts, resumed_from={"step": resume_at})
    summary = {
        "device": "cpu",
        "profiled_steps": 5,
        "step_ms": 250.0,
        "phases_ms": {"data": 20.0, "forward": 80.0, "backward": 120.0, "optimizer": 25.0},
    }
    finding = Finding("dataloader-starved", "medium", 0.08, "the loop waits for data", "workers")
    Report(findings=[finding], summary=summary).write_json(run.dir)
    run.finish()
    return run.dir


def write_and_open(
    bench: Bench, run_dir: Path, tmp: Path, lines: int, table: Table, met: dict[str, bool]
) -> None:
    """Write the run's report (against parsing its metrics) and open it in headless chromium
    (against a blank page); add their rows to ``table`` and ``met``."""
    out = tmp / "report.html"
    blank = tmp / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    write = bench.compare(
        f"write the report of a {args.steps:,}-step run ({lines:,} metric lines)",
        [
            Candidate("parse metrics.jsonl", lambda: read_metrics(run_dir / "metrics.jsonl")),
            Candidate("write_report", lambda: write_report([run_dir], out)),
        ],
        baseline="parse metrics.jsonl",
    )
    write_s = write["write_report"].median_s
    met["write"] = write_s < WRITE_TARGET_S
    table.add_row("write", f"{write_s:.2f} s", f"< {WRITE_TARGET_S:.0f} s", str(met["write"]))
    size = out.stat().st_size
    bench.meta["report_bytes"] = size
    if "open" not in PARTS:
        return

    from playwright.sync_api import sync_playwright

    # The browser lays the page out in its own processes: its time is wall time whatever
    # --clock says (this thread's CPU time would read ~0).
    wall = Bench(
        "report",
        dataclasses.replace(bench.config, clock="wall", out_dir=None),
        console=bench.console,
        quiet=bench.console is None,
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=args.chromium, args=["--host-resolver-rules=MAP * ~NOTFOUND"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.route(
            "**/*",
            lambda route: (
                route.continue_() if route.request.url.startswith("file://") else route.abort()
            ),
        )

        def opened(path: Path, charts: bool) -> None:
            page.goto(path.as_uri(), wait_until="load")
            if charts:  # layout of the last chart: every SVG above it is laid out too
                assert page.locator("svg.chart").last.bounding_box() is not None

        open_ = wall.compare(
            f"open it in headless chromium ({size / 1e6:.2f} MB; wall clock)",
            [
                Candidate("blank page", lambda: opened(blank, False)),
                Candidate("report", lambda: opened(out, True)),
            ],
            baseline="blank page",
        )
        browser.close()
    bench.comparisons.append(open_)
    open_s = open_["report"].median_s
    met["open"] = open_s < OPEN_TARGET_S
    table.add_row("open", f"{open_s:.2f} s", f"< {OPEN_TARGET_S:.0f} s", str(met["open"]))


tmp = Path(tempfile.mkdtemp(prefix="stoker-report-bench-"))
try:
    run_dir = make_run(tmp, args.steps)
    lines = (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
    bench = Bench.from_args("report", args, meta={"steps": args.steps, "metric_lines": lines})
    meters = meters_overhead(bench, tmp / "meters") if "meters" in PARTS else {}
    table = Table(title="report: targets" + ("  [quick]" if args.quick else ""))
    for col in ("", "median", "target", "met"):
        table.add_column(col, justify="left" if not col else "right")
    met: dict[str, bool] = {}
    if "write" in PARTS or "open" in PARTS:
        write_and_open(bench, run_dir, tmp, lines, table, met)
    for workload, ratio in meters.items():
        ok = met[f"meters_{workload}"] = ratio <= METERS_TARGET
        table.add_row(f"meters {workload}", f"{ratio:.3f}x", f"<= {METERS_TARGET}x", str(ok))
    Console(width=120).print(table)
    bench.meta["targets_met"] = met
    bench.save()
finally:
    if args.keep:
        print(f"kept the run and its report in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
