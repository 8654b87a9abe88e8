// Writes the input half of the PyTorch parity fixture: a tiny GPT's parameters and one fixed
// batch, in one safetensors file that tools/torch_reference.py reads to compute the expected
// logits, loss, gradients and AdamW losses (tests/test_parity.cpp compares against them).
//
//   write_parity_model <out.safetensors>
//
// Tensors: every parameter under its dotted name ("blocks.0.attn.q_proj.weight"), plus the
// batch as floats (ids are small integers, exact in float32):
//   input.tokens  [B, T]  token ids
//   input.targets [B, T]  next-token ids, -1 = not counted in the loss
//   input.valid   [B, T]  1 = real token, 0 = padding (never attended)
// Metadata: "config" = GPTConfig::to_json(), "seed".
#include <cmath>
#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/rng.h"
#include "nn/gpt.h"
#include "nn/safetensors.h"

using namespace peftlab;

namespace {

constexpr uint64_t kSeed = 1234;
constexpr int64_t kB = 2, kT = 8;
constexpr int64_t kRealTokensRow1 = 5;  // row 1 is right-padded after 5 real tokens

GPTConfig parity_config() {
    GPTConfig c;
    c.vocab = 64;
    c.d_model = 32;
    c.n_layers = 2;
    c.n_heads = 4;
    c.d_ff = 64;
    c.max_seq = 16;
    c.dropout = 0.f;
    c.tie_embeddings = false;
    return c;
}

// GPT-2's init (std 0.02, zero biases, unit LayerNorm) gives near-uniform attention and
// logits, under which a missing 1/sqrt(Dh), a swapped gamma/beta or an ignored bias would
// barely move the numbers. Redrawing every parameter at unit-ish scale makes each of them
// visible in the logits and gradients.
void redraw_parameters(GPT& model, Rng& rng) {
    for (auto& [name, p] : model.named_parameters()) {
        const bool is_ln = name.find("ln") != std::string::npos;  // ln1, ln2, ln_f
        const bool is_bias = name.ends_with(".bias");
        float* d = p.data();
        for (int64_t i = 0; i < p.numel(); ++i) {
            if (is_ln && !is_bias) d[i] = 1.f + 0.2f * rng.normal();          // gamma around 1
            else if (is_bias) d[i] = 0.1f * rng.normal();
            else if (name.starts_with("wte") || name.starts_with("wpe")) d[i] = 0.5f * rng.normal();
            else d[i] = rng.normal() / std::sqrt(float(p.dim(1)));           // [out, in]: unit-variance outputs
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    const std::string usage = fmt::format(
        "usage: {} OUT.safetensors\n"
        "Writes the PyTorch parity fixture: a small GPT, a batch and its loss inputs\n"
        "(tools/torch_reference.py reads it; `make fixtures` runs both).\n",
        argv[0]);
    if (argc == 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
        fmt::print("{}", usage);
        return 0;
    }
    if (argc != 2 || argv[1][0] == '-') {  // a flag is never meant as a file name
        fmt::print(stderr, "{}", usage);
        return 2;
    }
    try {
        const GPTConfig cfg = parity_config();
        GPT model(cfg, kSeed);
        Rng rng(kSeed + 1);
        redraw_parameters(model, rng);

        // Each row is a random sequence of T+1 ids; targets are the sequence shifted by one.
        std::vector<float> tokens(kB * kT), targets(kB * kT), valid(kB * kT, 1.f);
        for (int64_t b = 0; b < kB; ++b) {
            std::vector<int32_t> seq(kT + 1);
            for (auto& id : seq) id = int32_t(rng.below(uint32_t(cfg.vocab)));
            for (int64_t t = 0; t < kT; ++t) {
                tokens[b * kT + t] = float(seq[t]);
                targets[b * kT + t] = float(seq[t + 1]);
            }
        }
        // A few ignored targets among real tokens (prompt positions in fine-tuning).
        targets[0 * kT + 0] = -1.f;
        targets[0 * kT + 3] = -1.f;
        targets[1 * kT + 1] = -1.f;
        // Row 1 right-padded. Causality already hides padding from real tokens; the padding
        // mask shows in the padding positions' own logits (compared too), which must come
        // from attending to the real tokens only.
        for (int64_t t = kRealTokensRow1; t < kT; ++t) {
            valid[1 * kT + t] = 0.f;
            targets[1 * kT + t] = -1.f;
        }

        std::vector<StTensorRef> refs;
        for (auto& [name, p] : model.named_parameters()) refs.push_back({name, p.shape(), p.data()});
        refs.push_back({"input.tokens", {kB, kT}, tokens.data()});
        refs.push_back({"input.targets", {kB, kT}, targets.data()});
        refs.push_back({"input.valid", {kB, kT}, valid.data()});
        std::map<std::string, std::string> meta{{"config", cfg.to_json().dump()},
                                                {"seed", std::to_string(kSeed)}};
        save_safetensors(argv[1], refs, meta);
        fmt::print("wrote {}: {} parameters in {} tensors, batch [{}, {}]\n", argv[1], model.num_params(),
                   model.named_parameters().size(), kB, kT);
    } catch (const std::exception& e) {
        fmt::print(stderr, "write_parity_model: {}\n", e.what());
        return 1;
    }
    return 0;
}
