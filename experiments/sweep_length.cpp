// sweep-length: prefix and prompt length n in {1, 2, 4, 8, 16, 32, 64} for
// prefix tuning (hidden-state form) and prompt tuning, same base, data, seed
// and budget. Shows how much each method gains per extra vector, and what the
// extra vectors cost (prefix: L*n*d, prompt: n*d).
#include <fmt/format.h>

#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "mpi/world.h"
#include "nn/safetensors.h"

using namespace peftlab;
using namespace peftlab::harness;

int main(int argc, char** argv) {
    peftlab::mpi::World world(&argc, &argv);  // several ranks under mpirun, else one process
    CommonArgs d;
    d.methods = {"prefix", "prompt"};  // method-names: the study's default (prefix length), --methods overrides
    d.steps = 200;
    d.out = "runs/sweep-length";
    d.eval_examples = 100;
    d.lr_zero = "each method's default rate";
    d.taken_over["prefix-len"] = "sweep-length sets n from --lengths";
    cxxopts::Options opts("sweep-length", "Metric against prefix / prompt length n");
    add_common_flags(opts, d);
    opts.add_options()("lengths", "comma-separated n values",
                       cxxopts::value<std::string>()->default_value("1,2,4,8,16,32,64"));
    cxxopts::ParseResult r;
    CommonArgs a = parse_or_exit(opts, argc, argv, d, &r);
    try {
        std::vector<int64_t> lengths;
        for (const std::string& s : flags::split_list(r["lengths"].as<std::string>()))
            lengths.push_back(flags::whole_number("--lengths", s, 0));
        Base base = load_or_pretrain(a);
        data::Task task = load_task(a, base);
        Budget budget = make_budget(a);
        std::vector<MethodResult> results;
        std::vector<Series> series;
        for (const std::string& m : a.methods) {
            Series s{m, {}};
            for (int64_t n : lengths) {
                MethodSpec spec = make_spec(a, m);
                spec.options.n = n;
                spec.label = fmt::format("{} n={}", m, n);
                Budget b = budget;
                if (b.lr == 0) b.lr = default_lr(spec.method);
                results.push_back(run_method(base, task, spec, b, "", a.seed));
                s.points.emplace_back(double(n), results.back().metric);
            }
            series.push_back(s);
        }
        std::string table = write_results(a.out, "sweep-length", results,
                                          {{"config", base.config.to_json()}, {"task", task.name}, {"lengths", lengths}});
        plot_png(a.out + "/metric_vs_length.png", fmt::format("{} against prefix length n", task.metric_name()),
                 "n (vectors per layer / soft tokens)", task.metric_name(), series, true);
        if (peftlab::dist::is_root()) write_file_atomic(a.out + "/report.md", fmt::format("# sweep-length on `{}`\n\nBudget: {} updates per run (lr "
                                                            "{}: 0 = each method's default), seed {}.\n\n{}\n"
                                                            "Plots: `metric_vs_length.png`, `loss_curves.png`.\n",
                                                            task.name, a.steps, a.lr, a.seed, table));
        print_results_table(results);
        fmt::print("\nreport: {0}/report.md  plots: {0}/metric_vs_length.png\n", a.out);
    } catch (const std::exception& e) {
        return world.fail("sweep-length", e.what());
    }
    return 0;
}
