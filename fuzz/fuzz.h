#pragma once
// Shared pieces of the libFuzzer targets (fuzz/*.cpp, one target per file) and
// of the seed writer (tools/write_fuzz_seeds.cpp), so that the seeds are in
// exactly the layout the targets read.
//
// A target gets one byte string. Readers that take several files (an adapter
// directory: adapter_config.json + adapter_model.safetensors) get them packed:
// records of u32 little-endian length + that many bytes, in a fixed order; a
// record cut short by the end of the input is truncated there, a missing one
// is empty. libFuzzer's mutations then reach every file and the split points.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "nn/gpt.h"

namespace peftlab::fuzz {

// Splits `data` into `n` records (see above).
inline std::vector<std::string> unpack(const uint8_t* data, size_t size, size_t n) {
    std::vector<std::string> out(n);
    size_t pos = 0;
    for (size_t i = 0; i < n && pos < size; ++i) {
        uint32_t len = 0;
        const size_t have = std::min<size_t>(4, size - pos);
        std::memcpy(&len, data + pos, have);  // little-endian host (safetensors.cpp asserts it)
        pos += have;
        const size_t take = std::min<size_t>(len, size - pos);
        out[i].assign(reinterpret_cast<const char*>(data + pos), take);
        pos += take;
    }
    return out;
}

inline std::string pack(const std::vector<std::string>& records) {
    std::string out;
    for (const std::string& r : records) {
        const uint32_t len = uint32_t(r.size());
        out.append(reinterpret_cast<const char*>(&len), 4);
        out += r;
    }
    return out;
}

// A directory of this process's own under $TMPDIR (or /tmp), removed at exit.
inline const std::filesystem::path& scratch_dir() {
    static const std::filesystem::path dir = [] {
        const char* tmp = std::getenv("TMPDIR");
        std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/peftlab-fuzz.XXXXXX";
        if (!::mkdtemp(templ.data())) throw std::runtime_error("fuzz: mkdtemp failed");
        static struct Cleanup {
            std::filesystem::path p;
            ~Cleanup() {
                std::error_code ec;
                std::filesystem::remove_all(p, ec);
            }
        } cleanup{templ};
        return std::filesystem::path(templ);
    }();
    return dir;
}

// Writes `bytes` to scratch_dir()/name (plain write: the reader under test is
// the point, not the writer) and returns the path.
inline std::string write_scratch(const std::string& name, std::string_view bytes) {
    const std::filesystem::path p = scratch_dir() / name;
    std::filesystem::create_directories(p.parent_path());
    std::FILE* f = std::fopen(p.c_str(), "wb");
    if (!f) throw std::runtime_error("fuzz: cannot write " + p.string());
    if (!bytes.empty()) std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
    return p.string();
}

// The small base every model, training-state and adapter target loads onto.
inline GPTConfig base_config() {
    GPTConfig c;
    c.vocab = 16, c.d_model = 8, c.n_layers = 2, c.n_heads = 2, c.d_ff = 16, c.max_seq = 8;
    return c;
}

// A base with weights from a fixed formula rather than the initializer, so that
// its base_hash (checked by the adapter loaders) is the same whichever compiler
// and flags built it: the seeds, written by the g++ build, then get past the
// hash check in the clang fuzz build.
inline std::unique_ptr<GPT> make_base() {
    auto model = std::make_unique<GPT>(base_config(), 0);
    int64_t k = 0;
    for (auto& [name, t] : model->named_parameters()) {
        Tensor w = t;
        for (int64_t i = 0; i < w.numel(); ++i, ++k) w.data()[i] = float(int(k % 17) - 8) / 64.f;
    }
    return model;
}

// Puts make_base()'s weights and requires_grad flags back into `base` and
// removes its hooks: a loader may have attached an adapter, frozen the base,
// or ("full") overwritten its weights, and the next input needs the same base.
inline void restore_base(GPT& base) {
    const std::unique_ptr<GPT> fresh = make_base();
    auto src = fresh->named_parameters();
    auto dst = base.named_parameters();
    for (size_t i = 0; i < dst.size(); ++i) {
        std::memcpy(dst[i].second.data(), src[i].second.data(), size_t(src[i].second.numel()) * sizeof(float));
        dst[i].second.set_requires_grad(true);
    }
    base.set_hooks(nullptr);
}

}  // namespace peftlab::fuzz
