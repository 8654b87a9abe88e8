#!/usr/bin/python3
"""Writes tests/fixtures/bleu_nltk.json: nltk's corpus BLEU-4 on seeded token lists.

Run by `make fixtures` with Debian's python3-nltk (nltk.translate.bleu_score,
default weights (0.25,)*4, no smoothing); tests/test_datasets_metrics.cpp
([metrics]) reads only the committed JSON.

The fixture holds tokens, not text, so nltk and peftlab score the same tokens:
every token is either a run of ASCII letters/digits (or a UTF-8 word such as
"café") or a single ASCII punctuation mark, which is exactly what
datasets/tokenizer.h's split_words() yields; the C++ test checks that
split_words(" ".join(tokens)) gives the tokens back before comparing.

Layout:
  {"generator": ..., "nltk_version": ..., "seed": ...,
   "sentences": [{"hyp": [tok...], "refs": [[tok...], ...],
                  "sentence_bleu": float,                # nltk sentence_bleu
                  "numerators": [4 ints], "denominators": [4 ints]}, ...],
                                                         # nltk modified_precision, n = 1..4
   "corpora": [{"sentences": [indices], "bleu": float,   # nltk corpus_bleu
                "hyp_len": int, "ref_len": int}, ...]}   # sum of closest_ref_length
Sentences with hypotheses shorter than 4 tokens exist on purpose: there nltk's
max(1, ...) denominator differs from the Papineni count (see datasets/metrics.h).
Even-numbered corpora hold only hypotheses of >= 4 tokens, odd ones may not.

Usage: tools/bleu_nltk_reference.py OUT.json
"""
import json
import os
import random
import sys
import warnings

import nltk
from nltk.translate.bleu_score import closest_ref_length, corpus_bleu, modified_precision, sentence_bleu

SEED = 1234
N_SENTENCES = 300
N_CORPORA = 40

# A small vocabulary so that n-gram matches are common; punctuation and a
# UTF-8 word are tokens as split_words() makes them. OTHER never meets WORDS:
# hypotheses drawn from it have zero matches.
WORDS = ("the a an restaurant pub coffee shop near river city centre serves French Italian Indian food "
         "cheap expensive moderate price range family friendly not is it and with 5 out of rating "
         "customer high low café").split() + [".", ",", "-", "'", "£", "!"]
OTHER = "zebra quartz violin nebula 42 gravel orchid tundra".split()


def perturb(rng, toks, vocab, rate):
    """Substitutes, deletes, inserts and swaps tokens with probability rate each."""
    out = []
    for t in toks:
        r = rng.random()
        if r < rate:
            out.append(rng.choice(vocab))  # substitution
        elif r < 2 * rate:
            continue  # deletion
        else:
            out.append(t)
        if rng.random() < rate:
            out.append(rng.choice(vocab))  # insertion
    if len(out) > 1 and rng.random() < rate * 2:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def make_sentence(rng, i):
    base = [rng.choice(WORDS) for _ in range(rng.randint(3, 25))]
    refs = [perturb(rng, base, WORDS, rng.uniform(0.0, 0.3)) or [base[0]] for _ in range(rng.randint(1, 5))]
    kind = i % 10
    if kind == 0:  # no overlap at all
        hyp = [rng.choice(OTHER) for _ in range(rng.randint(1, 12))]
    elif kind == 1:  # much shorter than the references, sometimes under 4 tokens
        hyp = base[: rng.randint(1, max(1, len(base) // 3))]
    elif kind == 2:  # longer: the base plus a tail
        hyp = base + [rng.choice(WORDS) for _ in range(rng.randint(1, 10))]
    elif kind == 3:  # an exact copy of one reference
        hyp = list(rng.choice(refs))
    else:
        hyp = perturb(rng, base, WORDS, rng.uniform(0.0, 0.4))
    return hyp, refs


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    warnings.simplefilter("ignore")  # nltk warns on every zero-match order (method0)
    rng = random.Random(SEED)
    sentences = []
    for i in range(N_SENTENCES):
        hyp, refs = make_sentence(rng, i)
        precisions = [modified_precision(refs, hyp, n) for n in range(1, 5)]
        sentences.append({
            "hyp": hyp,
            "refs": refs,
            "sentence_bleu": sentence_bleu(refs, hyp),
            "numerators": [p.numerator for p in precisions],
            "denominators": [p.denominator for p in precisions],
        })
    corpora = []
    long_enough = [i for i, s in enumerate(sentences) if len(s["hyp"]) >= 4]
    for c in range(N_CORPORA):
        # Corpus 0: every sentence whose hypothesis has >= 4 tokens (where nltk and
        # Papineni agree); corpus 1: all sentences; then random subsets of 2..30
        # sentences, alternately of those two pools.
        if c < 2:
            idx = long_enough if c == 0 else list(range(N_SENTENCES))
        else:
            pool = long_enough if c % 2 == 0 else range(N_SENTENCES)
            idx = sorted(rng.sample(pool, rng.randint(2, 30)))
        hyps = [sentences[i]["hyp"] for i in idx]
        refs = [sentences[i]["refs"] for i in idx]
        corpora.append({
            "sentences": idx,
            "bleu": corpus_bleu(refs, hyps),
            "hyp_len": sum(len(h) for h in hyps),
            "ref_len": sum(closest_ref_length(r, len(h)) for h, r in zip(hyps, refs)),
        })
    out = {
        "generator": "tools/bleu_nltk_reference.py",
        "nltk_version": nltk.__version__,
        "seed": SEED,
        "sentences": sentences,
        "corpora": corpora,
    }
    with open(sys.argv[1] + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])


if __name__ == "__main__":
    main()
