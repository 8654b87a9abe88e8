// libFuzzer target: load_adapter (peftlab's own adapter directory) onto a fixed
// base. Input: packed records [adapter_config.json, adapter_model.safetensors]
// (fuzz/fuzz.h).
#include "fuzz/fuzz.h"
#include "peft/adapter_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    static const std::unique_ptr<GPT> base = fuzz::make_base();
    static const std::string dir = (fuzz::scratch_dir() / "adapter").string();
    const std::vector<std::string> files = fuzz::unpack(data, size, 2);
    fuzz::write_scratch("adapter/adapter_config.json", files[0]);
    fuzz::write_scratch("adapter/adapter_model.safetensors", files[1]);
    try {
        peft::load_adapter(dir, *base);
    } catch (const std::exception&) {
    }
    fuzz::restore_base(*base);
    return 0;
}
