// pretrain: trains the base LM on the pretraining corpus (the built-in
// restaurant language, or --corpus FILE) and caches it under
// runs/pretrain/<hash>/, where every other experiment finds it.
#include <fmt/format.h>

#include "experiments/lib/harness.h"

using namespace peftlab;
using namespace peftlab::harness;

int main(int argc, char** argv) {
    CommonArgs d;
    d.steps = 1;  // unused here
    d.out = "runs/pretrain";
    d.eval_examples = 1;
    cxxopts::Options opts("pretrain", "Pretrain (or find in the cache) the base LM every experiment starts from");
    add_common_flags(opts, d);
    CommonArgs a = parse_or_exit(opts, argc, argv, d);
    try {
        Base base = load_or_pretrain(a);
        fmt::print("base: {}\n  config {}\n  valid loss {:.4f}{}\n", base.model_path, base.config.to_json().dump(),
                   base.pretrain_valid_loss, base.cached ? " (cached)" : "");
    } catch (const std::exception& e) {
        fmt::print(stderr, "pretrain: {}\n", e.what());
        return 1;
    }
    return 0;
}
