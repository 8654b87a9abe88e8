// Batching: LM windows, conditional examples with loss masks, prompts, and the sampler.
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <set>

#include "datasets/batch.h"

using namespace peftlab::data;

namespace {

// Row r of a [B, T] buffer.
template <class V>
V row(const V& buf, int T, int r) {
    return V(buf.begin() + size_t(r) * T, buf.begin() + size_t(r + 1) * T);
}

std::vector<int32_t> ids(const std::string& s) { return std::vector<int32_t>(s.begin(), s.end()); }

std::vector<int32_t> concat(std::initializer_list<std::vector<int32_t>> parts) {
    std::vector<int32_t> out;
    for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
}

}  // namespace

TEST_CASE("encode_lines frames each non-blank line with BOS and EOS", "[datasets]") {
    ByteTokenizer tok;
    CHECK(encode_lines(tok, "ab\n\n  \nc\n") == std::vector<int32_t>{1, 'a', 'b', 2, 1, 'c', 2});
    CHECK(encode_lines(tok, "no newline") == concat({{1}, ids("no newline"), {2}}));
    // A byte the tokenizer refuses: the line by number (blank lines counted) and quoted.
    CHECK_THROWS_WITH(encode_lines(tok, "ok\n\nbad \x01 here\n"),
                      "line 3 of the text (\"bad \\u0001 here\"): ByteTokenizer::encode: byte 0x01 at position 4 "
                      "collides with a special id (0=PAD, 1=BOS, 2=EOS); text must not contain these control bytes");
}

TEST_CASE("make_lm_batch cuts shifted windows", "[datasets]") {
    std::vector<int32_t> stream(50);
    std::iota(stream.begin(), stream.end(), 100);
    auto b = make_lm_batch(stream, {0, 10, 45}, 4);
    CHECK(b.B == 3);
    CHECK(b.T == 4);
    CHECK(row(b.tokens, 4, 1) == std::vector<int32_t>{110, 111, 112, 113});
    CHECK(row(b.targets, 4, 1) == std::vector<int32_t>{111, 112, 113, 114});
    CHECK(row(b.targets, 4, 2) == std::vector<int32_t>{146, 147, 148, 149});  // last window ends at the stream's end
    CHECK(row(b.positions, 4, 2) == std::vector<int32_t>{0, 1, 2, 3});
    CHECK(std::all_of(b.valid.begin(), b.valid.end(), [](uint8_t v) { return v == 1; }));
    CHECK_THROWS_AS(make_lm_batch(stream, {46}, 4), std::out_of_range);

    peftlab::Rng r1(3), r2(3);
    auto x = make_lm_batch(stream, 8, 10, r1), y = make_lm_batch(stream, 8, 10, r2);
    CHECK(x.tokens == y.tokens);
    for (int r = 0; r < 8; ++r) {
        auto toks = row(x.tokens, 10, r), tgts = row(x.targets, 10, r);
        CHECK(tgts.back() == toks.back() + 1);  // contiguous window inside the stream
        CHECK(toks.front() >= 100);
        CHECK(tgts.back() <= 149);
    }
    CHECK_THROWS_AS(make_lm_batch(stream, 1, 50, r1), std::invalid_argument);
}

TEST_CASE("make_conditional_batch counts only target tokens and EOS", "[datasets]") {
    ByteTokenizer tok;
    const std::vector<Example> examples = {{"ab", "c", {"c"}, {}, {}}, {"wxyz", "uv", {"uv"}, {}, {}}};
    // Framed: BOS a b " => " c EOS (9 tokens, 8 inputs); BOS w x y z " => " u v EOS (12 tokens, 11 inputs).
    const auto seq0 = concat({{1}, ids("ab => c"), {2}});
    const auto seq1 = concat({{1}, ids("wxyz => uv"), {2}});

    SECTION("right padding") {
        auto b = make_conditional_batch(examples, {0, 1}, tok, 64, PadSide::Right);
        REQUIRE(b.B == 2);
        REQUIRE(b.T == 11);
        CHECK(row(b.tokens, 11, 0) == concat({std::vector<int32_t>(seq0.begin(), seq0.end() - 1), {0, 0, 0}}));
        // Position 6 (the separator's last space) predicts "c", position 7 ("c") predicts EOS.
        CHECK(row(b.targets, 11, 0) == std::vector<int32_t>{-1, -1, -1, -1, -1, -1, 'c', 2, -1, -1, -1});
        CHECK(row(b.valid, 11, 0) == std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0});
        CHECK(row(b.positions, 11, 0) == std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0});
        CHECK(row(b.tokens, 11, 1) == std::vector<int32_t>(seq1.begin(), seq1.end() - 1));
        CHECK(row(b.targets, 11, 1) == std::vector<int32_t>{-1, -1, -1, -1, -1, -1, -1, -1, 'u', 'v', 2});
    }
    SECTION("left padding") {
        auto b = make_conditional_batch(examples, {0, 1}, tok, 64, PadSide::Left);
        REQUIRE(b.T == 11);
        CHECK(row(b.tokens, 11, 0) == concat({{0, 0, 0}, std::vector<int32_t>(seq0.begin(), seq0.end() - 1)}));
        CHECK(row(b.targets, 11, 0) == std::vector<int32_t>{-1, -1, -1, -1, -1, -1, -1, -1, -1, 'c', 2});
        CHECK(row(b.valid, 11, 0) == std::vector<uint8_t>{0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1});
        CHECK(row(b.positions, 11, 0) == std::vector<int32_t>{0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7});
        CHECK(row(b.positions, 11, 1) == std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
    }
    SECTION("long sources lose tokens from their left") {
        // max_len 9: BOS + " => " + "uv" + EOS take 8 of the 10 framed tokens, so 2 source tokens stay.
        auto e = encode_example(examples[1], tok, 9);
        CHECK(e.tokens == concat({{1}, ids("yz => uv"), {2}}));
        CHECK(e.target_start == 7);
        auto b = make_conditional_batch(examples, {1, 0}, tok, 9, PadSide::Right);
        CHECK(b.T == 9);
        CHECK(row(b.tokens, 9, 0) == concat({{1}, ids("yz => uv")}));
        CHECK(encode_example(examples[1], tok, 7).tokens == concat({{1}, ids(" => uv"), {2}}));  // no source left
        CHECK_THROWS_AS(encode_example(examples[1], tok, 6), std::invalid_argument);         // target does not fit
    }
    CHECK_THROWS_AS(make_conditional_batch(examples, {2}, tok, 64, PadSide::Right), std::out_of_range);
}

TEST_CASE("make_conditional_batch works with a word tokenizer", "[datasets]") {
    const std::vector<Example> examples = {{"a b c", "c b a", {"c b a"}, {}, {}}};
    auto tok = WordTokenizer::build(format_example(examples[0]), 100);
    auto b = make_conditional_batch(examples, {0}, tok, 32, PadSide::Right);
    // BOS a b c = > c b a EOS: 10 tokens, 9 inputs, the last 4 targets count.
    REQUIRE(b.T == 9);
    CHECK(std::count(b.targets.begin(), b.targets.end(), -1) == 5);
    std::vector<int32_t> counted;
    for (int32_t t : b.targets)
        if (t >= 0) counted.push_back(t);
    CHECK(tok.decode(counted) == "c b a");
    CHECK(counted.back() == tok.eos_id());
}

TEST_CASE("make_prompt_batch left-pads source and separator for generation", "[datasets]") {
    ByteTokenizer tok;
    const std::vector<Example> examples = {{"ab", "c", {"c"}, {}, {}}, {"wxyz", "uv", {"uv"}, {}, {}}};
    auto b = make_prompt_batch(examples, {0, 1}, tok, 64);
    REQUIRE(b.T == 9);  // BOS wxyz " => "
    CHECK(row(b.tokens, 9, 0) == concat({{0, 0}, {1}, ids("ab => ")}));
    CHECK(row(b.tokens, 9, 1) == concat({{1}, ids("wxyz => ")}));
    CHECK(row(b.positions, 9, 0) == std::vector<int32_t>{0, 0, 0, 1, 2, 3, 4, 5, 6});
    CHECK(row(b.valid, 9, 0) == std::vector<uint8_t>{0, 0, 1, 1, 1, 1, 1, 1, 1});
    CHECK(std::all_of(b.targets.begin(), b.targets.end(), [](int32_t t) { return t == -1; }));

    auto cut = make_prompt_batch(examples, {1}, tok, 7);  // BOS + 2 source bytes + 4 separator bytes
    CHECK(cut.tokens == concat({{1}, ids("yz => ")}));
    CHECK(make_prompt_batch(examples, {1}, tok, 5).tokens == concat({{1}, ids(" => ")}));
    CHECK_THROWS_AS(make_prompt_batch(examples, {1}, tok, 4), std::invalid_argument);
}

TEST_CASE("BatchSampler visits every index once per epoch in a seeded order", "[datasets]") {
    BatchSampler s(10, 4, 123);
    CHECK(s.batches_per_epoch() == 3);
    std::vector<size_t> epoch0, epoch1;
    for (int i = 0; i < 3; ++i) {
        CHECK(s.epoch() == 0);
        auto b = s.next();
        CHECK(b.size() == (i < 2 ? 4u : 2u));
        epoch0.insert(epoch0.end(), b.begin(), b.end());
    }
    CHECK(s.epoch() == 1);
    for (int i = 0; i < 3; ++i) {
        auto b = s.next();
        epoch1.insert(epoch1.end(), b.begin(), b.end());
    }
    auto sorted0 = epoch0, sorted1 = epoch1;
    std::sort(sorted0.begin(), sorted0.end());
    std::sort(sorted1.begin(), sorted1.end());
    std::vector<size_t> all(10);
    std::iota(all.begin(), all.end(), size_t{0});
    CHECK(sorted0 == all);
    CHECK(sorted1 == all);
    CHECK(epoch0 != epoch1);  // reshuffled
    CHECK(epoch0 != all);     // shuffled at all

    BatchSampler same(10, 4, 123), other(10, 4, 124);
    CHECK(same.next() == std::vector<size_t>(epoch0.begin(), epoch0.begin() + 4));
    CHECK(other.next() != std::vector<size_t>(epoch0.begin(), epoch0.begin() + 4));

    BatchSampler dropping(10, 4, 123, true);
    CHECK(dropping.batches_per_epoch() == 2);
    dropping.next();
    dropping.next();
    CHECK(dropping.epoch() == 1);
    CHECK(dropping.next().size() == 4);

    CHECK_THROWS_AS(BatchSampler(0, 4, 1), std::invalid_argument);
    CHECK_THROWS_AS(BatchSampler(3, 4, 1, true), std::invalid_argument);
}
