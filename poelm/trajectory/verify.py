"""``poelm verify REPO``: audit a published trajectory, one line per problem.

Step branches against their manifests (files, sizes, sha256 streamed once), manifest /
config.json / weights header naming the branch's step, distinct weights per branch, tokens
strictly increasing with steps, ``main`` at the newest step, no staging branch left by a failed
Hub publish; cooldown probes (``cooldown-XXXXX-N``) checked on their own and never counted for
``main``. Reads only; the rules it checks are the ones ``publish.py`` keeps when writing.
"""

from __future__ import annotations

import hashlib
import json
import struct

from poelm.trajectory import average
from poelm.trajectory.hubrepo import STAGING
from poelm.trajectory.publish import (MANIFEST, STEP_BRANCH, branch_name, branch_step, cooldown_branches, cooldown_of,
                                      main_step_of, open_repo, read_json, step_branches)


def _hash_stream(f, header: bool = False) -> tuple[str, int, dict]:
    """(sha256, size, safetensors ``__metadata__`` when ``header``) of a binary stream, read once.

    A safetensors file starts with an 8-byte little-endian header size and the JSON header."""
    h, size, meta = hashlib.sha256(), 0, {}
    if header:
        head = f.read(8)
        h.update(head)
        size += len(head)
        if len(head) == 8 and (n := struct.unpack("<Q", head)[0]) < 100_000_000:
            blob = f.read(n)
            h.update(blob)
            size += len(blob)
            try:
                meta = json.loads(blob).get("__metadata__") or {}
            except (ValueError, AttributeError):
                meta = {}
    while chunk := f.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size, meta


def _check_files(backend, b: str, man: dict, step: int) -> tuple[list[str], str | None]:
    """(problems, sha256 of model.safetensors) of branch ``b``: config.json names ``step``, every
    file matches the manifest (present, size, sha256), the weights' header names ``step``."""
    problems, weights = [], None
    cfg = read_json(backend, b, "config.json") or {}
    if cfg.get("step") != step:
        problems.append(f"{b}: config.json says step {cfg.get('step')}")
    listed, present = man.get("files", {}), set(backend.tree(b)) - {MANIFEST}
    for name in sorted(present ^ set(listed)):
        problems.append(f"{b}: {name} is {'not in the manifest' if name in present else 'missing'}")
    for name in sorted(present & set(listed)):
        with backend.stream(b, name) as f:
            digest, size, header = _hash_stream(f, header=name == "model.safetensors")
        if digest != listed[name].get("sha256") or size != listed[name].get("bytes"):
            problems.append(f"{b}: {name} does not match its manifest (sha256/size): corrupted or replaced")
        if name == "model.safetensors":
            weights = digest
            if header.get("poelm_step") not in (None, str(step)):
                problems.append(f"{b}: model.safetensors holds the weights of step {header.get('poelm_step')}")
    return problems, weights


def verify(repo, api=None) -> list[str]:
    """Every problem of the trajectory in ``repo``, one line each (empty: all good).

    Checks each step branch against its manifest (files present, sizes and sha256), that the
    manifest, config.json and the weights' header all name the branch's step, that no two
    branches hold the same weights, that tokens strictly increase with steps, and that ``main``
    holds the newest step. Hashing streams every file once."""
    backend = open_repo(repo, api=api)
    refs = backend.refs()
    problems, seen, tokens = [], {}, []
    branches = step_branches(refs)
    if not branches:
        return [f"{repo} holds no step-XXXXX branches"]
    for b in branches:
        step = branch_step(b)
        man = read_json(backend, b, MANIFEST)
        if man is None:
            problems.append(f"{b}: no readable {MANIFEST}")
            continue
        if man.get("step") != step:
            problems.append(f"{b}: manifest says step {man.get('step')}")
        found, digest = _check_files(backend, b, man, step)
        problems += found
        if digest is not None:
            if digest in seen:
                problems.append(f"{b}: holds the same weights as {seen[digest]}")
            seen.setdefault(digest, b)
        tokens.append((b, man.get("tokens")))
    for (b0, t0), (b1, t1) in zip(tokens, tokens[1:]):
        if t0 is not None and t1 is not None and not t1 > t0:
            problems.append(f"{b1}: tokens {t1} do not increase over {b0} ({t0})")
    problems += _verify_cooldowns(backend, refs)
    problems += average.verify_averages(backend, refs, _check_files)  # avg-XXXXX-N branches, on their own
    main_step = main_step_of(backend, refs)
    if main_step is None:
        problems.append("main: missing or without a manifest")
    elif main_step != branch_step(branches[-1]):
        problems.append(f"main: holds step {main_step}, not the newest step {branch_step(branches[-1])}")
    stale = [b for b in refs if b.startswith(STAGING)]
    problems += [f"{b}: a staging branch left by a failed publish (delete it)" for b in stale]
    return problems


def _verify_cooldowns(backend, refs) -> list[str]:
    """Problems of the ``cooldown-XXXXX-N`` branches: a cooldown manifest naming that source step
    and N, the source step branch present, step = XXXXX + N in manifest / config.json / weights
    header, every file against the manifest, more tokens than its source, and ``main`` never on it.
    They do not count for ``main`` (which holds the newest *step*)."""
    problems = []
    for b in cooldown_branches(refs):
        src, n = cooldown_of(b)
        man = read_json(backend, b, MANIFEST)
        if man is None:
            problems.append(f"{b}: no readable {MANIFEST}")
            continue
        cd = man.get("cooldown") if isinstance(man.get("cooldown"), dict) else {}
        if man.get("kind") != "cooldown" or not cd:
            problems.append(f"{b}: its manifest does not record a cooldown (kind/cooldown missing)")
        elif cd.get("source_step") != src or cd.get("steps") != n:
            problems.append(f"{b}: manifest records a cooldown of {cd.get('steps')} steps from step {cd.get('source_step')}")
        source = branch_name(src)
        if source not in refs:
            problems.append(f"{b}: its source branch {source} is missing")
        end = src + n
        if man.get("step") != end:
            problems.append(f"{b}: manifest says step {man.get('step')}, a cooldown of {n} from {src} ends at {end}")
        problems += _check_files(backend, b, man, end)[0]
        src_tokens = (read_json(backend, source, MANIFEST) or {}).get("tokens") if source in refs else None
        if src_tokens is not None and man.get("tokens") is not None and not man["tokens"] > src_tokens:
            problems.append(f"{b}: tokens {man['tokens']} do not increase over its source {source} ({src_tokens})")
        if "main" in refs and refs["main"] == refs[b]:
            problems.append(f"main: points at the cooldown probe {b}; main tracks the newest step branch")
    return problems
