// adapter: saved adapters from the command line, as Hugging Face PEFT users
// know them (save_pretrained / from_pretrained / print_trainable_parameters).
//
//   adapter inspect DIR                          method, options, base, trainable parameters
//   adapter export-hf DIR OUT --base MODEL       to PEFT's layout (adapter_config.json + tensors)
//   adapter import-hf DIR OUT --base MODEL       from PEFT's layout to ours
//   adapter eval DIR --base MODEL [--task T]     losses and the task's metric with the adapter on
//                                                (default: the data it records it was trained on)
//
// DIR is what compare writes under <--out>/adapters/<label>/ (peft::save_adapter);
// MODEL a base model file, e.g. runs/pretrain/<hash>/model.safetensors, or a
// Hugging Face GPT-2 directory (its base_hash must match the adapter's).
#include <fmt/format.h>

#include <filesystem>
#include <fstream>

#include "datasets/tokenizer.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "nn/checkpoint.h"
#include "nn/hf_gpt2.h"
#include "nn/safetensors.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"

using namespace peftlab;

namespace {

const char* kUsage =
    "usage:\n"
    "  adapter inspect DIR\n"
    "  adapter export-hf DIR OUT --base MODEL\n"
    "  adapter import-hf DIR OUT --base MODEL\n"
    "  adapter eval DIR --base MODEL [--task T | --train FILE ...] [--eval-examples 50] [--batch 16]\n"
    "      (without --task/--train: the data the adapter was trained on, as it records them)\n"
    "DIR: an adapter directory (peft::save_adapter's layout; compare writes <--out>/adapters/<label>/,\n"
    "     runs/compare/adapters/<label>/ by default).\n"
    "MODEL: a peftlab model file (e.g. runs/pretrain/<hash>/model.safetensors) or a Hugging Face GPT-2\n"
    "     directory (config.json + model.safetensors).\n";

int inspect(const std::string& dir) {
    const peft::AdapterConfig saved = peft::read_adapter_config("adapter inspect", dir);
    const peft::Adapter& adapter = *saved.adapter;
    const std::string method = adapter.method();
    const peft::AdapterOptions& opts = adapter.options();
    const GPTConfig& cfg = saved.base_config;
    const bool inference = saved.inference;
    // The tensors as stored; options that would make more parameters than they
    // hold are refused before the formula multiplies them (check_sizes).
    const StFile file = load_safetensors(dir + "/adapter_model.safetensors");
    peft::check_sizes(saved.file, "options", adapter, cfg, file);
    const peft::ParamFormula pf = [&] {
        try {
            return inference ? adapter.inference_formula(cfg) : adapter.formula(cfg);
        } catch (const std::invalid_argument& e) {  // options the base cannot take (a layer it lacks)
            throw saved.file.key_error("options", e.what());
        }
    }();
    int64_t stored = 0;
    for (const auto& [name, t] : file.tensors) stored += int64_t(t.data.size());

    fmt::print("adapter:   {}\n", dir);
    fmt::print("method:    {} ({})\n", method, [&] {
        for (const auto& m : peft::methods())
            if (m.name == method) return m.description;
        return std::string("not registered");
    }());
    fmt::print("options:   {}\n", opts.to_json().dump());
    fmt::print("base:      hash {}; config {}\n", saved.base_hash, cfg.to_json().dump());
    fmt::print("stored:    {} tensors, {} parameters{}\n", file.tensors.size(), stored,
               inference ? " (inference form)" : "");
    fmt::print("trainable params: {} = {} (d={}, L={}, n={}, F={}; {} options {})\n", pf.text, pf.count, cfg.d_model,
               peft::parse_layers(opts.layers, cfg.n_layers).size(), opts.n, cfg.d_ff, method,
               opts.section_or_empty(method).dump());
    for (const auto& [name, t] : file.tensors) {
        std::string shape;
        for (int64_t s : t.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(s);
        fmt::print("  {} [{}]\n", name, shape);
    }
    if (stored != pf.count)
        fmt::print(stderr, "warning: the stored tensors hold {} parameters, the formula says {}\n", stored, pf.count);
    return 0;
}

// A peftlab model file, or a Hugging Face GPT-2 directory (what --base DIR trained on).
std::unique_ptr<GPT> load_base(const std::string& path) {
    if (path.empty())
        throw std::invalid_argument("--base: the base model is required (MODEL.safetensors or a GPT-2 directory)");
    if (std::filesystem::is_directory(path)) return load_hf_gpt2(path);
    return load_model_new(path);
}

// The data `adapter eval` scores on: those the flags name (--task, or --train
// and its companions), else those the adapter records it was trained on, with
// the content hash of their examples then.
struct EvalData {
    harness::CommonArgs args;
    std::string recorded_hash;  // empty: the flags named the data, or no hash was recorded
};
EvalData eval_data(const cxxopts::ParseResult& r, const std::string& dir) {
    EvalData data;
    harness::CommonArgs& args = data.args;
    if (r.count("task") || r.count("train")) {
        harness::parse_data_flags(r, args);
        return data;
    }
    for (const char* f : {"valid", "test", "task-type", "input-field", "output-field", "text-field", "label-field",
                          "label-words", "truncate", "seed"})
        if (r.count(f))
            throw std::invalid_argument(fmt::format("--{} {}: give --task or --train with it (without them, eval uses "
                                                    "the data the adapter records it was trained on, seed included)",
                                                    f, std::string_view(f) == "seed" ? std::to_string(r[f].as<uint64_t>())
                                                                                     : r[f].as<std::string>()));
    const nlohmann::json recipe =
        peft::adapter_layout(dir) == peft::AdapterLayout::peftlab ? peft::trained_on(dir) : nlohmann::json();
    if (recipe.is_null())
        throw std::invalid_argument(fmt::format("{}: the adapter records no data it was trained on (saved by an older "
                                                "peftlab, by a program of your own, or in Hugging Face PEFT's layout): "
                                                "give --task or --train",
                                                dir));
    apply_data_recipe(recipe, args, dir + "/adapter_config.json: trained_on");
    if (recipe.contains("content_hash") && recipe["content_hash"].is_string())
        data.recorded_hash = recipe["content_hash"].get<std::string>();
    fmt::print(stderr, "data: {} (recorded with the adapter), seed {}\n",
               args.files.train.empty() ? "task " + args.task : args.files.train, args.seed);
    return data;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
        fmt::print(argc < 2 ? stderr : stdout, "{}", kUsage);
        return argc < 2 ? 2 : 0;
    }
    const std::string cmd = argv[1];
    cxxopts::Options o("adapter " + cmd, "");
    // clang-format off
    o.add_options()
        ("h,help", "print this help")
        ("base", "base model: a peftlab model file or a Hugging Face GPT-2 directory", cxxopts::value<std::string>()->default_value(""))
        ("tokenizer", "gpt2:DIR (eval; default: the base directory's GPT-2 files, or the checkpoint's own)",
         cxxopts::value<std::string>()->default_value(""))
        ("eval-examples", "test examples scored by generation (eval)", cxxopts::value<std::string>()->default_value("50"))
        ("batch", "rows per forward (eval)", cxxopts::value<std::string>()->default_value("16"))
        ("threads", "threads (default: PEFTLAB_THREADS, else all cores)", cxxopts::value<std::string>())
        ("paths", "", cxxopts::value<std::vector<std::string>>());
    // clang-format on
    // eval's data: by default those the adapter was trained on (its "trained_on").
    const harness::CommonArgs defaults;
    harness::add_data_flags(o, defaults, "from the adapter's record of its training data");
    o.parse_positional({"paths"});
    o.custom_help("[options]");
    o.positional_help(kUsage);
    try {
        cxxopts::ParseResult r = flags::parse(o, argc - 1, argv + 1);
        const std::vector<std::string> paths =
            r.count("paths") ? r["paths"].as<std::vector<std::string>>() : std::vector<std::string>{};
        auto need = [&](size_t n) {
            if (paths.size() != n)
                throw std::invalid_argument(fmt::format("{}: expects {} path{}, got {}\n{}", cmd, n, n == 1 ? "" : "s",
                                                        paths.size(), kUsage));
        };
        flags::configure_threads(r.count("threads") ? std::optional<int64_t>(flags::int_flag(r, "threads", 0))
                                                    : std::nullopt);
        if (cmd == "inspect") {
            need(1);
            return inspect(paths[0]);
        }
        if (cmd == "export-hf") {
            need(2);
            std::unique_ptr<GPT> base = load_base(r["base"].as<std::string>());
            std::unique_ptr<peft::Adapter> a = peft::load_adapter(paths[0], *base);
            peft::export_hf(paths[1], *a);
            fmt::print("exported {} ({}) to {} (Hugging Face PEFT layout)\n", paths[0], a->method(), paths[1]);
            return 0;
        }
        if (cmd == "import-hf") {
            need(2);
            std::unique_ptr<GPT> base = load_base(r["base"].as<std::string>());
            std::unique_ptr<peft::Adapter> a = peft::import_hf(paths[0], *base);
            peft::save_adapter(paths[1], *a);
            fmt::print("imported {} as {} into {}\n", paths[0], a->method(), paths[1]);
            return 0;
        }
        if (cmd == "eval") {
            need(1);
            const int64_t n = flags::int_flag(r, "eval-examples", 1), batch = flags::int_flag(r, "batch", 1);
            const std::string base_path = r["base"].as<std::string>();
            std::unique_ptr<GPT> base = load_base(base_path);
            std::unique_ptr<data::Tokenizer> tok = harness::base_tokenizer(r["tokenizer"].as<std::string>(), base_path);
            harness::check_tokenizer_fits(*tok, base->config().vocab, base_path);
            std::unique_ptr<peft::Adapter> a = peft::load_any_adapter(paths[0], *base);
            a->activate(*base);
            const EvalData data = eval_data(r, paths[0]);
            // Prepared as the run prepared them: fitted to the base's context under --truncate.
            const data::Task task = harness::load_task(data.args, *tok, base->config().max_seq);
            const std::string hash = harness::data_report_json(task).at("content_hash");
            if (!data.recorded_hash.empty() && hash != data.recorded_hash)
                throw std::invalid_argument(fmt::format(
                    "{}: the recorded data now make other examples (content hash {}, recorded {}): a file changed "
                    "since the adapter was trained; name the data with --task or --train to evaluate on them anyway",
                    paths[0], hash, data.recorded_hash));
            harness::MethodResult res =
                harness::evaluate(std::move(base), std::move(a), *tok, task, n, batch, paths[0]);
            // Data the flags name may be other than the base's vocabulary was built from.
            if (data.recorded_hash.empty())
                if (std::string f = harness::unknown_words_flag(task, *tok); !f.empty()) res.flags.push_back(f);
            fmt::print("valid loss {:.4f}  test loss {:.4f}  {} {:.4f} on {} test examples\n", res.final_valid_loss,
                       res.test_loss, res.metric_name, res.metric, res.eval_examples);
            for (const std::string& f : res.flags) fmt::print("flag: {}\n", f);
            return 0;
        }
        throw std::invalid_argument(fmt::format("unknown command '{}'\n{}", cmd, kUsage));
    } catch (const std::invalid_argument& e) {
        fmt::print(stderr, "adapter: {}\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        fmt::print(stderr, "adapter: {}\n", e.what());
        return 1;
    }
}
