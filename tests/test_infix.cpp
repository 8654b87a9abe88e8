// Infix tuning (peft/prefix.cpp, method "infix"; Li & Liang 2021, "Prefixing
// vs Infixing"): the hidden-state prefix's L*n*d vectors placed between each
// row's source and target, as the sequence [x; INFIX; sep; y]. The reference
// below builds that sequence literally, with a KV cache: the base runs x, the
// infix's keys and values (its vectors through each layer's frozen LN1 and
// K/V projections) are appended to the cache, and the base runs [sep; y] on.
#include <catch2/catch.hpp>

#include "nn/generate.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"
#include "peft/serve.h"
#include "tests/peft_testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using namespace peftlab::peft_testing;
using Catch::Contains;

namespace {

constexpr int64_t kVocab = 48;

AdapterOptions infix_options(int64_t n, const std::string& layers) {
    AdapterOptions o;
    o.n = n;
    o.layers = layers;
    o.init = "random";
    o.seed = 5;
    return o;
}

// Logits of [x; INFIX; sep; y] at the columns of sep and y, where the source
// is tokens[0, s) (its last token the separator) and INFIX sits before it.
Tensor literal_infix(GPT& base, const Adapter& infix, const std::vector<int32_t>& tokens, int64_t s) {
    NoGradGuard no_grad;
    const int64_t C = base.config().d_model, n = infix.options().n;
    KVCache cache;
    base.set_hooks(nullptr);
    base.forward(single_row(std::vector<int32_t>(tokens.begin(), tokens.begin() + s - 1)), &cache);
    for (const auto& [name, vectors] : infix.parameters()) {  // "blocks.<l>.prefix.hidden" [n, C]
        const int layer = std::stoi(name.substr(std::string("blocks.").size()));
        const Block& blk = *base.blocks[size_t(layer)];
        const Tensor h = blk.ln1.forward(vectors);
        cache.layers[size_t(layer)].append(reshape(linear(h, blk.attn.k_proj.weight, blk.attn.k_proj.bias), {1, n, C}),
                                           reshape(linear(h, blk.attn.v_proj.weight, blk.attn.v_proj.bias), {1, n, C}),
                                           Tensor::ones({1, n}));
    }
    // Layers without vectors get n invalid columns, so every layer's cache has the same length.
    for (int l = 0; l < base.config().n_layers; ++l)
        if (cache.layers[size_t(l)].length == s - 1)
            cache.layers[size_t(l)].append(Tensor::zeros({1, n, C}), Tensor::zeros({1, n, C}), Tensor::zeros({1, n}));
    ModelInput rest = single_row(std::vector<int32_t>(tokens.begin() + s - 1, tokens.end()));
    rest.positions.clear();
    for (int64_t t = s - 1; t < int64_t(tokens.size()); ++t) rest.positions.push_back(int32_t(t));  // positions keep
    return base.forward(rest, &cache);
}

}  // namespace

TEST_CASE("infix: the source before its last token sees no infix; later columns equal [x; INFIX; sep; y] built "
          "literally with a KV cache",
          "[peft][infix]") {
    GPT base(tiny_config(3), 31);
    sharpen(base, 3.f);
    Rng rng(32);
    const std::vector<int32_t> tokens = random_tokens(rng, 9, kVocab);
    for (const char* layers : {"all", "0,2"}) {
        auto infix = make_adapter("infix", infix_options(3, layers));
        infix->attach(base);
        for (int64_t s : {2, 4, 8}) {
            INFO("layers " << layers << ", source length " << s);
            ModelInput in = single_row(tokens);
            in.source_len = {int32_t(s)};
            const Tensor got = logits_of(base, infix.get(), in);
            const Tensor plain = logits_of(base, nullptr, in);
            CHECK(max_diff_rows(got, 0, 0, plain, 0, 0, s - 1) < 1e-5f);
            const Tensor literal = literal_infix(base, *infix, tokens, s);
            const int64_t rest = int64_t(tokens.size()) - (s - 1);
            CHECK(max_diff_rows(got, 0, s - 1, literal, 0, 0, rest) < 1e-5f);
            CHECK(max_diff_rows(got, 0, s - 1, plain, 0, s - 1, rest) > 1e-3f);  // the infix does act
        }
    }
}

TEST_CASE("infix: with a source of at most one token it is the hidden-state prefix; a row alone equals the row in "
          "a padded batch",
          "[peft][infix]") {
    GPT base(tiny_config(3), 33);
    sharpen(base, 3.f);
    auto infix = make_adapter("infix", infix_options(2, "all"));
    auto prefix = make_adapter("prefix", infix_options(2, "all"));
    infix->attach(base);
    prefix->attach(base);
    for (size_t i = 0; i < infix->parameters().size(); ++i)  // same names, same seed: the same vectors
        REQUIRE(max_diff(infix->parameters()[i].second, prefix->parameters()[i].second) == 0.f);
    Rng rng(34);
    const std::vector<std::vector<int32_t>> rows = {random_tokens(rng, 7, kVocab), random_tokens(rng, 4, kVocab),
                                                    random_tokens(rng, 6, kVocab)};
    for (int32_t s : {0, 1}) {
        ModelInput in = single_row(rows[0]);
        in.source_len = {s};
        CHECK(max_diff(logits_of(base, infix.get(), in), logits_of(base, prefix.get(), in)) < 1e-6f);
    }
    const std::vector<int32_t> source = {3, 1, 5};
    for (bool left : {true, false}) {
        INFO((left ? "left" : "right") << "-padded");
        ModelInput batch = padded_batch(rows, left);
        for (size_t b = 0; b < rows.size(); ++b)
            batch.source_len.push_back(int32_t(first_real(batch, int64_t(b))) + source[b]);
        const Tensor mixed = logits_of(base, infix.get(), batch);
        for (size_t b = 0; b < rows.size(); ++b) {
            ModelInput alone = single_row(rows[b]);
            alone.source_len = {source[b]};
            CHECK(max_diff_rows(mixed, int64_t(b), first_real(batch, int64_t(b)), logits_of(base, infix.get(), alone),
                                0, 0, int64_t(rows[b].size())) < 1e-5f);
        }
    }
}

TEST_CASE("infix: cached greedy decoding continues the prompt as the uncached forward predicts", "[peft][infix]") {
    GPT base(tiny_config(2), 35);
    sharpen(base, 3.f);
    auto infix = make_adapter("infix", infix_options(3, "all"));
    infix->activate(base);
    perturb(infix->parameters(), 36, 1.f);
    Rng rng(37);
    const std::vector<std::vector<int32_t>> prompts = {random_tokens(rng, 5, kVocab), random_tokens(rng, 3, kVocab)};
    GenerateOptions g;
    g.max_new_tokens = 6;
    const auto generated = generate(base, prompts, g);
    for (size_t r = 0; r < prompts.size(); ++r) {
        // The prompt is the source: the infix sits before its last token.
        std::vector<int32_t> seq = prompts[r];
        seq.insert(seq.end(), generated[r].begin(), generated[r].end() - 1);
        ModelInput in = single_row(seq);
        in.source_len = {int32_t(prompts[r].size())};
        const Tensor logits = logits_of(base, infix.get(), in);
        for (size_t i = 0; i < generated[r].size(); ++i) {
            const float* row = logits.data() + (prompts[r].size() - 1 + i) * size_t(kVocab);
            INFO("prompt " << r << ", new token " << i);
            CHECK(int32_t(std::max_element(row, row + kVocab) - row) == generated[r][i]);
        }
    }
}

TEST_CASE("infix: refused where it has no counterpart (PEFT export, the server's prefix cache); bad source lengths "
          "are named",
          "[peft][infix]") {
    GPT base(tiny_config(2), 38);
    auto infix = make_adapter("infix", infix_options(2, "all"));
    infix->attach(base);
    TempDir tmp;
    CHECK_THROWS_WITH(export_hf((tmp.dir / "hf").string(), *infix),
                      Contains("method 'infix' has no Hugging Face PEFT counterpart"));
    Server cached(base, ServerOptions{});
    CHECK_THROWS_WITH(cached.add_adapter("a", *infix), Contains("adapter 'a' (infix)") && Contains("prefix_cache = false"));
    ServerOptions uncached;
    uncached.prefix_cache = false;
    Server server(base, uncached);
    CHECK_NOTHROW(server.add_adapter("a", *infix));

    ModelInput in = single_row({1, 2, 3});
    in.source_len = {4};
    CHECK_THROWS_WITH(base.forward(in), Contains("source_len[0] = 4 is outside [0, T = 3]"));
    in.source_len = {1, 1};
    CHECK_THROWS_WITH(base.forward(in), Contains("2 source lengths for B = 1"));
}
