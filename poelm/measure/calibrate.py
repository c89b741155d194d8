"""Calibration: WAND p99 bounds and the routing threshold, and writing the bounds back.

Both are calibrated on the CALIBRATION SLICE: the ``calib_tokens`` validation tokens right after
the measurement slice (disjoint from it, the same for every checkpoint). The routing threshold
found there is then evaluated on the measurement slice, so the reported routed fraction and
regression are held-out figures (the calibration-slice fraction is kept too).

WAND bounds (SPEC "WAND p99 bounds"): ``bound_s`` = 99th percentile over counted positions of
``range(c_{s+1} - c_s)``. Ranges are bounded by the logit soft-cap (``range(z_k) <= 2 cap``, hence
``range(delta_s) <= 4 cap / (s + 2) <= 2 cap``), so a fixed histogram over ``[0, 2 cap]`` holds
them; p99 and max are exact (``metrics.StreamingQuantile`` keeps the top 1% of at most
``calib_tokens`` values), p50 and p90 come from the 65,536-bin histogram (error <= 2 cap / 65,536,
4.6e-4 nats at cap 15).

Routing threshold (SPEC "Confidence-aware routing"): tau = the lowest confidence threshold whose
routing metric over the routed positions is <= the cap (``metrics.routing_threshold``). The card
gives no formula for its "target_regression"; the default metric here is ``agreement``: among
routed positions, the fraction where stage 0's top-1 differs from full K's top-1, i.e. how often
routing changes the full model's output (no labels needed; WAND's exit agreement measures the
same thing). Why not the label-based rule (``target``: full K right and stage 0 wrong, the old
``target_regression``): on the card's own table that rate at tau = 0 is at most
``(1 - agreement + acc_full - acc_s0) / 2`` = 0.013-0.018 on every row, below the 0.020 cap, so it
would choose tau = 0 and route 100% everywhere (as it did on the demo trajectory), while the card
routes 70-88%. ``1 - agreement`` is 2.4-3.5% on every card row, above the cap, and the card's
routed fraction is rank-ordered by it. ``target`` and ``nll`` (mean target-NLL increase, nats)
stay available. A calibration where tau = 0 already meets the cap is flagged
``cap_met_at_tau0``: nothing is selected, and the report says "cap met with no threshold"
instead of printing a 100% routed fraction. The metric's value at tau = 0 is recorded as well.

Where the bounds go (SPEC: each checkpoint's config.json as ``poe_wand_p99_bounds_per_stage_head``):

- exported Hugging Face folder (config.json with ``model_type = "poelm"``): that key in its
  config.json (and its entry in ``poelm_manifest.json`` / ``manifest.json``);
- poelm checkpoint dir: its config.json is the strict poelm Config (unknown keys are rejected on
  load), so the bounds go to ``calibration.json`` next to it, which ``checkpoint.load_model``
  merges into ``meta`` and the manifest lists (sha256 and size updated in place; only the changed
  entries are rehashed). Export copies them into the HF config.json;
- ``REPO@step-XXXXX`` branch: the branch's config.json bytes via ``publish.update_branch_files``.

Every file is written atomically (``fsio``): first the data file, then the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from poelm.core.errors import CheckpointError
from poelm.fsio import atomic_write_bytes, atomic_write_json, sha256_file
from poelm.measure.metrics import RoutingHistogram, StreamingQuantile, projected_speedup, routing_at, routing_threshold

BOUNDS_KEY = "poe_wand_p99_bounds_per_stage_head"
ROUTING_KEY = "poe_routing"
CALIBRATION_FILE = "calibration.json"
WAND_QUANTILE = 0.99


class Calibrator:
    """Accumulates WAND ranges and the stage-0 confidence histogram over the calibration slice."""

    def __init__(self, K: int, n_max: int, softcap: float, routing_bins: int = 10000, device="cpu"):
        hi = 2.0 * softcap if softcap > 0 else 64.0  # no cap: values above 64 clamp in the histogram only
        self.K = K
        self.wand = StreamingQuantile(max(K - 1, 0), 0.0, hi, q_exact=WAND_QUANTILE, n_max=n_max, device=device)
        self.routing = RoutingHistogram(routing_bins, device=device)

    def add(self, stats: dict):
        c = stats["counted"]
        if self.K > 1:
            self.wand.add(stats["wand_range"][:, c])
        self.routing.add(stats)

    def all_reduce(self) -> "Calibrator":
        """Merge the ranks' calibration positions (``torch.distributed``; no-op on one process)."""
        self.wand.all_reduce()
        self.routing.all_reduce()
        return self

    def wand_summary(self) -> dict | None:
        if self.K < 2 or self.wand.n == 0:
            return None
        p99 = self.wand.quantile(WAND_QUANTILE)
        return {
            "bounds": p99,
            "p50": self.wand.quantile(0.5),
            "p90": self.wand.quantile(0.9),
            "p99": p99,
            "max": self.wand.max(),
            "positions": self.wand.n,
            "histogram_resolution": self.wand.resolution,
        }


def routing_summary(calib: RoutingHistogram, held_out: RoutingHistogram | None, cap: float, metric: str,
                    confidence: str, c0: float, agreement: float | None) -> dict:
    """tau from the calibration histogram; fraction, metric and speedup on the held-out slice
    (the measurement slice) at that tau; SPEC projected speedup ``1 / (f c0 + 1 - f)`` (a FLOP
    projection: exact KV catch-up still runs the skipped stages later, see the measured
    generation speedup). ``value_tau0`` / ``value_tau0_calib``: the metric with every position
    routed; ``cap_met_at_tau0``: tau = 0 already meets the cap (no threshold was needed)."""
    metric = RoutingHistogram.canonical(metric)
    counts, regress = calib.arrays(metric)
    cal = routing_threshold(counts, regress, cap, metric)
    at0 = routing_at(counts, regress, 0)
    out = {"cap": cap, "metric": metric, "confidence": confidence, "tau": cal["tau"],
           "tau_resolution": 1.0 / calib.bins, "fraction_calib": cal["fraction"], "value_calib": cal["value"],
           "value_tau0_calib": at0["value"], "cap_met_at_tau0": bool(counts.sum() > 0 and at0["value"] <= cap)}
    if held_out is not None:
        hc, hr = held_out.arrays(metric)
        at = routing_at(hc, hr, cal["index"]) if cal["index"] < len(hc) else {"fraction": 0.0, "value": 0.0}
        out["value_tau0"] = routing_at(hc, hr, 0)["value"]
    else:
        at = {"fraction": cal["fraction"], "value": cal["value"]}
        out["value_tau0"] = at0["value"]
    out.update(fraction=at["fraction"], value=at["value"], c0=c0,
               projected_speedup=projected_speedup(at["fraction"], c0), agreement_s0_full=agreement)
    return out


# ----------------------------------------------------------------------------- write-back
def config_with_bounds(config_bytes: bytes, bounds: list[float], routing: dict | None = None) -> bytes:
    """An HF config.json with ``poe_wand_p99_bounds_per_stage_head`` (and the routing threshold)
    set; other keys untouched."""
    cfg = json.loads(config_bytes.decode("utf-8"))
    cfg[BOUNDS_KEY] = [float(b) for b in bounds]
    if routing is not None:
        cfg[ROUTING_KEY] = routing
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode("utf-8")


def routing_entry(routing: dict | None) -> dict | None:
    if not routing:
        return None
    return {k: routing[k] for k in ("tau", "cap", "metric", "confidence")}


MANIFESTS = ("manifest.json", "poelm_manifest.json")  # checkpoint dir, exported folder


def _update_manifest(d: Path, names: list[str]) -> list[str]:
    """Refresh the sha256/bytes of ``names`` in the dir's manifest(s); returns those rewritten.

    Both manifests map ``files`` to ``{name: {"sha256", "bytes"}}``; only the named entries are
    rehashed (not the multi-GB weights)."""
    done = []
    for mname in MANIFESTS:
        mpath = d / mname
        if not mpath.is_file():
            continue
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            files = manifest["files"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{mpath} is corrupt: cannot record the calibration in it") from None
        for name in names:
            p = d / name
            files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        atomic_write_json(mpath, manifest)
        done.append(mname)
    return done


def _is_hf_export(d: Path) -> bool:
    try:
        return json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type") == "poelm"
    except (OSError, ValueError, AttributeError):
        return False


def write_bounds(target_dir, bounds: list[float], routing: dict | None = None) -> list[str]:
    """Store the bounds with the checkpoint (see the module docstring); returns the files written."""
    d = Path(target_dir)
    if _is_hf_export(d):
        new = config_with_bounds((d / "config.json").read_bytes(), bounds, routing)
        atomic_write_bytes(d / "config.json", new)
        written = ["config.json"]
    else:
        if not (d / "model.safetensors").is_file():
            raise CheckpointError(f"{d} is not a checkpoint dir or exported folder: cannot write calibration there")
        body = {BOUNDS_KEY: [float(b) for b in bounds]}
        if routing is not None:
            body[ROUTING_KEY] = routing
        atomic_write_json(d / CALIBRATION_FILE, body)
        written = [CALIBRATION_FILE]
    return written + _update_manifest(d, written)

