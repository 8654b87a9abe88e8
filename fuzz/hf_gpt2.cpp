// libFuzzer target: load_hf_gpt2 (a Hugging Face GPT-2 checkpoint directory,
// nn/hf_gpt2.h). Input: packed records (fuzz/fuzz.h) [config.json,
// model.safetensors, model.safetensors.index.json, model-00001-of-00002.safetensors,
// model-00002-of-00002.safetensors]; an empty record writes no file, so the
// mutations reach both the single-file and the sharded layout (the loader
// prefers model.safetensors when both exist). The model is built from the
// file's own config.json, the path where a size in a file could drive an
// allocation, so -malloc_limit_mb in fuzz/run.sh catches any size trusted
// before the tensors were checked against it.
#include <filesystem>

#include "fuzz/fuzz.h"
#include "nn/hf_gpt2.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    static const char* const names[] = {"config.json", "model.safetensors", "model.safetensors.index.json",
                                        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
    static const std::filesystem::path dir = fuzz::scratch_dir() / "hf_gpt2";
    const std::vector<std::string> files = fuzz::unpack(data, size, std::size(names));
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
    std::filesystem::create_directories(dir);
    for (size_t i = 0; i < files.size(); ++i)
        if (!files[i].empty()) fuzz::write_scratch(std::string("hf_gpt2/") + names[i], files[i]);
    try {
        load_hf_gpt2(dir.string());
    } catch (const std::exception&) {
    }
    return 0;
}
