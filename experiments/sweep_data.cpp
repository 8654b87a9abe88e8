// sweep-data: training-set size against compute. For each method and training
// set size (default 50, 200, 1000, 2000; nested prefixes of one training set)
// the same number of updates; we record
// the FLOPs of one update (which do not depend on the data set's size), the
// updates needed to reach a target validation loss, and the FLOPs that costs.
// PEFT's saving is per update (no weight gradients, no optimizer state for
// frozen weights), not a need for less data.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "mpi/world.h"
#include "nn/safetensors.h"

using namespace peftlab;
using namespace peftlab::harness;

int main(int argc, char** argv) {
    peftlab::mpi::World world(&argc, &argv);  // several ranks under mpirun, else one process
    CommonArgs d;
    d.methods = {"full", "prefix", "prefix-kv", "prompt", "lora"};  // method-names: the study's default, --methods overrides
    d.steps = 200;
    d.out = "runs/sweep-data";
    d.eval_examples = 50;
    d.lr_zero = "each method's default rate";
    d.patience_evals = 10;  // every run evaluates this often: the steps to the target loss are read off the curve
    cxxopts::Options opts("sweep-data", "Compute per step and steps to a target loss against training-set size");
    add_common_flags(opts, d);
    // clang-format off
    opts.add_options()
        ("sizes", "comma-separated training-set sizes (0 = --n-train, or the task's default size)", cxxopts::value<std::string>()->default_value("50,200,1000,2000"))
        ("target-loss", "validation loss to reach (0 = 1.05 x the worst final loss at the largest size)",
            cxxopts::value<std::string>()->default_value("0"));
    // clang-format on
    cxxopts::ParseResult r;
    CommonArgs a = parse_or_exit(opts, argc, argv, d, &r);
    try {
        std::vector<int64_t> sizes;
        for (const std::string& s : flags::split_list(r["sizes"].as<std::string>()))
            sizes.push_back(flags::whole_number("--sizes", s, 0));
        Base base = load_or_pretrain(a);
        const size_t default_size = load_task(a).train.size();
        for (int64_t& size : sizes)
            if (size == 0) size = int64_t(default_size);
        // One training set as large as the largest size; smaller sizes are its prefixes.
        CommonArgs largest = a;
        for (int64_t size : sizes) largest.n_train = std::max<size_t>(largest.n_train, size_t(size));
        const data::Task full_task = load_task(largest, base);
        std::vector<MethodResult> results;
        std::vector<int64_t> result_size;
        for (int64_t size : sizes) {
            data::Task task = full_task;
            task.train.resize(size_t(size));
            for (const std::string& m : a.methods) {
                MethodSpec spec = make_spec(a, m);
                spec.label = fmt::format("{} n_train={}", m, task.train.size());
                Budget budget = make_budget(a);
                if (budget.lr == 0) budget.lr = default_lr(spec.method);
                budget.eval_every = std::max<int64_t>(1, a.steps / a.patience_evals);
                results.push_back(run_method(base, task, spec, budget, "", a.seed));
                result_size.push_back(int64_t(task.train.size()));
            }
        }
        double target = flags::real_flag(r, "target-loss");
        if (target <= 0) {
            const int64_t largest = *std::max_element(result_size.begin(), result_size.end());
            for (size_t i = 0; i < results.size(); ++i)
                if (result_size[i] == largest) target = std::max(target, results[i].final_valid_loss);
            target *= 1.05;
        }
        std::string table =
            "| method | train examples | step GFLOP | updates to target | GFLOP to target | final valid loss |\n"
            "|---|---:|---:|---:|---:|---:|\n";
        nlohmann::json rows = nlohmann::json::array();
        std::map<std::string, Series> by_method;
        for (size_t i = 0; i < results.size(); ++i) {
            const MethodResult& m = results[i];
            int64_t reached = -1;
            for (auto& [step, loss] : m.valid_curve)
                if (loss <= target) {
                    reached = step;
                    break;
                }
            double gflop = double(m.step_flops) / 1e9;
            table +=
                fmt::format("| {} | {} | {:.3f} | {} | {} | {:.4f} |\n", m.method, result_size[i], gflop,
                            reached < 0 ? "not reached" : std::to_string(reached),
                            reached < 0 ? "-" : fmt::format("{:.1f}", gflop * double(reached)), m.final_valid_loss);
            rows.push_back({{"method", m.method},
                            {"n_train", result_size[i]},
                            {"step_flops", m.step_flops},
                            {"steps_to_target", reached},
                            {"flops_to_target", reached < 0 ? -1.0 : double(m.step_flops) * double(reached)},
                            {"final_valid_loss", m.final_valid_loss}});
            if (reached > 0) {
                by_method[m.method].title = m.method;
                by_method[m.method].points.emplace_back(double(result_size[i]), gflop * double(reached));
            }
        }
        write_results(
            a.out, "sweep-data", results,
            {{"config", base.config.to_json()}, {"task", full_task.name}, {"target_valid_loss", target}, {"rows", rows}});
        std::vector<Series> series;
        for (auto& [k, s] : by_method) series.push_back(s);
        plot_png(a.out + "/flops_to_target.png", fmt::format("GFLOP to reach valid loss {:.3f}", target),
                 "training examples", "GFLOP", series, true);
        if (peftlab::dist::is_root()) write_file_atomic(a.out + "/report.md",
                          fmt::format("# sweep-data on `{}`\n\nTarget validation loss {:.4f}; {} updates per run, "
                                      "validation every {} updates.\nThe FLOPs of one update do not depend on the "
                                      "number of training examples: PEFT saves compute per update.\n\n{}\n"
                                      "Plots: `flops_to_target.png`, `loss_curves.png`.\n",
                                      full_task.name, target, a.steps, std::max<int64_t>(1, a.steps / 10), table));
        fmt::print("\n{}\nreport: {}/report.md\n", table, a.out);
    } catch (const std::exception& e) {
        return world.fail("sweep-data", e.what());
    }
    return 0;
}
