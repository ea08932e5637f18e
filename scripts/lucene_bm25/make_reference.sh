#!/usr/bin/env bash
# Lucene's BM25 scores of the bundled sample's dev and TREC DL 2020 candidates (tests/data/lucene-bm25-sample.tsv),
# which tests/test_bm25.py holds msmarco/bm25.py to. Needs Java 11+, network access to PyPI (pyserini's wheel carries
# Anserini's jar, Lucene inside), and the project's virtual environment. Run from anywhere; takes about a minute.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps pyserini==0.21.0 -d "$work"
(cd "$work" && python -m zipfile -e pyserini-0.21.0-py3-none-any.whl wheel)
jar="$work/wheel/pyserini/resources/jars/anserini-0.21.0-fatjar.jar"
javac -cp "$jar" -d "$work" "$here/LuceneBM25.java"
python - "$root" "$work" <<'PY'
import sys
from pathlib import Path
root, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root))
from msmarco import bm25
from msmarco.data import MSMarco
data = MSMarco(root / "data" / "sample")
coll = data.collection()
with open(work / "docs.tsv", "w", encoding="utf-8") as f:  # the stores' text, as msmarco/bm25.py reads it
    for row in range(len(coll)):
        f.write(f"{int(coll.ids[row])}\t" + " ".join(coll.text_at(row).split()) + "\n")
for split, (queries, qrels), cands in [("dev", (data.queries("dev"), data.qrels("dev")), data.dev_candidates()),
                                       ("dl2020", data.trec_dl_topics(2020), data.trec_dl_candidates(2020))]:
    qids = [q for q in sorted(qrels) if any(g > 0 for g in qrels[q].values()) and q in cands]  # as bm25.write_run
    (work / f"{split}.queries").write_text("".join(f"{q}\t{t}\n" for q, t in zip(qids, queries.get_many(qids))))
    (work / f"{split}.candidates").write_text("".join(f"{q}\t{p}\n" for q in qids for p in cands[q].tolist()))
PY
out="$root/tests/data/lucene-bm25-sample.tsv"
mkdir -p "$(dirname "$out")"
for split in dev dl2020; do
  java -cp "$jar:$work" LuceneBM25 score "$work/docs.tsv" "$work/$split.queries" "$work/$split.candidates" \
    | sed "s/^/$split\t/"
done > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(wc -l < "$out") lines)"
