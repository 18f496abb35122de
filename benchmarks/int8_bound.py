"""How much faster int8-static *can* make the served encoder on this CPU: an Amdahl bound, measured.

int8-static quantizes only the blocks' ``nn.Linear`` layers (``stoker.compress.quantize``); the
embedding, attention, LayerNorm, GELU and the tied output projection stay in floating point. So
the whole model's speed-up is bounded by (Amdahl 1967)

    bound = 1 / ((1 - s) + s / k)

with ``s`` the share of the fp32 forward spent in those linears and ``k`` the int8 kernel's speed-up
over the fp32 one at the model's own linear shapes. This script measures, in one process, at
batch 32 on the rows ``benchmarks/compress.py`` uses (validation batch 0, 128 tokens, masked
positions predicted):

1. **whole model**, interleaved: ``fp32`` and ``int8-static`` served as ``compress.py`` serves them
   (compressed, saved, ``load_compressed``, inductor with freezing), and ``fp32, no block
   linears``: the same fp32 model compiled the same way (``build_runnable``) with every block
   linear replaced by ``y = x[..., :1] + bias`` (same output shape, depends on its input, nearly
   free). ``s = 1 - t(no block linears) / t(fp32)``;
2. **the linear kernels**, interleaved per shape: each of a block's four linears (rows = batch x
   seq, its in/out features, its trained weights, fed the activations it sees in the model)
   compiled in fp32, against the same layer through the int8-static path (PT2E export, x86
   inductor quantizer, ``convert_pt2e``, inductor with freezing; bf16 autocast around it only where
   ``int8-static`` uses it, i.e. where bf16 is fast). ``k = sum t(fp32) / sum t(int8)`` over the
   four shapes (every block has the same shapes, so this is the time-weighted speed-up);
3. the bound, the speed-up needed from the kernel to reach 1.5x, the measured ``int8-static /
   fp32``, and a one-line verdict. A cross-check of ``s``: ``layers x sum t(fp32 linear)`` from (2)
   over ``t(fp32)`` from (1).

Limits. The ablation removes each linear's whole cost, including writing its output (inductor may
fuse the stand-in into its consumer) and any epilogue it fused (bias, GELU): ``s`` errs high, so
the bound errs in int8's favour. ``k`` includes quantizing the linear's input (as the model
does) but not the model's other quantize/dequantize nodes, nor cache effects of running a layer
alone. The bound assumes the non-linear ops cost the same in both models. It is a bound on what
int8 kernels for *these linears* can give, not on other compressions (pruning, int8 attention).

On an AVX2-only CPU, or a stand-in for one (torch and oneDNN capped to AVX2 kernels)::

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/int8_bound.py
    python benchmarks/int8_bound.py                  # natively, latest run under ./runs
    python benchmarks/int8_bound.py --quick          # smoke test, not a result

The trained model is the README main job's (``python examples/train_mlm.py`` leaves a checkpoint
in ``runs/<id>-train_mlm/``); ``--source`` picks another run or checkpoint. Without one, only
``--quick`` runs, on a freshly initialised ``tiny`` encoder (labelled so in the output and JSON).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn

from stoker.models import Encoder, EncoderConfig

TARGET = 1.5  # issue 10: some int8 form >= 1.5x fp32 at batch 32
BATCH = 32
MAIN_JOB = "train_mlm"  # run ids end in the script's name: runs/<stamp>-train_mlm


def amdahl_bound(s: float, k: float) -> float:
    """Whole-model speed-up when a share ``s`` of the time runs ``k`` times faster (Amdahl).

    s = 0.6, k = 2 -> 1 / (0.4 + 0.3) = 1.43; k -> inf gives 1 / (1 - s) = 2.5.
    """
    if not 0.0 <= s <= 1.0 or k <= 0:
        raise ValueError(f"need 0 <= s <= 1 and k > 0, got s={s}, k={k}")
    return 1.0 / ((1.0 - s) + s / k)


def kernel_needed(s: float, target: float) -> float:
    """The ``k`` at which :func:`amdahl_bound` reaches ``target``; ``inf`` if no ``k`` can.

    Solves 1/target = (1 - s) + s/k: s = 0.6, target 1.5 -> k = 0.6 / (0.6 - 1/3) = 2.25.
    """
    room = s - (1.0 - 1.0 / target)  # the share int8 must remove, above what it must not
    return s / room if room > 0 else float("inf")


class _NoLinear(nn.Module):
    """Stands in for an ``nn.Linear(in, out)``: ``y = x[..., :1] + bias``, shape [..., out].

    It reads one input feature per row (so it stays data-dependent and cannot be constant-folded)
    and costs one broadcast add, which inductor fuses into the next op.
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x[..., :1] + self.bias


def without_block_linears(model: Encoder) -> Encoder:
    """A copy of ``model`` with each block linear (what int8-static quantizes) a stand-in."""
    from stoker.compress.prune import prunable_linears

    copied = copy.deepcopy(model)
    for name, layer in prunable_linears(copied).items():
        parent, _, attr = name.rpartition(".")
        setattr(copied.get_submodule(parent), attr, _NoLinear(layer))
    return copied


def block_linear_inputs(model: Encoder, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """What block 0's linears are fed in the eager fp32 forward, by name (e.g. [32, 128, 128])."""
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
            captured[name] = args[0].detach().clone()  # returns None: the output is unchanged

        return hook

    block = model.blocks[0]
    assert isinstance(block, nn.Module)  # for mypy: ModuleList items are typed loosely
    hooks = [
        layer.register_forward_hook(keep(name))
        for name, layer in block.named_children()
        if isinstance(layer, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _frozen_call(compiled: Callable[[Tensor], Tensor], x: Tensor, bf16: bool) -> Tensor:
    # The same context build_runnable's run() uses: freezing (weights prepacked for oneDNN),
    # no grad, bf16 autocast only for int8-mixed-bf16.
    guard = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), guard, inductor_config.patch(freezing=True):
        return compiled(x)


def fp32_linear(layer: nn.Linear, x: Tensor) -> Callable[[], Tensor]:
    """``layer(x)`` compiled with inductor and freezing, as the fp32 serving form compiles it."""
    compiled = torch.compile(nn.Sequential(copy.deepcopy(layer)).eval())
    return functools.partial(_frozen_call, compiled, x, False)


def int8_linear(layer: nn.Linear, x: Tensor, *, bf16: bool) -> Callable[[], Tensor]:
    """``layer(x)`` through int8-static's path (``stoker.compress.quantize._pt2e``): export,
    x86 inductor quantizer on ``nn.Linear``, calibrate on ``x``, convert, inductor + freezing."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    # A container, so the linear is a submodule the module-type qconfig can match.
    module = nn.Sequential(copy.deepcopy(layer)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, (x,)).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_module_type_qconfig(nn.Linear, x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(x)
    compiled = torch.compile(convert_pt2e(prepared))
    return functools.partial(_frozen_call, compiled, x, bf16)


def _isa() -> dict[str, str]:
    caps = {k: os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    caps["aten capability in use"] = torch.backends.cpu.get_cpu_capability()
    return caps


def main() -> None:
    from rich.table import Table

    from stoker.bench import Bench, Candidate, bench_parser, summarize
    from stoker.compress import (
        PruneConfig,
        QuantConfig,
        compress,
        load_compressed,
        load_trained,
    )
    from stoker.compress.quantize import build_runnable, serving_inputs
    from stoker.data import load_token_documents, load_tokenizer, mlm_loader, model_inputs
    from stoker.errors import StokerError
    from stoker.records.listing import find_run, latest_run
    from stoker.runtime import bf16_is_fast

    parser = bench_parser("Amdahl bound on int8-static's speed-up over fp32, measured.")
    parser.add_argument(
        "--source",
        default=MAIN_JOB,
        help=f"run dir, run id or checkpoint ({MAIN_JOB!r}: the latest run of the main job, "
        "examples/train_mlm.py; -1: the latest run of any script)",
    )
    args = parser.parse_args()

    tokenizer = load_tokenizer(progress=True)
    try:
        if args.source == MAIN_JOB:
            source = latest_run(MAIN_JOB)
        else:
            source = Path(args.source) if Path(args.source).exists() else find_run(args.source)
        trained = load_trained(source)
        model, origin = trained.model, str(trained.checkpoint)
    except StokerError as exc:
        if not args.quick:
            raise StokerError(
                f"no trained model to measure ({exc}). Train the README's main job first: "
                "python examples/train_mlm.py (~5 min), or pass --source RUN_DIR."
            ) from None
        # Smoke test only: the timings do not depend on the weights' values, but the numbers
        # are still not the trained model's and never quoted.
        config = EncoderConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size(), max_len=128)
        model = Encoder(config)
        origin = f"fresh tiny Encoder, NOT TRAINED (--quick fallback: {exc})"
    model = model.eval()
    cfg = model.config
    bench = Bench.from_args(
        "int8_bound", args, meta={"source": origin, "batch": BATCH, "isa": _isa()}
    )
    say = bench.console.print if bench.console is not None else (lambda *a, **k: None)
    say(f"model: {origin}", highlight=False)
    say(f"kernels: {_isa()}", highlight=False)

    loader = functools.partial(
        mlm_loader, vocab_size=cfg.vocab_size, max_len=cfg.max_len, batch_size=BATCH
    )
    train = loader(load_token_documents("train", tokenizer=tokenizer), seed=1)
    val = loader(load_token_documents("validation", tokenizer=tokenizer), shuffle=False, seed=1234)
    first = model_inputs(next(iter(val)))
    # The rows compress.py times at batch 32: [32, 128] ids, masked positions predicted.
    inputs = {k: v[torch.arange(BATCH) % v.size(0)] for k, v in first.items()}
    tokens = BATCH * inputs["input_ids"].size(1)

    # (1) whole model: fp32 and int8-static as served, and fp32 without its block linears.
    say("compressing and compiling fp32, int8-static, fp32 without block linears")
    served = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, quant in (
            ("fp32", QuantConfig()),
            ("int8-static", QuantConfig(method="int8-static")),
        ):
            made = compress(model, PruneConfig(), quant, train_loader=train)
            served[name] = load_compressed(made.save(Path(tmp) / f"{name}.safetensors"))
    ablated, _ = build_runnable(without_block_linears(model), QuantConfig(), compile=True)
    candidates = {
        "fp32": lambda: served["fp32"](**inputs),
        "int8-static": lambda: served["int8-static"](**inputs),
        "fp32, no block linears": lambda: ablated(**serving_inputs(**inputs)),
    }
    for fn in candidates.values():
        fn()  # compile outside the timed rounds (warm-up rounds would absorb it too)
    whole = bench.compare(
        f"whole model, batch {BATCH}",
        [Candidate(n, fn, work=tokens) for n, fn in candidates.items()],
        baseline="fp32",
        unit="tokens",
    )
    s = 1.0 - whole["fp32, no block linears"].ratio
    measured = whole["int8-static"].speedup

    # (2) the linear kernels, at block 0's shapes and activations, fp32 vs the int8-static path.
    bf16 = bf16_is_fast("cpu")  # int8-static runs its float parts (and int8 outputs) in bf16
    acts = block_linear_inputs(model, inputs)
    kernels = {}
    fp32_total = int8_total = 0.0
    for name, x in acts.items():
        layer = getattr(model.blocks[0], name)
        pair = {"fp32": fp32_linear(layer, x), "int8-static": int8_linear(layer, x, bf16=bf16)}
        for fn in pair.values():
            fn()
        shape = (
            f"[{' x '.join(map(str, x.shape[:-1]))}] x {layer.in_features} -> {layer.out_features}"
        )
        flop = 2 * x[..., 0].numel() * layer.in_features * layer.out_features
        result = bench.compare(
            f"{name} linear {shape}",
            [Candidate(n, fn, work=flop) for n, fn in pair.items()],
            baseline="fp32",
            unit="flop",
        )
        t32, t8 = result["fp32"].median_s, result["int8-static"].median_s
        fp32_total, int8_total = fp32_total + t32, int8_total + t8
        kernels[name] = {
            "shape": shape,
            "fp32_s": t32,
            "int8_s": t8,
            "k": result["int8-static"].speedup,
        }
    k = fp32_total / int8_total
    s_isolated = cfg.layers * fp32_total / whole["fp32"].median_s

    # (3) the bound and the verdict.
    s_clamped = min(max(s, 0.0), 1.0)
    bound = amdahl_bound(s_clamped, k)
    needed = kernel_needed(s_clamped, TARGET)
    implied = kernel_needed(s_clamped, measured)
    ratio_ci = summarize(whole["int8-static"].ratios)  # time ratios: the CI of the speed-up flips
    lo, hi = 1.0 / ratio_ci.median_hi, 1.0 / ratio_ci.median_lo
    table = Table(title=f"int8-static on this CPU: Amdahl bound at batch {BATCH}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("how it was measured")
    rows = [
        (
            "s: block-linear share of fp32",
            f"{s:.3f}",
            "1 - t(no block linears) / t(fp32), whole model",
        ),
        (
            "s, cross-check",
            f"{s_isolated:.3f}",
            f"{cfg.layers} x sum t(fp32 linear) / t(fp32 model)",
        ),
        (
            "k: int8 / fp32 linear kernel",
            f"{k:.2f}x",
            "sum t(fp32) / sum t(int8) over a block's linears",
        ),
        ("bound 1/((1-s)+s/k)", f"{bound:.2f}x", "whole-model speed-up int8 linears can give"),
        (
            "ceiling 1/(1-s)",
            f"{1.0 / (1.0 - s_clamped) if s_clamped < 1 else float('inf'):.2f}x",
            "even with free linears",
        ),
        (f"k needed for {TARGET}x", f"{needed:.2f}x", "given s"),
        (
            "measured int8-static / fp32",
            f"{measured:.2f}x",
            f"whole model, interleaved above (95% CI {lo:.2f}x - {hi:.2f}x)",
        ),
        (
            "k implied by the measurement",
            f"{implied:.2f}x",
            "the kernel speed-up that would make the bound equal the measured speed-up",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    say(table)
    if needed == float("inf"):
        why = f"the block linears are only {s:.0%} of fp32 time, so even free ones give < {TARGET}x"
    elif k >= needed:
        why = f"the int8 kernel's {k:.2f}x meets the {needed:.2f}x needed at s={s:.2f}"
    else:
        why = f"the int8 linear kernel is {k:.2f}x fp32 here, {needed:.2f}x is needed at s={s:.2f}"
    reachable = bound >= TARGET
    verdict = (
        f"{TARGET}x {'is' if reachable else 'is NOT'} reachable with int8 linears on this machine "
        f"(bound {bound:.2f}x, measured {measured:.2f}x): {why}"
    )
    if not lo <= bound <= hi:
        # The bound explains the measurement only if it agrees with it: say so when it doesn't.
        verdict += (
            f". CAUTION: the bound lies outside the measured speed-up's 95% CI ({lo:.2f}x - "
            f"{hi:.2f}x): in the model int8 acts as a {implied:.2f}x kernel, not {k:.2f}x "
            "(fusion around the int8 linears, cache effects, or noise: rerun on a quiet machine)"
        )
    if args.quick:
        verdict = "[--quick: smoke test, not a result] " + verdict
    say(verdict, highlight=False)
    bench.meta.update(
        s=s,
        s_isolated=s_isolated,
        k=k,
        kernels=kernels,
        bf16_float_parts=bf16,
        bound=bound,
        k_needed=needed,
        measured_int8_static=measured,
        measured_ci=[lo, hi],
        k_implied=implied,
        reachable=reachable,
        verdict=verdict,
    )
    bench.save()


if __name__ == "__main__":
    main()
