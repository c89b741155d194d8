"""What data a save has seen, per mixture source: the provenance a published branch carries.

Readers of public trajectories ask which data each checkpoint saw (Pythia #92, OLMo #728: tokens
per source; Pythia's batch_viewer, OLMo #879: the batch order). A save's meta (and so its
branch's ``poelm_manifest.json``, ``trajectory/export.py``) records, from the loader's position:

- ``tokens_by_source``: tokens drawn from each source since the run began (rows x seq_len: every
  row of ``seq_len + 1`` ids gives ``seq_len`` targets, as ``tokens`` counts them);
- ``tokens_by_source_in_phase``: the same since the phase began (None for a resume of a
  checkpoint written before the phase start was recorded);
- ``phase_start_rows``: rows per source when the phase began (what the above subtracts);
- ``batch_hashes``: ``[step, hash]`` of every global batch since the previous save
  (``mixture.batch_hash``; ``poelm batch`` re-derives one from the data).
"""

from __future__ import annotations


def source_rows(loader_state: dict) -> dict[str, int]:
    return {s["name"]: int(s["rows"]) for s in loader_state["sources"]}


class Provenance:
    def __init__(self, seq_len: int, phase_start_rows: dict | None):
        self.seq_len, self.phase_start_rows = int(seq_len), phase_start_rows
        self.hashes: list[list] = []

    def note(self, step: int, batch_hash: str | None) -> None:
        if batch_hash is not None:  # rank 0 alone sees every row of the batch
            self.hashes.append([int(step), batch_hash])

    def block(self, loader_state: dict) -> dict:
        rows = source_rows(loader_state)
        start = self.phase_start_rows
        return {
            "tokens_by_source": {n: r * self.seq_len for n, r in rows.items()},
            "tokens_by_source_in_phase": None if start is None else {n: (r - int(start.get(n, 0))) * self.seq_len for n, r in rows.items()},
            "phase_start_rows": start,
            "batch_hashes": list(self.hashes),
        }

    def saved(self) -> None:
        self.hashes = []
