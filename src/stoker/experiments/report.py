"""The train-large-then-compress report: results.json, two PNG plots and README.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.errors import StokerError

if TYPE_CHECKING:
    from stoker.compress import Evaluation
    from stoker.experiments.train_large_then_compress import ExperimentConfig, SizeResult

__all__ = ["findings", "write_report"]

COMMAND = "stoker experiment train-large-then-compress"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def findings(results: Sequence[SizeResult]) -> list[str]:
    """The two claims of the paper, checked against these numbers, in plain sentences."""
    out = []
    final = [(r.name, r.forms["fp32"].accuracy, r.steps) for r in results]
    order = " < ".join(f"{n} {a:.1%}" for n, a, _ in sorted(final, key=lambda x: x[1]))
    best = max(final, key=lambda x: x[1])
    largest = final[-1]
    steps = ", ".join(f"{n} {s} steps" for n, _, s in final)
    if best[0] == largest[0]:
        verdict = "**Reproduces here**: the largest model is the most accurate"
    else:
        verdict = (
            f"**Does not reproduce here**: {best[0]}, not the largest ({largest[0]}), is the most "
            "accurate"
        )
    out.append(
        f"1. *Larger model better at equal training time.* {verdict} after the same wall-clock "
        f"budget (validation masked-token accuracy, fp32: {order}; {steps})."
    )
    pairs, wins, examples = 0, 0, []
    for i, small in enumerate(results):
        for s_form, s in small.forms.items():
            rivals = [
                (f"{large.name} {form}", e)
                for large in results[i + 1 :]
                for form, e in large.forms.items()
                if e.file_bytes <= s.file_bytes
            ]
            if not rivals:
                continue
            pairs += 1
            name, e = max(rivals, key=lambda x: x[1].accuracy)
            won = e.accuracy > s.accuracy
            wins += won
            examples.append(
                f"{small.name} {s_form} ({_mb(s.file_bytes)} MB, {s.accuracy:.1%}) vs {name} "
                f"({_mb(e.file_bytes)} MB, {e.accuracy:.1%}): "
                + ("larger wins" if won else "smaller wins")
            )
    if pairs:
        verdict = (
            "**Reproduces here**"
            if wins == pairs
            else ("**Partly reproduces here**" if wins else "**Does not reproduce here**")
        )
        out.append(
            "2. *Compressed large model better than small model at equal size.* "
            f"{verdict}: of {pairs} smaller-model forms that some compressed larger model "
            f"matches or undercuts in file size, the best such larger model is more accurate "
            f"in {wins}.\n" + "\n".join(f"   - {x}" for x in examples)
        )
    else:
        out.append(
            "2. *Compressed large model better than small model at equal size.* Not testable "
            "with these numbers: no compressed larger model is as small as a smaller model's form."
        )
    return out


def _plots(results: Sequence[SizeResult], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StokerError(
            "the report's plots need matplotlib: python -m pip install 'stoker[plots]'"
        ) from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(
            [p["seconds"] for p in r.curve],
            [100 * p["accuracy"] for p in r.curve],
            marker="o",
            label=f"{r.name} ({r.config['dim']}x{r.config['layers']})",
        )
    ax.set(xlabel="training wall-clock (s)", ylabel="validation accuracy (%)")
    ax.set_title("Equal wall-clock budget per size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    markers = ["o", "s", "^", "D", "v", "P"]
    for r in results:
        forms = list(r.forms.items())
        color = left.plot([], [])[0].get_color()
        right.plot([], [], color=color)
        for k, (form, e) in enumerate(forms):
            b = max(e.latency_ms)
            kw = {"color": color, "marker": markers[k % len(markers)], "linestyle": ""}
            left.plot(e.file_bytes / 1e6, 100 * e.accuracy, **kw, label=f"{r.name} {form}")
            right.plot(e.latency_ms[b].median, 100 * e.accuracy, **kw)
    left.set(xlabel="file size (MB)", ylabel="validation accuracy (%)", title="accuracy vs size")
    right.set(
        xlabel=f"CPU latency p50 at batch {BATCH_MAX} (ms)",
        ylabel="validation accuracy (%)",
        title="accuracy vs latency",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "compression.png", dpi=120)
    plt.close(fig)
    return ["training.png", "compression.png"]


BATCH_MAX = 32


def _table(results: Sequence[SizeResult]) -> list[str]:
    lines = [
        "| model | form | params (non-zero) | file MB | linear MB | val acc | ppl "
        "| p50 / p99 ms, batch 1 | p50 / p99 ms, batch 32 | x fp32 @32 | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = r.forms["fp32"]
        for form, e in r.forms.items():
            lat = {b: f"{s.median:.1f} / {s.p99:.1f}" for b, s in e.latency_ms.items()}
            top = max(e.latency_ms)
            speed = base.latency_ms[top].median / e.latency_ms[top].median
            lines.append(
                f"| {r.name} | {form} | {e.params / 1e6:.2f}M ({e.nonzero_params / 1e6:.2f}M) "
                f"| {_mb(e.file_bytes)} | {_mb(e.linear_weight_bytes)} | {e.accuracy:.1%} "
                f"| {e.perplexity:.1f} | {lat.get(1, '-')} | {lat.get(32, '-')} | {speed:.2f} "
                f"| {e.tokens_per_second:,.0f} |"
            )
    return lines


def _load(env: dict[str, Any]) -> str:
    load = env.get("load_average")
    return " / ".join(f"{x:.2f}" for x in load) if load else "unknown"


def _size(r: SizeResult) -> str:
    c = r.config
    return f"{r.name} (dim {c['dim']}, {c['layers']} blocks, FFN {c['ffn_dim']})"


def _jsonable(results: Sequence[SizeResult]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        row = asdict(r)
        row["forms"] = {k: e.to_json() for k, e in r.forms.items()}
        out.append(row)
    return out


def write_report(
    cfg: ExperimentConfig,
    results: Sequence[SizeResult],
    env: dict[str, Any],
    seconds: float,
) -> Path:
    """Write results.json, the plots and README.md under ``cfg.out``; returns README.md."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": {**asdict(cfg), "out": str(cfg.out)},
                "environment": env,
                "results": _jsonable(results),
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    plots = _plots(results, out)
    evals: list[Evaluation] = [e for r in results for e in r.forms.values()]
    command = (
        COMMAND
        + (" --quick" if cfg.quick else "")
        + (f" --budget-minutes {cfg.budget_seconds / 60:g}" if not cfg.quick else "")
    )
    text = [
        "# Train large, then compress: measured on this machine",
        "",
        "Regenerate with:",
        "",
        "```",
        command + f" --out {out}",
        "```",
        "",
        'Li et al. ("Train Large, Then Compress", ICML 2020) report that, for a fixed training '
        "wall-clock, larger transformers reach a given accuracy sooner, and that heavily "
        "compressed large models beat lightly compressed small ones. This run checks both on "
        "the built-in masked-language-model task (the Python standard library's source), on a "
        "CPU.",
        "",
        "## Setup",
        "",
        f"- Sizes: {', '.join(_size(r) for r in results)}; "
        f"{cfg.budget_seconds:g} s of training each (bf16 autocast where the CPU has it, AdamW, "
        "learning rate warm-up then cosine over the wall-clock budget), 128-token packed rows, "
        "batch 32.",
        f"- Compression of each trained model: {', '.join(results[0].forms)}. `int8` is static "
        "int8 (PT2E, x86 inductor quantizer, calibrated on 8 training batches, run as "
        "int8-mixed-bf16); `ffn-50% + int8` removes half of every block's FFN neurons, "
        f"fine-tunes {cfg.finetune_steps} steps, then quantizes.",
        f"- Every form is saved, loaded with `stoker.compress.load_compressed` "
        f"({'compiled' if cfg.compile else 'eager'}) and measured there: validation accuracy "
        f"and perplexity on {cfg.eval_batches} batches, latency over {cfg.repeats} calls per "
        "batch size.",
        f"- Machine: {env.get('cpu_model')}, {env.get('torch_threads')} threads, torch "
        f"{env['versions'].get('torch')}, torchao {env['versions'].get('torchao')}, load "
        f"average at the start {_load(env)}; whole run {seconds / 60:.1f} min.",
        "",
        "## Findings",
        "",
        *findings(results),
        "",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## Table",
        "",
        *_table(results),
        "",
        f"{len(evals)} forms measured. File size counts every tensor; the token embedding "
        "(tied to the output head) is not quantized, so it dominates the int8 files of small "
        f"models. `ffn-50% + int8` includes {cfg.finetune_steps} training steps after the cut, "
        "outside the budget: where it is more accurate than the same model's fp32 row, that "
        "extra training explains it, not the pruning.",
        "",
    ]
    if cfg.quick:
        text.insert(2, "**--quick run: seconds of training, nothing here is worth citing.**\n")
    readme = out / "README.md"
    readme.write_text("\n".join(text))
    return readme
