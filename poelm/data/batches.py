"""Which rows made a training step, re-derived (``poelm batch``).

The row stream is a pure function of the data, the tokenizer, the data seed and the row index
(``mixture.py``), and step N of a run (the N-th optimizer update, the ``step`` of the training
log's records) takes the ``R = tokens_per_step / seq_len`` global rows after the first
``(N - 1) R`` of its phase. So the rows of any step follow from a loader position the run saved
(a checkpoint's ``loader_state`` at step S) by skipping ``(N - 1 - S) R`` rows; nothing like
OLMo's ``global_indices.npy`` has to be kept. The training log records ``batch_hash`` of every
step's global batch (rank 0), which the re-derived rows must reproduce.

Which rank took which rows (the loop's accounting, ``train.loop.Trainer``): a micro-step takes
the next ``W b`` rows of the step (W ranks, ``b = device_batch_size``), rank r keeping rows
``[r b, (r + 1) b)`` of them; ``accum = R / (W b)`` micro-steps make the step.
"""

from __future__ import annotations

from poelm.core.errors import DataError
from poelm.data.corpus import data_fingerprint
from poelm.data.mixture import TrainLoader


def rank_rows(n_rows: int, world: int, device_batch_size: int, rank: int) -> list[int]:
    """Indices (within the step) of the rows rank ``rank`` of ``world`` took, in its order."""
    micro = world * device_batch_size
    if n_rows % micro:
        raise DataError(f"a step of {n_rows} rows does not split into micro-steps of {world} ranks x {device_batch_size} rows")
    return [a * micro + rank * device_batch_size + k for a in range(n_rows // micro) for k in range(device_batch_size)]


def check_same_data(data_cfg, tokenizer, state: dict, run: str) -> None:
    """The data and tokenizer now are the ones ``state`` was saved with, else one clear line."""
    if state.get("data_fingerprint") != data_fingerprint(data_cfg):
        raise DataError(f"the data of {run} changed since it trained (data fingerprint differs: files added, removed or resized, "
                        f"weights or val_fraction changed): its batches cannot be re-derived from the data as it is now")
    if state.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise DataError(f"the tokenizer of {run} is not the one its loader state was saved with: its batches cannot be re-derived")


def step_rows(data_cfg, tokenizer, seq_len: int, seed: int, state: dict | None, rows_before: int, n_rows: int):
    """(ids [n_rows, seq_len + 1], source name of each row, ``batch_hash``) of the ``n_rows``
    global rows after the first ``rows_before``; from ``state`` (a saved loader position at or
    before them) or from the stream's start when ``state`` is None."""
    loader = TrainLoader(data_cfg, tokenizer, seq_len, seed=seed, prefetch=False)
    if state is not None:
        loader.load_state_dict(state)
    if rows_before < loader.rows:
        raise DataError(f"row {rows_before} lies before the saved loader position (row {loader.rows})")
    loader.skip(rows_before - loader.rows)
    ids, src, h = loader.take(n_rows)
    return ids, [loader.sources[s].name for s in src], h
