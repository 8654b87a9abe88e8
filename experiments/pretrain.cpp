// pretrain: trains the base LM on the pretraining corpus (the built-in
// restaurant language, or --corpus FILE) and caches it under
// runs/pretrain/<hash>/, where every other experiment finds it; --out DIR
// also copies the model and its pretrain.json there.
#include <fmt/format.h>

#include <filesystem>

#include "experiments/lib/harness.h"
#include "mpi/world.h"
#include "nn/safetensors.h"

using namespace peftlab;
using namespace peftlab::harness;

int main(int argc, char** argv) {
    peftlab::mpi::World world(&argc, &argv);  // several ranks under mpirun, else one process
    CommonArgs d;
    d.out = "";  // the cache directory only
    d.fine_tunes = false;
    d.taken_over["positions"] = "pretrain trains no adapter (the fine-tuning runs take it)";
    cxxopts::Options opts("pretrain", "Pretrain (or find in the cache) the base LM every experiment starts from");
    add_common_flags(opts, d);
    CommonArgs a = parse_or_exit(opts, argc, argv, d);
    try {
        Base base = load_or_pretrain(a);
        fmt::print("base: {}\n  config {}\n  valid loss {:.4f}{}\n", base.model_path, base.config.to_json().dump(),
                   base.pretrain_valid_loss, base.cached ? " (cached)" : "");
        if (!a.out.empty() && peftlab::dist::is_root()) {
            namespace fs = std::filesystem;
            fs::create_directories(a.out);
            for (const char* name : {"model.safetensors", "pretrain.json"}) {
                const fs::path from = fs::path(base.dir) / name, to = fs::path(a.out) / name;
                if (!fs::exists(from)) continue;
                const fs::path tmp = to.string() + ".tmp";
                fs::copy_file(from, tmp, fs::copy_options::overwrite_existing);
                fs::rename(tmp, to);
            }
            fmt::print("  copied to {}/model.safetensors\n", a.out);
        }
    } catch (const std::exception& e) {
        return world.fail("pretrain", e.what());
    }
    return 0;
}
