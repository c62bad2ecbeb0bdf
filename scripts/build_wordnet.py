"""Build the WordNet extract in examples/wordnet/ from the WordNet 3.0 noun database.

    python scripts/build_wordnet.py                    # reads /usr/share/wordnet (Debian package wordnet-base)
    python scripts/build_wordnet.py --wordnet DIR --out examples/wordnet --seed 0

Two tasks over the same glosses (the definition part of a synset's gloss, before its first quoted example):
  category_*  which of the 26 noun lexicographer files (noun.animal, noun.food, ...) a definition belongs to;
              balanced: up to 60 train / 10 val / 10 test synsets per category (small categories give what they
              have, split in the same 6:1:1 ratio). Written twice with the same synsets: instruction JSONL for a
              causal LM and text,label CSV for a classifier.
  reverse_*   which common English noun a definition defines (a reverse dictionary): 600 / 60 / 60 words, one
              sense per word (its most frequent), so no word appears in two splits.

"Common" means the word's sense is tagged at least MIN_TAG_COUNT times in the semantic concordance counts shipped
with WordNet (cntlist.rev). Every choice is a pure function of the input files and the seed (sha256 ordering, no
RNG state), and files are written atomically, so running the script twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

# lex_filenum -> lexicographer file, the standard WordNet 3.0 table (lexnames(5WN)); nouns are 03..28.
LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
    14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
    24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance", 28: "noun.time",
}  # fmt: skip
CATEGORY_INSTRUCTION = "Which WordNet noun category does this definition belong to? Answer with the category name only."
REVERSE_INSTRUCTION = "Which single English noun matches this definition? Answer with the word only."
SPLITS = ("train", "val", "test")
PER_CATEGORY = {"train": 60, "val": 10, "test": 10}  # synsets per category and split, at most
REVERSE = {"train": 600, "val": 60, "test": 60}  # words per split
MAX_GLOSS = 200  # characters; longer definitions are skipped (they make long, slow examples)
MIN_TAG_COUNT = 5  # a reverse-dictionary word's sense must be tagged at least this often in cntlist.rev


@dataclass(frozen=True)
class Synset:
    """One noun synset of data.noun."""

    offset: str  # 8-digit byte offset: the synset's id
    category: str  # lexicographer file, e.g. "noun.food"
    lemmas: tuple[str, ...]  # words as written in data.noun (underscores for spaces)
    lex_ids: tuple[int, ...]  # per lemma, its lex_id (part of the sense key)
    gloss: str  # the definition, without the quoted examples


def parse_data_noun(path: Path) -> tuple[list[Synset], str]:
    """Synsets of data.noun and the license text of its header (the lines starting with two spaces)."""
    synsets, header = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("  "):
            header.append(re.sub(r"^\s*\d+ ?", "", line).rstrip())
            continue
        fields, sep, gloss = line.partition(" | ")
        parts = fields.split()
        if not sep or len(parts) < 4 or parts[2] != "n":
            raise ValueError(f"{path} line {number}: not a noun synset line ({line[:60]!r})")
        count = int(parts[3], 16)  # w_cnt is two hex digits
        words = parts[4:4 + 2 * count]
        definition = gloss.split('; "')[0].strip()  # examples follow the definition as '; "..."'
        synsets.append(Synset(parts[0], LEXNAMES[int(parts[1])], tuple(words[0::2]),
                              tuple(int(x, 16) for x in words[1::2]), definition))
    return synsets, "\n".join(header).strip() + "\n"


def tag_counts(path: Path) -> dict[str, int]:
    """Sense key -> how often that sense is tagged in the concordance texts (cntlist.rev: key, sense no., count)."""
    counts = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, count = line.split()
        counts[key] = int(count)
    return counts


def sense_key(synset: Synset, index: int) -> str:
    """WordNet's sense key of lemma `index` in `synset`: lemma%1:lexfile:lex_id:: (1 = noun)."""
    lexfile = next(k for k, v in LEXNAMES.items() if v == synset.category)
    return f"{synset.lemmas[index].lower()}%1:{lexfile:02d}:{synset.lex_ids[index]:02d}::"


def _rank(seed: int, key: str) -> str:
    """A seeded, platform-independent sort key: the same order on every machine and Python version."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def usable(synsets: list[Synset]) -> list[Synset]:
    """Synsets with a short definition that no other noun synset shares (a shared one has two right answers)."""
    seen: dict[str, int] = {}
    for s in synsets:
        seen[s.gloss] = seen.get(s.gloss, 0) + 1
    return [s for s in synsets if s.gloss and len(s.gloss) <= MAX_GLOSS and seen[s.gloss] == 1]


def category_splits(synsets: list[Synset], seed: int) -> dict[str, list[Synset]]:
    """Up to PER_CATEGORY synsets of each category per split; a small category is split 6:1:1 (val, test >= 1)."""
    splits: dict[str, list[Synset]] = {name: [] for name in SPLITS}
    for category in LEXNAMES.values():
        pool = sorted((s for s in synsets if s.category == category), key=lambda s: _rank(seed, s.offset))
        take = min(len(pool), sum(PER_CATEGORY.values()))
        held = max(1, take * PER_CATEGORY["val"] // sum(PER_CATEGORY.values()))
        splits["val"] += pool[:held]
        splits["test"] += pool[held:2 * held]
        splits["train"] += pool[2 * held:take]
    # A second, independent key mixes the categories (the first one's smallest ranks come from big categories).
    return {name: sorted(rows, key=lambda s: _rank(seed, f"order:{s.offset}")) for name, rows in splits.items()}


def reverse_splits(synsets: list[Synset], counts: dict[str, int], seed: int) -> dict[str, list[Synset]]:
    """REVERSE words per split, each a common single lowercase noun given by its most frequent usable sense.

    The word must not occur in its own definition (that would give the answer away).
    """
    best: dict[str, tuple[int, Synset]] = {}
    for s in synsets:
        word, count = s.lemmas[0], counts.get(sense_key(s, 0), 0)
        if not re.fullmatch(r"[a-z]+", word) or count < MIN_TAG_COUNT:
            continue
        if re.search(rf"\b{word}", s.gloss, re.IGNORECASE):
            continue
        if word not in best or count > best[word][0]:  # ties keep the earlier synset (file order)
            best[word] = (count, s)
    words = sorted(best, key=lambda w: _rank(seed, w))
    need = sum(REVERSE.values())
    if len(words) < need:
        raise ValueError(f"only {len(words)} common nouns qualify, {need} needed; lower MIN_TAG_COUNT")
    cut = {"val": (0, REVERSE["val"]), "test": (REVERSE["val"], REVERSE["val"] + REVERSE["test"]),
           "train": (REVERSE["val"] + REVERSE["test"], need)}
    return {name: [best[w][1] for w in words[lo:hi]] for name, (lo, hi) in cut.items()}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _csv(synsets: list[Synset]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows([s.gloss, s.category] for s in synsets)
    return buffer.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8, "\\n" line ends) to a temp file beside `path`, then rename: never a half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; data files are meant to be read by anyone
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(wordnet: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """Write every file of the extract into `out`; return {file name: rows}."""
    synsets, license_text = parse_data_noun(wordnet / "data.noun")
    counts = tag_counts(wordnet / "cntlist.rev")
    pool = usable(synsets)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in category_splits(pool, seed).items():
        records = [{"instruction": CATEGORY_INSTRUCTION, "input": s.gloss, "output": s.category} for s in rows]
        write_atomic(out / f"category_{name}.jsonl", _jsonl(records))
        write_atomic(out / f"category_{name}.csv", _csv(rows))
        written[f"category_{name}.jsonl"] = written[f"category_{name}.csv"] = len(rows)
    for name, rows in reverse_splits(pool, counts, seed).items():
        records = [{"instruction": REVERSE_INSTRUCTION, "input": s.gloss, "output": s.lemmas[0]} for s in rows]
        write_atomic(out / f"reverse_{name}.jsonl", _jsonl(records))
        written[f"reverse_{name}.jsonl"] = len(rows)
    preface = ("The data files in this folder are derived from WordNet 3.0 (data.noun and cntlist.rev, as shipped\n"
               "in the Debian package wordnet-base) by scripts/build_wordnet.py. WordNet's license follows.\n\n")
    write_atomic(out / "LICENSE", preface + license_text)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="folder with data.noun")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "wordnet")
    parser.add_argument("--seed", type=int, default=0, help="fixes which synsets are chosen and their split")
    args = parser.parse_args(argv)
    for name in ("data.noun", "cntlist.rev"):
        if not (args.wordnet / name).is_file():
            parser.error(f"{args.wordnet / name} not found; install WordNet 3.0 (apt-get install wordnet-base) "
                         "or pass --wordnet DIR")
    for name, rows in build(args.wordnet, args.out, args.seed).items():
        print(f"{args.out / name}: {rows} rows, {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
