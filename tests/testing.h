#pragma once
// Helpers shared by the test suites: the tests' small GPT, sharpened weights,
// random and padded inputs, logit comparisons, and a scratch directory.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <unistd.h>

#include "nn/gpt.h"

namespace peftlab::testing {

// The tests' small GPT: C = kSmallC, 4 heads of 8, F 64. Each suite picks the
// vocabulary, the context (its length limits are tested against it) and the depth.
inline constexpr int64_t kSmallC = 32;
inline GPTConfig small_gpt(int64_t vocab, int64_t max_seq, int layers = 2) {
    GPTConfig c;
    c.vocab = vocab;
    c.d_model = kSmallC;
    c.n_layers = layers;
    c.n_heads = 4;
    c.d_ff = 64;
    c.max_seq = max_seq;
    return c;
}

// Scales every matrix so that attention, prefixes and deltas move the logits
// by much more than float rounding (at the init std 0.02 their effect is tiny),
// and greedy continuations depend on the context instead of mostly repeating
// the last token.
inline void sharpen(GPT& model, float factor = 5.f) {
    for (auto& [name, t] : model.named_parameters())
        if (t.ndim() == 2)
            for (int64_t i = 0; i < t.numel(); ++i) Tensor(t).data()[i] *= factor;
}

inline std::unique_ptr<GPT> sharp_model(const GPTConfig& cfg, uint64_t seed, float factor) {
    auto model = std::make_unique<GPT>(cfg, seed);
    sharpen(*model, factor);
    return model;
}

inline std::vector<int32_t> random_tokens(Rng& rng, int64_t n, int64_t vocab) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(rng.below(uint32_t(vocab)));
    return t;
}

inline ModelInput single_row(const std::vector<int32_t>& tokens) {
    ModelInput in;
    in.B = 1;
    in.T = int64_t(tokens.size());
    in.tokens = tokens;
    return in;
}

// Rows padded to the longest one (plus `extra` slots), on the left (real
// tokens keep positions 0..len-1) or on the right. Padding holds token 0.
inline ModelInput padded_batch(const std::vector<std::vector<int32_t>>& rows, bool left, int64_t extra = 0) {
    ModelInput in;
    in.B = int64_t(rows.size());
    for (auto& r : rows) in.T = std::max(in.T, int64_t(r.size()));
    in.T += extra;
    const size_t T = size_t(in.T);
    in.tokens.assign(rows.size() * T, 0);
    in.positions.assign(rows.size() * T, 0);
    in.valid.assign(rows.size() * T, 0);
    for (size_t b = 0; b < rows.size(); ++b) {
        const size_t start = left ? T - rows[b].size() : 0;
        for (size_t i = 0; i < rows[b].size(); ++i) {
            in.tokens[b * T + start + i] = rows[b][i];
            in.positions[b * T + start + i] = int32_t(i);
            in.valid[b * T + start + i] = 1;
        }
    }
    return in;
}

// Largest |a - b| between T positions of row a_row of a [B, Ta, V] starting at
// column a_col and those of row b_row of b [B', Tb, V] starting at b_col.
inline float max_diff_rows(const Tensor& a, int64_t a_row, int64_t a_col, const Tensor& b, int64_t b_row,
                           int64_t b_col, int64_t T) {
    const int64_t V = a.dim(2);
    REQUIRE(b.dim(2) == V);
    float m = 0.f;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t v = 0; v < V; ++v) {
            float x = a.data()[(a_row * a.dim(1) + a_col + t) * V + v];
            float y = b.data()[(b_row * b.dim(1) + b_col + t) * V + v];
            m = std::max(m, std::fabs(x - y));
        }
    return m;
}

inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() &&
           (a.numel() == 0 || std::memcmp(a.data(), b.data(), size_t(a.numel()) * sizeof(float)) == 0);
}

// A fresh directory under the system temp dir for one test, removed with
// everything in it.
struct TempDir {
    std::filesystem::path dir;

    TempDir() {
        static int serial = 0;
        dir = std::filesystem::temp_directory_path() / fmt::format("peftlab_test_{}_{}", ::getpid(), serial++);
        std::filesystem::remove_all(dir);
        std::filesystem::create_directories(dir);
    }
    ~TempDir() {
        namespace fs = std::filesystem;
        std::error_code ec;  // a test may have left the directory read-only
        fs::permissions(dir, fs::perms::owner_all, fs::perm_options::add, ec);
        fs::remove_all(dir, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;

    std::string path(std::string_view name) const { return (dir / name).string(); }

    // Writes `bytes` to `name` and returns its path.
    std::string file(std::string_view name, std::string_view bytes) const {
        std::ofstream(path(name), std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
        return path(name);
    }

    // Names of the directory's entries, sorted: temp files left behind would show up here.
    std::vector<std::string> entries() const {
        std::vector<std::string> names;
        for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
        std::sort(names.begin(), names.end());
        return names;
    }
};

}  // namespace peftlab::testing
