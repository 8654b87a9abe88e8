#include "nn/presets.h"

#include <stdexcept>

#include <fmt/format.h>

namespace peftlab {

namespace {

GPTConfig dims(int64_t d, int L, int H, int64_t F, int64_t T) {
    GPTConfig c;
    c.d_model = d, c.n_layers = L, c.n_heads = H, c.d_ff = F, c.max_seq = T;
    return c;
}

// GPT-2 as released: 50257 tokens, 1024 positions, d_ff = 4d, tied
// embeddings (124,439,808 parameters for gpt2).
GPTConfig gpt2(int64_t d, int L, int H) {
    GPTConfig c = dims(d, L, H, 4 * d, 1024);
    c.vocab = 50257;
    c.tie_embeddings = true;
    return c;
}

}  // namespace

const std::vector<ModelPreset>& model_presets() {
    static const std::vector<ModelPreset> presets = {
        {"tiny", dims(64, 2, 4, 256, 48), "tests and smoke runs"},
        {"demo", dims(128, 4, 4, 512, 48), "make demo: methods separate within minutes on 2 cores"},
        {"small", dims(256, 4, 4, 1024, 128), "longer runs; bench's default config"},
        {"medium", dims(512, 8, 8, 2048, 256), "bench's larger config"},
        {"gpt2", gpt2(768, 12, 12), "GPT-2 small (124M), analytic report"},
        {"gpt2-medium", gpt2(1024, 24, 16), "GPT-2 medium (355M), analytic report"},
        {"gpt2-large", gpt2(1280, 36, 20), "GPT-2 large (774M), analytic report"},
        {"gpt2-xl", gpt2(1600, 48, 25), "GPT-2 XL (1.5B), analytic report"},
    };
    return presets;
}

std::vector<std::string> model_preset_names() {
    std::vector<std::string> names;
    for (const ModelPreset& p : model_presets()) names.push_back(p.name);
    return names;
}

GPTConfig model_preset(const std::string& name) {
    for (const ModelPreset& p : model_presets())
        if (p.name == name) return p.config;
    std::string known;
    for (const std::string& n : model_preset_names()) known += (known.empty() ? "" : ", ") + n;
    throw std::invalid_argument(fmt::format("unknown preset '{}' (known: {})", name, known));
}

}  // namespace peftlab
