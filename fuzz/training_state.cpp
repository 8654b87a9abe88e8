// libFuzzer target: load_training_state (parameters, AdamW moments and step,
// generator states, the step counter) onto a fixed model and optimizer.
#include "autograd/rng.h"
#include "fuzz/fuzz.h"
#include "nn/checkpoint.h"
#include "nn/optim.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    static const std::unique_ptr<GPT> model = fuzz::make_base();
    static AdamW opt(trainable_named_parameters(*model));
    static Rng data_rng(1), dropout_rng(2);
    static const std::string path = fuzz::write_scratch("state.safetensors", "");
    fuzz::write_scratch("state.safetensors", {reinterpret_cast<const char*>(data), size});
    try {
        load_training_state(path, trainable_named_parameters(*model), opt,
                            {{"data", &data_rng}, {"dropout", &dropout_rng}});
    } catch (const std::exception&) {
    }
    return 0;
}
