"""Builds the Ukrainian corpus fixture for the extend-vocab tests.

Source: the Ukrainian translation of the xz man pages (po4a/uk.po, SPDX 0BSD), shipped in the
liblzma-sys crate in the cargo registry of this machine. We keep the translated strings (msgstr) that
contain Cyrillic, strip roff markup, and split them contiguously: the first 80% for training, the rest
held out.

usage: python3 scripts/goldens/vocab_corpus.py PATH/TO/uk.po tests/fixtures/vocab
"""
import re
import sys
from pathlib import Path


def entries(text):
    out, cur, in_str = [], [], False
    for line in text.splitlines():
        if line.startswith("msgstr "):
            cur, in_str = [line[len("msgstr "):]], True
        elif in_str and line.startswith('"'):
            cur.append(line)
        else:
            if in_str:
                out.append("".join(eval(s) for s in cur))  # C-style string literals
            in_str = False
    if in_str:
        out.append("".join(eval(s) for s in cur))
    return out


def clean(s):
    s = re.sub(r"\\f[BIRP]", "", s)
    s = re.sub(r"[BIC]<([^<>]*)>", r"\1", s)
    s = re.sub(r"\\[-(]", "-", s)
    s = s.replace("\\&", "").replace("\\e", "\\")
    return " ".join(s.split())


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    texts = [clean(e) for e in entries(src.read_text(encoding="utf-8"))]
    texts = [t for t in texts if re.search("[а-яіїєґ]", t, re.I)]
    cut = int(len(texts) * 0.8)
    out.mkdir(parents=True, exist_ok=True)
    (out / "uk_train.txt").write_text("\n".join(texts[:cut]) + "\n", encoding="utf-8")
    (out / "uk_heldout.txt").write_text("\n".join(texts[cut:]) + "\n", encoding="utf-8")
    print(f"{len(texts)} strings: {cut} train, {len(texts) - cut} held out")


if __name__ == "__main__":
    main()
