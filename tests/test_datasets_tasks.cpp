// Synthetic task generators: determinism, split hygiene and that targets are right.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>

#include "datasets/batch.h"
#include "datasets/tasks.h"

using namespace peftlab::data;

namespace {

bool same_examples(const std::vector<Example>& a, const std::vector<Example>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i].source != b[i].source || a[i].target != b[i].target || a[i].references != b[i].references ||
            a[i].slots != b[i].slots)
            return false;
    return true;
}

std::string unspace(const std::string& s) {
    std::string out;
    for (char c : s)
        if (c != ' ') out += c;
    return out;
}

std::vector<std::string> words_of(const std::string& text) {
    std::vector<std::string> words;
    std::string w;
    for (char c : text + " ") {
        if (c == ' ' || c == ',' || c == '.' || c == ':') {
            if (!w.empty()) words.push_back(std::exchange(w, {}));
        } else {
            w += c;
        }
    }
    return words;
}

}  // namespace

TEST_CASE("make_task is deterministic in the seed for every task", "[datasets]") {
    for (const auto& name : task_names()) {
        // The WordNet tasks' valid/test split is fixed (not seeded) and a training
        // key may have several senses: tests/test_wordnet.cpp checks their contract.
        if (name.rfind("wordnet-", 0) == 0) continue;
        INFO("task " << name);
        auto a = make_task(name, 60, 20, 20, 7);
        auto b = make_task(name, 60, 20, 20, 7);
        auto c = make_task(name, 60, 20, 20, 8);
        CHECK(a.name == name);
        CHECK(a.train.size() == 60);
        CHECK(a.valid.size() == 20);
        CHECK(a.test.size() == 20);
        CHECK(same_examples(a.train, b.train));
        CHECK(same_examples(a.valid, b.valid));
        CHECK(same_examples(a.test, b.test));
        CHECK_FALSE(same_examples(a.train, c.train));
        CHECK_FALSE(same_examples(a.test, c.test));

        // The test split does not depend on how much training data was asked for.
        CHECK(same_examples(make_task(name, 5, 3, 20, 7).test, a.test));

        std::set<std::string> sources;
        for (const auto* split : {&a.train, &a.valid, &a.test})
            for (const auto& ex : *split) {
                sources.insert(ex.source);
                REQUIRE_FALSE(ex.references.empty());
                CHECK(ex.references[0] == ex.target);
            }
        CHECK(sources.size() == 100);  // no example shared between or within splits
    }
}

TEST_CASE("make_task rejects unknown names and lists the valid ones", "[datasets]") {
    try {
        make_task("translate", 1, 1, 1, 0);
        FAIL("expected std::invalid_argument");
    } catch (const std::invalid_argument& e) {
        std::string msg = e.what();
        INFO(msg);
        CHECK(msg.find("\"translate\"") != std::string::npos);
        for (const char* valid : {"e2e", "classify", "reverse", "sort", "add"}) CHECK(msg.find(valid) != std::string::npos);
    }
}

TEST_CASE("e2e references realize exactly their MR and test venues are unseen", "[datasets]") {
    auto task = make_task("e2e", 400, 100, 100, 3);
    CHECK(task.metric_name() == "bleu");

    std::set<std::string> train_names;
    for (const auto& ex : task.train)
        for (const char* slot : {"name", "near"})
            if (ex.slots.count(slot)) train_names.insert(ex.slots.at(slot));
    std::vector<std::string> refs;
    std::vector<std::map<std::string, std::string>> mrs;
    ByteTokenizer bytes;
    for (const auto* split : {&task.train, &task.valid, &task.test})
        for (const auto& ex : *split) {
            CHECK(ex.source == format_mr(ex.slots));
            CHECK(ex.slots.count("name") == 1);
            CHECK(ex.slots.size() >= 2);
            // Fits a byte-level model with 128 positions without truncation.
            CHECK(ex.source.size() + kSeparator.size() + ex.target.size() <= kE2EMaxBytes);
            CHECK(encode_example(ex, bytes, 1000).tokens.size() <= 128);
            for (const auto& ref : ex.references) {
                refs.push_back(ref);
                mrs.push_back(ex.slots);
            }
            if (split != &task.train) {
                CHECK(train_names.count(ex.slots.at("name")) == 0);
                if (ex.slots.count("near")) CHECK(train_names.count(ex.slots.at("near")) == 0);
            }
        }
    auto ser = slot_error_rate(refs, mrs, e2e_lexicon());
    CHECK(ser.missing == 0);
    CHECK(ser.invented == 0);
    CHECK(refs.size() > 2 * (task.train.size() + task.valid.size() + task.test.size()));  // mostly 3 per MR

    // The metric notices a wrong value.
    const auto& ex = task.test[0];
    CHECK(slot_error_rate({ex.target + " It is adults only and serves Italian food."}, {ex.slots}, e2e_lexicon()).rate > 0);
}

TEST_CASE("format_mr uses the E2E slot order", "[datasets]") {
    CHECK(format_mr({{"near", "Red Fox"}, {"food", "French"}, {"name", "Blue Spice"}, {"customer rating", "low"}}) ==
          "name[Blue Spice], food[French], customer rating[low], near[Red Fox]");
    CHECK_THROWS_AS(format_mr({{"colour", "red"}}), std::invalid_argument);
}

TEST_CASE("restaurant_corpus is deterministic and never names held-out venues", "[datasets]") {
    auto a = restaurant_corpus(300, 5);
    CHECK(a == restaurant_corpus(300, 5));
    CHECK(a != restaurant_corpus(300, 6));
    CHECK(std::count(a.begin(), a.end(), '\n') == 300);

    auto task = make_task("e2e", 0, 50, 50, 11);
    for (const auto* split : {&task.valid, &task.test})
        for (const auto& ex : *split) CHECK(a.find(ex.slots.at("name")) == std::string::npos);
}

TEST_CASE("classify labels are the majority polarity of the review's clauses", "[datasets]") {
    auto task = make_task("classify", 300, 50, 50, 9);
    CHECK(task.metric_name() == "accuracy");
    CHECK(task.labels == std::vector<std::string>{"negative", "positive"});

    // An independent oracle: each clause has one polarity adjective, flipped by a preceding "not".
    const std::set<std::string> positive = {"excellent", "great", "wonderful", "lovely", "superb", "fantastic"};
    const std::set<std::string> negative = {"awful", "terrible", "poor", "disappointing", "dreadful", "bad"};
    size_t n_positive = 0;
    for (const auto& ex : task.train) {
        INFO(ex.source);
        auto words = words_of(ex.source);
        int votes = 0, clauses = 0;
        for (size_t i = 0; i < words.size(); ++i) {
            bool pos = positive.count(words[i]) > 0, neg = negative.count(words[i]) > 0;
            if (!pos && !neg) continue;
            bool negated = i > 0 && words[i - 1] == "not";
            votes += (pos != negated) ? 1 : -1;
            ++clauses;
        }
        CHECK((clauses == 1 || clauses == 3));
        CHECK(ex.target == (votes > 0 ? "positive" : "negative"));
        n_positive += ex.target == "positive";
    }
    CHECK(n_positive > 100);  // both labels are well represented
    CHECK(n_positive < 200);
}

TEST_CASE("algorithmic targets are correct", "[datasets]") {
    auto reverse = make_task("reverse", 100, 10, 10, 1);
    CHECK(reverse.metric_name() == "exact_match");
    for (const auto& ex : reverse.train) {
        auto s = unspace(ex.source);
        CHECK(unspace(ex.target) == std::string(s.rbegin(), s.rend()));
        CHECK(s.size() >= 3);
        CHECK(s.size() <= 10);
    }
    for (const auto& ex : make_task("sort", 100, 10, 10, 1).train) {
        auto s = unspace(ex.source);
        std::sort(s.begin(), s.end());
        CHECK(unspace(ex.target) == s);
    }
    for (const auto& ex : make_task("add", 100, 10, 10, 1).train) {
        auto plus = ex.source.find(" + ");
        REQUIRE(plus != std::string::npos);
        long a = std::stol(ex.source.substr(0, plus)), b = std::stol(ex.source.substr(plus + 3));
        CHECK(ex.target == std::to_string(a + b));
    }
}

TEST_CASE("format_example joins source, separator and target", "[datasets]") {
    Example ex{"a b c", "c b a", {"c b a"}, {}, {}};
    CHECK(format_example(ex) == "a b c => c b a");
}
