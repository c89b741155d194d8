"""Build ``poelm/data/embedded/embedded.jsonl.gz``, the public-domain corpus shipped with poelm.

Sources (both public domain; see ``poelm/data/embedded/README.md`` for the copyright lines):

* The Devil's Dictionary, Ambrose Bierce (1911), Debian package ``dict-devil`` 1.0-13.1;
* The Jargon File 4.4.7 (29 Dec 2003), Debian package ``dict-jargon`` 4.4.7-3.1.

Both packages ship a dictd database: ``NAME.index`` (one line per headword:
``headword<TAB>offset<TAB>length``, offset/length in dictd's base-64 digits) and ``NAME.dict.dz``
(dictzip, i.e. gzip with a random-access table, which Python's ``gzip`` reads as plain gzip).
Every distinct (offset, length) span that is not a ``00database*`` / ``00-database-*`` header
becomes one document, in file order, Devil's Dictionary first. Cleaning, per entry:

* blocks are separated by blank lines; a *prose* block has its hard-wrapped lines joined with one
  space (a line ending in ``letter-`` is joined without a space, so ``kitchen-\\ngarden`` stays one
  word) and runs of spaces collapsed (the Devil's double spaces after a full stop);
* in the Devil's Dictionary a prose block may hold several paragraphs, each starting with a line
  indented by four spaces; each becomes its own paragraph. A block whose lines are all indented is
  verse: lines are kept, dedented, and right-aligned attributions (``G.J.``) lose their padding;
* in the Jargon File the body is indented by four spaces; a block with deeper indentation or
  non-breaking spaces is preformatted (code, ASCII art) and kept line by line (dedented, NBSP ->
  space). Cross-reference markup ``{term}`` is removed when ``term`` is a headword (so literal
  braces in text such as ``placement of { and }`` survive). The headword and its pronunciation /
  part-of-speech line form the first line (``bar /bar/, n.``; an empty ``//`` is dropped).

Paragraphs are joined with one blank line. Output: one JSON object per line,
``{"source": "devils-dictionary" | "jargon-file", "text": ...}``, gzip level 9 with mtime 0, so
the same inputs always give byte-identical output.

Usage: ``python tools/make_corpus.py [--src /usr/share/dictd] [--out poelm/data/embedded/embedded.jsonl.gz]``
(get the inputs with ``apt-get download dict-devil dict-jargon && dpkg -x <deb> x``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from poelm.fsio import atomic_write_bytes  # noqa: E402

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # dictd's digit order


def b64_int(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + B64.index(c)
    return v


def read_dict(src: Path, name: str) -> tuple[list[str], list[str]]:
    """(entry texts in file order, headwords) of one dictd database."""
    data = gzip.open(src / f"{name}.dict.dz").read()
    spans, heads = set(), []
    for line in (src / f"{name}.index").read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")
        if head.startswith(("00database", "00-database")):
            continue
        heads.append(head)
        spans.add((b64_int(off), b64_int(length)))
    return [data[o:o + n].decode("utf-8") for o, n in sorted(spans)], heads


def join_prose(lines: list[str]) -> str:
    out = ""
    for line in (ln.strip() for ln in lines):
        if not out:
            out = line
        elif re.search(r"[A-Za-z]-$", out) and not out.endswith("--"):
            out += line
        else:
            out += " " + line
    return re.sub(r" {2,}", " ", out)


def blocks(text: str) -> list[list[str]]:
    return [[ln.rstrip() for ln in b.split("\n") if ln.strip()] for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


def indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def preformatted(lines: list[str]) -> str:
    body = textwrap.dedent("\n".join(ln.replace("\xa0", " ") for ln in lines))
    return "\n".join(ln.rstrip() for ln in body.split("\n"))


def clean_devil(entry: str) -> str:
    paras = []
    for blk in blocks(entry):
        if all(indent(ln) > 0 for ln in blk):  # verse, with a right-aligned attribution
            body = [indent(ln) for ln in blk if indent(ln) < 24] or [0]
            lines = [ln.strip() if indent(ln) >= 24 else ln[min(body):] for ln in blk]
            paras.append("\n".join(re.sub(r"(?<=\S) {2,}", " ", ln) for ln in lines))
            continue
        cur: list[str] = []
        for ln in blk:  # prose: an indented line starts a new paragraph
            if indent(ln) > 0 and cur:
                paras.append(join_prose(cur))
                cur = []
            cur.append(ln)
        paras.append(join_prose(cur))
    return "\n\n".join(paras)


def clean_jargon(entry: str, headwords: set[str]) -> str:
    lines = entry.split("\n")
    head, meta = lines[0].strip(), (lines[1].strip() if len(lines) > 1 else "")
    meta = re.sub(r"^//\s*", "", meta)
    first = head + ((meta if meta.startswith(",") else " " + meta) if meta else "")

    def unref(m: re.Match) -> str:
        term = re.sub(r"\s+", " ", m.group(1)).strip()
        return term if term.lower() in headwords else m.group(0)

    paras = [first]
    for blk in blocks("\n".join(lines[2:])):
        if any("\xa0" in ln for ln in blk) or any(indent(ln) != 4 for ln in blk):
            paras.append(preformatted(blk))
        else:
            paras.append(re.sub(r"\{([^{}]*)\}", unref, join_prose(blk)))
    return "\n\n".join(p for p in paras if p.strip())


def build(src: Path) -> list[dict]:
    docs = []
    devil, _ = read_dict(src, "devil")
    docs += [{"source": "devils-dictionary", "text": clean_devil(e)} for e in devil]
    jargon, heads = read_dict(src, "jargon")
    hw = {re.sub(r"\s+", " ", h).strip().lower() for h in heads}
    docs += [{"source": "jargon-file", "text": clean_jargon(e, hw)} for e in jargon]
    return [d for d in docs if d["text"].strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default="/usr/share/dictd", help="directory holding devil.* and jargon.* dictd files")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "poelm/data/embedded/embedded.jsonl.gz"))
    args = ap.parse_args(argv)
    docs = build(Path(args.src))
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    blob = gzip.compress(raw, compresslevel=9, mtime=0)
    atomic_write_bytes(args.out, blob)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {chars:,} characters, {len(raw):,} bytes jsonl, {len(blob):,} bytes gzip -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
