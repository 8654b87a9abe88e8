// libFuzzer target: the model checkpoint loaders. load_model_new builds a model
// from the file's own config (the path where a size in the file could drive an
// allocation); load_model checks the file against an existing model and must
// leave it bitwise unchanged when it refuses the file.
#include <cstring>

#include "fuzz/fuzz.h"
#include "nn/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    static const std::unique_ptr<GPT> model = fuzz::make_base();
    static const std::string path = fuzz::write_scratch("model.safetensors", "");
    fuzz::write_scratch("model.safetensors", {reinterpret_cast<const char*>(data), size});
    try {
        load_model_new(path);
    } catch (const std::exception&) {
    }
    std::vector<float> before;
    for (auto& [name, t] : model->named_parameters()) before.insert(before.end(), t.data(), t.data() + t.numel());
    bool loaded = false;
    try {
        load_model(path, *model);
        loaded = true;
    } catch (const std::exception&) {
    }
    if (!loaded) {  // all or nothing: a refused file changes no weight
        size_t k = 0;
        for (auto& [name, t] : model->named_parameters())
            for (int64_t i = 0; i < t.numel(); ++i, ++k)
                if (std::memcmp(&t.data()[i], &before[k], sizeof(float)) != 0) __builtin_trap();
    } else {  // restore the fixed weights for the next input
        const std::unique_ptr<GPT> fresh = fuzz::make_base();
        auto src = fresh->named_parameters();
        auto dst = model->named_parameters();
        for (size_t i = 0; i < dst.size(); ++i)
            std::memcpy(dst[i].second.data(), src[i].second.data(), size_t(src[i].second.numel()) * sizeof(float));
    }
    return 0;
}
