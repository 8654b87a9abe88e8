// BLEU, slot error rate, accuracy and exact match against hand-computed values.
#include <catch2/catch.hpp>

#include <cmath>

#include "datasets/metrics.h"

using namespace peftlab::data;
using Catch::Detail::Approx;

TEST_CASE("corpus_bleu is 1 for a perfect match and 0 without overlap", "[datasets]") {
    auto perfect = corpus_bleu({"the cat sat on the mat ."}, {{"the cat sat on the mat."}});
    CHECK(perfect.bleu == Approx(1.0));
    CHECK(perfect.brevity_penalty == Approx(1.0));
    CHECK(perfect.hyp_len == 7);  // "." is a token, with or without a space before it

    auto none = corpus_bleu({"a b c d e"}, {{"v w x y z"}});
    CHECK(none.bleu == 0.0);
    CHECK(none.matches[0] == 0);
    CHECK(none.totals[0] == 5);
}

TEST_CASE("corpus_bleu matches a two-sentence corpus computed by hand", "[datasets]") {
    // Sentence 1: hyp "the cat sat on the mat" (6 tokens), ref "the cat is on the mat" (6).
    //   1-grams: the x2, cat, sat, on, mat; clipped matches the 2, cat, on, mat = 5 of 6
    //   2-grams: the cat, cat sat, sat on, on the, the mat; matches the cat, on the, the mat = 3 of 5
    //   3-grams: the cat sat, cat sat on, sat on the, on the mat; matches on the mat = 1 of 4
    //   4-grams: the cat sat on, cat sat on the, sat on the mat; no match = 0 of 3
    // Sentence 2: hyp "there is a dog here" (5), refs "there is a dog" (4) and "a dog is here" (4).
    //   1-grams: all 5 occur in some reference = 5 of 5
    //   2-grams: there is, is a, a dog (ref 1); dog here nowhere = 3 of 4
    //   3-grams: there is a, is a dog (ref 1); a dog here nowhere = 2 of 3
    //   4-grams: there is a dog (ref 1); is a dog here nowhere = 1 of 2
    // Corpus: p1 = 10/11, p2 = 6/9, p3 = 3/7, p4 = 1/5.
    // Lengths: c = 6 + 5 = 11, r = 6 + 4 = 10 (closest reference), c > r so BP = 1.
    // BLEU = (10/11 * 6/9 * 3/7 * 1/5)^(1/4) = (4/77)^(1/4) = 0.477411
    auto r = corpus_bleu({"the cat sat on the mat", "there is a dog here"},
                         {{"the cat is on the mat"}, {"there is a dog", "a dog is here"}});
    CHECK(r.matches == std::array<size_t, 4>{10, 6, 3, 1});
    CHECK(r.totals == std::array<size_t, 4>{11, 9, 7, 5});
    CHECK(r.hyp_len == 11);
    CHECK(r.ref_len == 10);
    CHECK(r.brevity_penalty == 1.0);
    CHECK(r.bleu == Approx(std::pow(4.0 / 77.0, 0.25)));
    CHECK(r.bleu == Approx(0.477411).epsilon(1e-5));
}

TEST_CASE("corpus_bleu clips repeated n-grams", "[datasets]") {
    // "the" occurs 7 times in the hypothesis but at most twice in the reference.
    auto r = corpus_bleu({"the the the the the the the"}, {{"the cat is on the mat"}});
    CHECK(r.matches[0] == 2);
    CHECK(r.totals[0] == 7);
    CHECK(r.bleu == 0.0);  // no 2-gram matches
}

TEST_CASE("corpus_bleu brevity penalty uses the closest reference length", "[datasets]") {
    // All n-grams match (4/4, 3/3, 2/2, 1/1), c = 4 < r = 6: BP = exp(1 - 6/4) = exp(-0.5) = 0.606531
    auto short_hyp = corpus_bleu({"a b c d"}, {{"a b c d e f"}});
    CHECK(short_hyp.brevity_penalty == Approx(std::exp(-0.5)));
    CHECK(short_hyp.bleu == Approx(0.606531).epsilon(1e-5));

    // References of length 6 and 3: 3 is closer to 4, so r = 3 < c and BP = 1.
    CHECK(corpus_bleu({"a b c d"}, {{"a b c d e f", "a b c"}}).bleu == Approx(1.0));
    // Lengths 4 and 6 are equally close to 5: the shorter wins, r = 4, BP = 1.
    // (Taking 6 would give exp(1 - 6/5) = 0.8187.)
    auto tie = corpus_bleu({"a b c d e"}, {{"a b c d e f", "a b c d"}});
    CHECK(tie.ref_len == 4);
    CHECK(tie.bleu == Approx(1.0));

    CHECK(corpus_bleu({""}, {{"a b c d"}}).bleu == 0.0);
    CHECK_THROWS_AS(corpus_bleu({"a"}, {}), std::invalid_argument);
    CHECK_THROWS_AS(corpus_bleu({"a"}, {{}}), std::invalid_argument);
}

TEST_CASE("slot_error_rate counts missing and invented values", "[datasets]") {
    const SlotLexicon lex = {
        {"food", {{"French", {"French"}}, {"Italian", {"Italian"}}}},
        {"familyFriendly", {{"yes", {"family friendly", "kid friendly"}}, {"no", {"not family friendly"}}}},
        {"name", {{"Blue Spice", {"Blue Spice"}}, {"Red Fox", {"Red Fox"}}}},
        {"near", {{"Blue Spice", {"Blue Spice"}}, {"Red Fox", {"Red Fox"}}}},
    };
    const std::map<std::string, std::string> mr1 = {{"name", "Blue Spice"}, {"food", "French"}, {"familyFriendly", "no"}};
    const std::map<std::string, std::string> mr2 = {{"name", "Red Fox"}, {"near", "Blue Spice"}};

    // Everything realized; "not family friendly" is read as [no] only, case is ignored.
    auto ok = slot_error_rate({"BLUE SPICE serves french food and is not family friendly."}, {mr1}, lex);
    CHECK(ok.missing == 0);
    CHECK(ok.invented == 0);
    CHECK(ok.total == 3);
    CHECK(ok.rate == 0.0);

    // Missing French and [no]; invented Italian and [yes] (two forms of yes count once): 4 / 3.
    auto bad = slot_error_rate({"Blue Spice serves Italian food, is family friendly and kid friendly."}, {mr1}, lex);
    CHECK(bad.missing == 2);
    CHECK(bad.invented == 2);
    CHECK(bad.rate == Approx(4.0 / 3.0));

    // A venue name realizes both name[] and near[]: swapping them is not detected.
    CHECK(slot_error_rate({"Blue Spice is near Red Fox."}, {mr2}, lex).rate == 0.0);

    // Corpus level: sentence 1 has 1 missing (French) + 0 invented of 3 slots; sentence 2 misses
    // near[Blue Spice] and invents nothing (Golden Oak is in no lexicon) of 2 slots: (1 + 1) / 5.
    auto corpus = slot_error_rate({"Blue Spice is not family friendly.", "Red Fox is near Golden Oak."}, {mr1, mr2}, lex);
    CHECK(corpus.missing == 2);
    CHECK(corpus.invented == 0);
    CHECK(corpus.total == 5);
    CHECK(corpus.rate == Approx(0.4));

    // An MR value outside the lexicon is still matched literally.
    CHECK(slot_error_rate({"Zizzi serves French food."}, {{{"name", "Zizzi"}, {"food", "French"}}}, lex).rate == 0.0);
    CHECK_THROWS_AS(slot_error_rate({"a", "b"}, {mr1}, lex), std::invalid_argument);
}

TEST_CASE("accuracy and exact_match", "[datasets]") {
    CHECK(accuracy({1, 0, 1, 1}, {1, 1, 1, 0}) == Approx(0.5));
    CHECK(exact_match({"1 0 4 2", " a b\n", "12"}, {"1 0 4 2", "a b", "13"}) == Approx(2.0 / 3.0));
    CHECK_THROWS_AS(accuracy({1}, {1, 0}), std::invalid_argument);
    CHECK_THROWS_AS(exact_match({}, {}), std::invalid_argument);
}
