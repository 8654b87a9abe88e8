// BLEU against nltk's corpus_bleu (tests/fixtures/bleu_nltk.json, from
// tools/bleu_nltk_reference.py via `make fixtures`) and hand-computed values;
// ROUGE-L, slot error rate, accuracy, macro-F1 and exact match against
// hand-computed values.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "datasets/metrics.h"
#include "datasets/tokenizer.h"

using namespace peftlab::data;
using Catch::Detail::Approx;

namespace {

using Tokens = std::vector<std::string>;

const char* kBleuFixture = "tests/fixtures/bleu_nltk.json";

nlohmann::json load_bleu_fixture() {
    std::ifstream f(kBleuFixture);
    if (!f) FAIL(kBleuFixture << " is missing: run the tests from the repository root (`make fixtures` rebuilds it)");
    return nlohmann::json::parse(f);
}

bool rel_close(double a, double b, double rel = 1e-9) {
    return std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b));
}

std::string join(const Tokens& t) {
    std::string s;
    for (const auto& w : t) s += (s.empty() ? "" : " ") + w;
    return s;
}

}  // namespace

TEST_CASE("corpus_bleu is 1 for a perfect match and 0 without overlap", "[datasets][metrics]") {
    auto perfect = corpus_bleu({"the cat sat on the mat ."}, {{"the cat sat on the mat."}});
    CHECK(perfect.bleu == Approx(1.0));
    CHECK(perfect.brevity_penalty == Approx(1.0));
    CHECK(perfect.hyp_len == 7);  // "." is a token, with or without a space before it

    auto none = corpus_bleu({"a b c d e"}, {{"v w x y z"}});
    CHECK(none.bleu == 0.0);
    CHECK(none.matches[0] == 0);
    CHECK(none.totals[0] == 5);
}

TEST_CASE("corpus_bleu matches a two-sentence corpus computed by hand", "[datasets][metrics]") {
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

TEST_CASE("corpus_bleu clips repeated n-grams", "[datasets][metrics]") {
    // "the" occurs 7 times in the hypothesis but at most twice in the reference.
    auto r = corpus_bleu({"the the the the the the the"}, {{"the cat is on the mat"}});
    CHECK(r.matches[0] == 2);
    CHECK(r.totals[0] == 7);
    CHECK(r.bleu == 0.0);  // no 2-gram matches
}

TEST_CASE("corpus_bleu brevity penalty uses the closest reference length", "[datasets][metrics]") {
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

TEST_CASE("slot_error_rate counts missing and invented values", "[datasets][metrics]") {
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

TEST_CASE("accuracy and exact_match", "[datasets][metrics]") {
    CHECK(accuracy({1, 0, 1, 1}, {1, 1, 1, 0}) == Approx(0.5));
    CHECK(exact_match({"1 0 4 2", " a b\n", "12"}, {"1 0 4 2", "a b", "13"}) == Approx(2.0 / 3.0));
    CHECK_THROWS_AS(accuracy({1}, {1, 0}), std::invalid_argument);
    CHECK_THROWS_AS(exact_match({}, {}), std::invalid_argument);
}

// nltk 3.8 (Debian's python3-nltk) on 300 seeded sentences with 1-5 references
// each. Where every order has a match the two agree to 1e-9 relative (both sum
// the same integer counts; only the log/exp rounding differs: nltk fsums
// w_n log p_n, we sum log p_n and divide by 4). Where some order has no match
// nltk substitutes sys.float_info.min for that precision and returns a value
// below 1e-70 (or exactly 0 when no unigram matches); we return 0.
// nltk's denominators are max(1, hypothesis n-grams), so a hypothesis of
// fewer than n tokens adds 1 to nltk's order-n total and 0 to ours.
TEST_CASE("corpus_bleu_tokens matches nltk corpus_bleu and sentence_bleu", "[datasets][metrics]") {
    const auto fx = load_bleu_fixture();
    std::vector<Tokens> hyps;
    std::vector<std::vector<Tokens>> refs;
    for (const auto& s : fx.at("sentences")) {
        hyps.push_back(s.at("hyp").get<Tokens>());
        refs.push_back(s.at("refs").get<std::vector<Tokens>>());
    }
    REQUIRE(hyps.size() == 300);
    // The README's tokenization example.
    CHECK(split_words("It's family-friendly, 4.5 stars.") ==
          Tokens{"It", "'", "s", "family", "-", "friendly", ",", "4", ".", "5", "stars", "."});

    // The fixture's tokens are split_words() tokens: joined with spaces they split back
    // unchanged, so the string API sees exactly what nltk saw.
    for (size_t i = 0; i < hyps.size(); ++i) {
        REQUIRE(split_words(join(hyps[i])) == hyps[i]);
        for (const auto& r : refs[i]) REQUIRE(split_words(join(r)) == r);
    }

    size_t exact = 0, zero = 0;
    for (size_t i = 0; i < hyps.size(); ++i) {
        INFO("sentence " << i << ": " << join(hyps[i]));
        const auto& s = fx["sentences"][i];
        const auto r = corpus_bleu_tokens({hyps[i]}, {refs[i]});
        for (size_t n = 0; n < 4; ++n) {
            CHECK(r.matches[n] == s["numerators"][n].get<size_t>());
            CHECK(std::max<size_t>(1, r.totals[n]) == s["denominators"][n].get<size_t>());
        }
        const double nltk = s.at("sentence_bleu").get<double>();
        if (std::all_of(r.matches.begin(), r.matches.end(), [](size_t m) { return m > 0; })) {
            CHECK(rel_close(r.bleu, nltk));
            ++exact;
        } else {
            CHECK(r.bleu == 0.0);
            CHECK(nltk < 1e-70);
            ++zero;
        }
    }
    CHECK(exact >= 50);  // both branches are exercised many times
    CHECK(zero >= 50);

    size_t corpora_exact = 0, corpora_short = 0;
    for (const auto& c : fx.at("corpora")) {
        const auto idx = c.at("sentences").get<std::vector<size_t>>();
        INFO("corpus of " << idx.size() << " sentences starting at " << idx.front());
        std::vector<Tokens> ch;
        std::vector<std::vector<Tokens>> cr;
        std::vector<std::string> ch_text;
        std::vector<std::vector<std::string>> cr_text;
        std::array<size_t, 4> nltk_num{}, nltk_den{}, short_hyps{};
        for (size_t i : idx) {
            REQUIRE(i < hyps.size());
            ch.push_back(hyps[i]);
            cr.push_back(refs[i]);
            ch_text.push_back(join(hyps[i]));
            cr_text.emplace_back();
            for (const auto& r : refs[i]) cr_text.back().push_back(join(r));
            for (size_t n = 0; n < 4; ++n) {
                nltk_num[n] += fx["sentences"][i]["numerators"][n].get<size_t>();
                nltk_den[n] += fx["sentences"][i]["denominators"][n].get<size_t>();
                short_hyps[n] += hyps[i].size() < n + 1;
            }
        }
        const auto r = corpus_bleu_tokens(ch, cr);
        const double nltk = c.at("bleu").get<double>();
        CHECK(r.hyp_len == c.at("hyp_len").get<size_t>());
        CHECK(r.ref_len == c.at("ref_len").get<size_t>());
        CHECK(r.matches == nltk_num);
        for (size_t n = 0; n < 4; ++n) CHECK(r.totals[n] + short_hyps[n] == nltk_den[n]);
        // The string API tokenizes the joined text back to the same tokens.
        CHECK(corpus_bleu(ch_text, cr_text).bleu == r.bleu);

        if (r.matches[3] == 0) {
            CHECK(r.bleu == 0.0);
            CHECK(nltk < 1e-70);
        } else if (short_hyps[3] == 0) {
            CHECK(rel_close(r.bleu, nltk));
            ++corpora_exact;
        } else {
            // nltk's value is our brevity penalty and matches over its larger denominators;
            // ours is strictly higher since the Papineni totals are smaller.
            double log_sum = 0;
            for (size_t n = 0; n < 4; ++n) log_sum += 0.25 * std::log(double(r.matches[n]) / double(nltk_den[n]));
            CHECK(rel_close(r.brevity_penalty * std::exp(log_sum), nltk));
            CHECK(r.bleu > nltk);
            ++corpora_short;
        }
    }
    CHECK(corpora_exact >= 15);
    CHECK(corpora_short >= 5);
}

TEST_CASE("corpus_bleu_tokens rejects bad corpora by name", "[datasets][metrics]") {
    CHECK_THROWS_WITH(corpus_bleu_tokens({{"a"}}, {}),
                      Catch::Contains("corpus_bleu_tokens") && Catch::Contains("1 hypotheses"));
    CHECK_THROWS_WITH(corpus_bleu_tokens({{"a"}, {"b"}}, {{{"a"}}, {}}),
                      Catch::Contains("hypothesis 1 has no references"));
    CHECK_THROWS_AS(corpus_bleu_tokens({}, {}), std::invalid_argument);
}

TEST_CASE("rouge_l_tokens matches hand-computed LCS, P, R and F", "[datasets][metrics]") {
    auto words = [](const char* s) { return split_words(s); };
    // Lin (2004) sec. 3.1's example, reference "police killed the gunman" (4 tokens).
    // "police kill the gunman": LCS = police the gunman = 3; P = 3/4, R = 3/4, F = 3/4.
    auto s2 = rouge_l_tokens(words("police kill the gunman"), words("police killed the gunman"));
    CHECK(s2.lcs == 3);
    CHECK(s2.precision == Approx(0.75));
    CHECK(s2.recall == Approx(0.75));
    CHECK(s2.fmeasure == Approx(0.75));
    // "the gunman kill police": LCS = the gunman = 2; P = R = F = 2/4. (ROUGE-2 would tie the
    // two: each shares only "the gunman".)
    auto s3 = rouge_l_tokens(words("the gunman kill police"), words("police killed the gunman"));
    CHECK(s3.lcs == 2);
    CHECK(s3.fmeasure == Approx(0.5));

    // Unequal lengths: hyp a b c d e f g (7), ref x a y c z e (6): LCS = a c e = 3;
    // P = 3/7, R = 3/6; F = 2 (3/7)(1/2) / (3/7 + 1/2) = (3/7) / (13/14) = 6/13.
    auto u = rouge_l_tokens(words("a b c d e f g"), words("x a y c z e"));
    CHECK(u.lcs == 3);
    CHECK(u.precision == Approx(3.0 / 7.0));
    CHECK(u.recall == Approx(0.5));
    CHECK(u.fmeasure == Approx(6.0 / 13.0));

    // Order matters: hyp b a, ref a b: LCS = 1, P = R = F = 1/2.
    CHECK(rouge_l_tokens(words("b a"), words("a b")).fmeasure == Approx(0.5));
    // Repeats are not clipped but cannot exceed the reference: hyp a a a, ref a: LCS = 1,
    // P = 1/3, R = 1, F = 2 (1/3) / (4/3) = 1/2.
    auto rep = rouge_l_tokens(words("a a a"), words("a"));
    CHECK(rep.lcs == 1);
    CHECK(rep.fmeasure == Approx(0.5));
    // Case-sensitive, punctuation is a token: "The cat." vs "the cat": LCS = cat = 1, P = 1/3, R = 1/2,
    // F = 2 (1/6) / (5/6) = 2/5.
    CHECK(rouge_l_tokens(words("The cat."), words("the cat")).fmeasure == Approx(0.4));
    // No overlap or an empty side: all zeros (rouge-score's convention).
    auto none = rouge_l_tokens(words("a b"), words("c d"));
    CHECK((none.lcs == 0 && none.precision == 0.0 && none.recall == 0.0 && none.fmeasure == 0.0));
    CHECK(rouge_l_tokens({}, words("a")).fmeasure == 0.0);
    CHECK(rouge_l_tokens(words("a"), {}).recall == 0.0);
    CHECK(rouge_l_tokens(words("a b c"), words("a b c")).fmeasure == 1.0);
}

TEST_CASE("corpus_rouge_l takes the best reference per sentence, then the mean", "[datasets][metrics]") {
    // Sentence 1: "the cat sat on the mat ." vs "the cat is on the mat ." (7 tokens each):
    //   LCS = the cat on the mat . = 6, P = R = F = 6/7.
    // Sentence 2: "police kill the gunman" vs "the gunman kill police" (F = 1/2) and
    //   "police killed the gunman" (F = 3/4): best 3/4.
    // Mean = (6/7 + 3/4) / 2 = 45/56.
    const double r =
        corpus_rouge_l({"the cat sat on the mat.", "police kill the gunman"},
                       {{"the cat is on the mat."}, {"the gunman kill police", "police killed the gunman"}});
    CHECK(r == Approx(45.0 / 56.0));
    CHECK_THROWS_WITH(corpus_rouge_l({"a"}, {{"a"}, {"b"}}), Catch::Contains("corpus_rouge_l"));
    CHECK_THROWS_WITH(corpus_rouge_l({"a"}, {{}}), Catch::Contains("hypothesis 0 has no references"));
}

// scikit-learn's f1_score(gold, predicted, average="macro") conventions: the classes are the
// union of gold and predicted labels; a class's F1 is 0 when its precision or recall is
// undefined (zero_division default); the mean is unweighted over those classes.
TEST_CASE("macro_f1 follows scikit-learn's macro average", "[datasets][metrics]") {
    // gold 0 0 1 1 2 2, predicted 0 1 1 1 0 0.
    //   class 0: TP 1 (pos 0), FP 2 (pos 4, 5), FN 1 (pos 1): F1 = 2 / (2 + 2 + 1) = 2/5
    //   class 1: TP 2 (pos 2, 3), FP 1 (pos 1), FN 0:       F1 = 4 / (4 + 1) = 4/5
    //   class 2: never predicted, TP 0, FN 2:               F1 = 0 (precision undefined -> 0)
    //   macro = (2/5 + 4/5 + 0) / 3 = 0.4; accuracy = 3/6.
    const std::vector<int> gold = {0, 0, 1, 1, 2, 2}, pred = {0, 1, 1, 1, 0, 0};
    CHECK(macro_f1(pred, gold) == Approx(0.4));
    CHECK(accuracy(pred, gold) == Approx(0.5));
    // A predicted class absent from gold counts with F1 0: gold 0 0 1, predicted 0 2 1:
    //   class 0: TP 1, FN 1: 2/3; class 1: TP 1: 1; class 2: FP 1, recall undefined: 0.
    //   macro = (2/3 + 1 + 0) / 3 = 5/9.
    CHECK(macro_f1({0, 2, 1}, {0, 0, 1}) == Approx(5.0 / 9.0));
    // Only labels that occur count: a perfect single-class prediction scores 1, and labels need
    // not be contiguous or non-negative.
    CHECK(macro_f1({1, 1, 1}, {1, 1, 1}) == 1.0);
    CHECK(macro_f1({-1, 7, 7}, {-1, 7, 7}) == 1.0);
    // Macro, not micro: one rare class wrong pulls the mean down although accuracy is 9/10.
    //   gold 0 x9, 1; predicted 0 x10: class 0 F1 = 18 / (18 + 1) = 18/19, class 1 F1 = 0.
    std::vector<int> g(10, 0), p(10, 0);
    g[9] = 1;
    CHECK(macro_f1(p, g) == Approx(9.0 / 19.0));
    CHECK(accuracy(p, g) == Approx(0.9));
    CHECK_THROWS_WITH(macro_f1({1}, {1, 0}), Catch::Contains("macro_f1") && Catch::Contains("1 predictions"));
    CHECK_THROWS_AS(macro_f1({}, {}), std::invalid_argument);
}
