"""What ``stoker tune`` measures: a *tune job*, the built-in MLM one or the user's own.

A tune job is any object with ``model``, ``optimizer``, ``batch_size`` (the current setting),
``lr`` (the current peak learning rate), ``loss(batch) -> Tensor`` (forward pass and loss of
one batch) and ``loader(batch_size, num_workers) -> Iterable`` (the training batches). The
finders need nothing else: the job's step is ``zero_grad``, ``loss(batch).backward()``,
``optimizer.step()``. For a plain script, write a function that builds one from the script's
own pieces and pass ``stoker tune batch-size train.py:make_job`` (the module is imported, not
run as ``__main__``, so its training loop does not start). Without a job, the built-in MLM job
(:class:`MLMJob`, what ``examples/train_mlm.py`` trains) is measured.
"""

from __future__ import annotations

import contextlib
import functools
import os
import runpy
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch

from stoker.errors import StokerError
from stoker.tune.batch_size import BatchSizeResult, find_batch_size
from stoker.tune.lr import LRRangeResult, find_lr
from stoker.tune.threads import ThreadsResult, find_threads

__all__ = ["MLMJob", "TuneJob", "load_job", "tune_batch_size", "tune_lr", "tune_threads"]


class TuneJob(Protocol):
    """The pieces of a training job the finders measure (module docstring)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch_size: int
    lr: float

    def loss(self, batch: Any) -> torch.Tensor: ...

    def loader(self, batch_size: int, num_workers: int = 0) -> Iterable[Any]: ...


class MLMJob:
    """The built-in job: ``examples/train_mlm.py``'s encoder, optimizer and packed loader."""

    def __init__(
        self,
        *,
        preset: str = "tiny",
        max_len: int = 128,
        batch_size: int = 32,
        lr: float = 2e-3,
        seed: int = 0,
        precision: str = "auto",
    ) -> None:
        from stoker.data.loaders import mlm_loader
        from stoker.data.tokenizer import load_token_documents, load_tokenizer
        from stoker.models import Encoder, EncoderConfig
        from stoker.runtime.hardware import bf16_is_fast

        torch.manual_seed(seed)
        tokenizer = load_tokenizer()
        self.vocab_size = tokenizer.get_vocab_size()
        self.docs = load_token_documents("train", tokenizer=tokenizer)
        self.max_len, self.batch_size, self.lr, self.seed = max_len, batch_size, lr, seed
        config = EncoderConfig.preset(preset, vocab_size=self.vocab_size, max_len=max_len)
        self.model: torch.nn.Module = Encoder(config)
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=0.01
        )
        if precision not in ("auto", "bf16", "fp32"):
            raise StokerError(f"precision {precision!r}; valid choices: auto, bf16, fp32.")
        self.bf16 = precision == "bf16" or (precision == "auto" and bf16_is_fast("cpu"))
        self._make_loader = functools.partial(
            mlm_loader, self.docs, vocab_size=self.vocab_size, max_len=max_len, seed=seed
        )

    def loss(self, batch: Any) -> torch.Tensor:
        from stoker.data.loaders import model_inputs
        from stoker.data.mlm import mlm_loss

        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        with autocast:
            logits = self.model(**model_inputs(batch))
        return mlm_loss(logits, batch["labels"])[0]

    def loader(self, batch_size: int, num_workers: int = 0) -> Iterable[Any]:
        return self._make_loader(batch_size=batch_size, num_workers=num_workers)


def load_job(spec: str) -> TuneJob:
    """``"path/to/script.py:make_job"`` -> ``make_job()`` (the script imported, not run)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise StokerError(
            f"--job {spec!r}: pass SCRIPT.py:FUNCTION, a function returning a tune job "
            f"(see stoker.tune.job)"
        )
    if not os.path.isfile(path):
        raise StokerError(f"--job {spec!r}: no such script {path!r}")
    namespace = runpy.run_path(path, run_name="stoker_tune_job")
    make = namespace.get(name)
    if not callable(make):
        found = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("_"))
        raise StokerError(
            f"--job {spec!r}: {os.path.basename(path)} has no function {name!r}; it has "
            f"{', '.join(found) or 'no functions'}"
        )
    job = make()
    missing = [
        k
        for k in ("model", "optimizer", "batch_size", "lr", "loss", "loader")
        if not hasattr(job, k)
    ]
    if missing:
        raise StokerError(f"--job {spec!r}: {name}() returned an object without {missing}")
    return job


def _train_step(job: TuneJob, batch: Any) -> None:
    job.optimizer.zero_grad(set_to_none=True)
    job.loss(batch).backward()
    job.optimizer.step()


def tune_lr(job: TuneJob, **kwargs: Any) -> LRRangeResult:
    """:func:`~stoker.tune.find_lr` on ``job`` at its batch size."""
    return find_lr(job.model, job.optimizer, job.loss, job.loader(job.batch_size), **kwargs)


def tune_batch_size(job: TuneJob, **kwargs: Any) -> BatchSizeResult:
    """:func:`~stoker.tune.find_batch_size` on ``job``'s step; LR scaled from its setting."""
    batches: dict[int, Any] = {}

    def step(size: int) -> None:
        # One real batch per size, loaded at its first step (a warm-up step by default) and
        # kept: the sizes are timed again, interleaved, at the end.
        if size not in batches:
            batches[size] = next(iter(job.loader(size)))
        _train_step(job, batches[size])

    kwargs.setdefault("base_batch_size", job.batch_size)
    kwargs.setdefault("base_lr", job.lr)
    return find_batch_size(step, model=job.model, optimizer=job.optimizer, **kwargs)


def tune_threads(job: TuneJob, **kwargs: Any) -> ThreadsResult:
    """:func:`~stoker.tune.find_threads` on ``job``'s step, loading included."""

    def make_steps(workers: int) -> Iterator[None]:
        while True:
            for batch in job.loader(job.batch_size, workers):
                _train_step(job, batch)
                yield None

    return find_threads(make_steps, model=job.model, optimizer=job.optimizer, **kwargs)
