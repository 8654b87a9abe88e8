// libFuzzer target: load_safetensors on arbitrary bytes. Any std::exception is
// the reader refusing the file (fine); a crash, sanitizer report, hang, leak or
// allocation over -malloc_limit_mb is a bug.
#include "fuzz/fuzz.h"
#include "nn/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    static const std::string path = fuzz::write_scratch("model.safetensors", "");
    fuzz::write_scratch("model.safetensors", {reinterpret_cast<const char*>(data), size});
    try {
        const StFile f = load_safetensors(path);
        // What the reader promises about what it returns.
        for (const auto& [name, t] : f.tensors) {
            uint64_t n = 1;
            for (int64_t d : t.shape) n *= uint64_t(d);
            if (n != t.data.size()) __builtin_trap();
        }
    } catch (const std::exception&) {
    }
    return 0;
}
