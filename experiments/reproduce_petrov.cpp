// reproduce-petrov: Petrov, Torr & Bibi, "When Do Prompting and Prefix-Tuning
// Work? A Theory of Capabilities and Limitations" (ICLR 2024), Sections 5-6,
// at their scale: a 4-layer, 4-head, width-256 GPT (`--config small`)
// pretrained on a mixture of sort ascending/descending and add 1/2 over 10
// digits 1..8 (datasets/petrov.h, no task marker), then, per task, every
// --methods entry trained from that base; every trained adapter is then scored
// on every task's held-out test inputs (the accuracy matrix: rows the method
// and the task it was trained on, columns the task tested), and, with
// --attention-diagnostic, how far each adapter moves the content-to-content
// attention per layer and head (peft/attention_shift.h).
// Writes runs/reproduce-petrov/{results.json, metrics.csv, report.md,
// attention.md, accuracy_own_task*.png, loss_curves.png}.
#include <fmt/format.h>

#include <chrono>
#include <filesystem>

#include "datasets/batch.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "nn/checkpoint.h"
#include "nn/dist.h"
#include "nn/safetensors.h"
#include "peft/adapter_io.h"
#include "peft/attention_shift.h"

using namespace peftlab;
using namespace peftlab::harness;

namespace {

// One row of the matrix: an adapter (or none: the base) and what it was trained on.
struct Row {
    std::string label, trained_task, adapter_dir;
};

std::unique_ptr<GPT> adapted_model(const Base& base, const Row& row, std::unique_ptr<peft::Adapter>* adapter) {
    auto model = load_model_new(base.model_path);
    if (!row.adapter_dir.empty()) {
        *adapter = peft::load_adapter(row.adapter_dir, *model);
        (*adapter)->activate(*model);
    }
    return model;
}

std::string pct(double v) { return fmt::format("{:.1f}", 100.0 * v); }

}  // namespace

int main(int argc, char** argv) {
    CommonArgs d;
    d.config = "small";
    d.task = "petrov-sort-asc";  // the base's pretraining corpus comes from the petrov tasks (all share it)
    // The paper's comparison: the prefix (n = 10, hidden form), its key/value form, prompt tuning, rank-1
    // LoRA on the MLP (fc and proj: L*(d+F) = 10,240 parameters, the prefix's L*n*d) and full fine-tuning.
    d.methods = {"prefix", "prefix-kv", "prompt", R"(lora:r=1:target_modules=["fc","proj"])", "full"};  // method-names: the paper's comparison, --methods overrides
    d.prefix_len = 10;
    d.steps = 2000;
    d.pretrain_steps = 20000;
    d.batch = 32;
    d.eval_examples = 200;
    d.out = "runs/reproduce-petrov";
    d.lr_zero = "each method's default rate, or a search with --search-steps";
    d.taken_over["task"] = "--tasks and --train-tasks pick the tasks (the base pretrains on their shared text)";
    d.taken_over["train"] = "reproduce-petrov trains on the petrov tasks of --train-tasks, not on data files";
    cxxopts::Options opts("reproduce_petrov", "Petrov et al. (ICLR 2024): what a prefix can and cannot learn");
    add_common_flags(opts, d);
    // clang-format off
    opts.add_options()
        ("tasks", "tasks every adapter is tested on (the matrix's columns), comma-separated",
         cxxopts::value<std::string>()->default_value(
             "petrov-sort-asc,petrov-sort-desc,petrov-add1,petrov-add2,petrov-sort-asc-add1,petrov-hist"))
        ("train-tasks", "tasks to train each method on (the rows), a subset of --tasks; default: all of --tasks",
         cxxopts::value<std::string>()->default_value(""))
        ("search-steps", "updates per learning-rate candidate; 0: no search, each method's default rate",
         cxxopts::value<std::string>()->default_value("0"))
        ("attention-diagnostic", "measure per layer and head how far each adapter moves content-to-content "
                                 "attention (total variation; attention.md, results.json)")
        ("diagnostic-rows", "test examples the attention diagnostic runs on", cxxopts::value<std::string>()->default_value("16"))
        ("fresh", "train every (method, task) again, even those a previous run with the same settings finished");
    // clang-format on
    cxxopts::ParseResult r;
    CommonArgs a = parse_or_exit(opts, argc, argv, d, &r);
    const auto t0 = std::chrono::steady_clock::now();
    try {
        const int64_t search_steps = flags::int_flag(r, "search-steps", 0);
        const int64_t diag_rows = flags::int_flag(r, "diagnostic-rows", 1);
        const std::vector<std::string> tasks = flags::split_list(r["tasks"].as<std::string>());
        if (tasks.empty()) throw std::invalid_argument("--tasks: empty list");
        for (const std::string& t : tasks) data::task_info(t);  // unknown names fail before any compute
        std::vector<std::string> train_tasks = flags::split_list(r["train-tasks"].as<std::string>());
        if (train_tasks.empty()) train_tasks = tasks;
        for (const std::string& t : train_tasks)
            if (std::find(tasks.begin(), tasks.end(), t) == tasks.end())
                throw std::invalid_argument(fmt::format("--train-tasks: {} is not one of --tasks", t));

        Base base = load_or_pretrain(a);
        const data::Tokenizer& tok = *base.tokenizer;
        nlohmann::json extra = run_settings_json(a, base, search_steps);
        extra["tasks"] = tasks;
        extra["train_tasks"] = train_tasks;
        extra["eval_examples"] = a.eval_examples;
        extra["base"]["pretrain_steps"] = a.pretrain_steps;
        extra["base"]["pretrain_tokens"] = a.pretrain_steps * a.batch * base.config.max_seq;
        std::map<std::string, MethodResult> finished =
            r.count("fresh") ? std::map<std::string, MethodResult>{} : finished_results(a.out + "/results.json", extra);

        // ---- train every method on every task
        std::vector<MethodResult> results;
        std::vector<Row> rows = {{"base (no adaptation)", "", ""}};
        for (const std::string& task_name : train_tasks) {
            CommonArgs ta = a;
            ta.task = task_name;
            const data::Task task = load_task(ta, base);
            for (const std::string& entry : a.methods) {
                MethodSpec spec = make_spec(a, entry);
                spec.label = fmt::format("{} @ {}", entry, task_name);
                Budget budget = make_budget(a);
                budget.search_steps = search_steps;
                if (budget.lr <= 0 && search_steps == 0) budget.lr = default_lr(spec.method);
                auto it = finished.find(spec.label);
                if (it != finished.end()) {
                    fmt::print(stderr, "[{}] finished in an earlier run ({}/results.json): kept\n", spec.label, a.out);
                    results.push_back(it->second);
                } else {
                    results.push_back(run_method(base, task, spec, budget, a.out, a.seed));
                }
                rows.push_back({spec.label, task_name, results.back().adapter_dir});
                write_results(a.out, "reproduce-petrov", results, extra);
            }
        }

        // ---- the matrix: every row on every task's test inputs
        std::vector<data::Task> tests;
        for (const std::string& t : tasks) {
            tests.push_back(data::make_task(t, 1, 1, size_t(a.eval_examples), a.seed + 100));  // load_task's data seed
            data::fit_to_context(tests.back(), tok, int(base.config.max_seq), data::parse_truncate(a.truncate));
        }
        nlohmann::json matrix = nlohmann::json::object();
        nlohmann::json extra_matrix = nlohmann::json::object();  // the tasks' further metrics, same layout
        for (const Row& row : rows) {
            for (const data::Task& t : tests) {
                std::unique_ptr<peft::Adapter> adapter;
                auto model = adapted_model(base, row, &adapter);
                MethodResult m = evaluate(std::move(model), std::move(adapter), tok, t, a.eval_examples, a.batch,
                                          row.label + " | test " + t.name);
                matrix[row.label][t.name] = m.metric;
                for (const auto& [k, v] : m.extra_metrics) extra_matrix[k][row.label][t.name] = v;
            }
        }
        extra["matrix"] = matrix;
        extra["matrix_extra_metrics"] = extra_matrix;

        // ---- the attention diagnostic, on each row's own task
        std::string attention_md;
        if (r.count("attention-diagnostic")) {
            auto base_model = load_model_new(base.model_path);
            nlohmann::json shifts = nlohmann::json::object();
            std::string summary =
                "| adapter | mean local TV | max local TV | mean end-to-end TV |\n|---|---|---|---|\n", tables;
            for (const Row& row : rows) {
                if (row.adapter_dir.empty()) continue;
                const data::Task& t = tests[size_t(std::find(tasks.begin(), tasks.end(), row.trained_task) - tasks.begin())];
                std::vector<size_t> idx;
                for (size_t i = 0; i < std::min<size_t>(size_t(diag_rows), t.test.size()); ++i) idx.push_back(i);
                data::Batch b = data::make_conditional_batch(t.test, idx, tok, int(base.config.max_seq), data::PadSide::Right);
                ModelInput in{b.B, b.T, b.tokens, b.positions, b.valid, b.source_len};
                std::unique_ptr<peft::Adapter> adapter;
                auto model = adapted_model(base, row, &adapter);
                const peft::AttentionShift s = peft::attention_shift(*base_model, *model, in);
                shifts[row.label] = s.to_json();
                summary += fmt::format("| {} | {:.2e} | {:.2e} | {:.3f} |\n", row.label, s.mean_local(), s.max_local(),
                                       s.mean_end_to_end());
                tables += fmt::format("\n### {}\n\n{}", row.label, s.markdown());
            }
            extra["attention_shift"] = shifts;
            attention_md = fmt::format(
                "# Attention diagnostic (Petrov et al. 2024, Section 4)\n\n"
                "Total variation between content-renormalised attention distributions, mean over {} test rows' "
                "content queries. local: base vs adapted attention for the same layer input (a prefix cannot move "
                "it: 0 to rounding); end-to-end: the base run vs the adapted model run on the same tokens.\n\n{}\n"
                "## Per layer and head (local / end-to-end)\n{}",
                diag_rows, summary, tables);
            if (dist::is_root()) write_file_atomic(a.out + "/attention.md", attention_md);
        }
        extra["wall_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const std::string table = write_results(a.out, "reproduce-petrov", results, extra);

        // ---- report: the matrices, and each method's accuracy on the task it was trained on
        auto matrix_md = [&](const nlohmann::json& m) {
            std::string md = "| trained (method @ task) |", rule = "|---|";
            for (const std::string& t : tasks) md += " " + t + " |", rule += "---|";
            md += "\n" + rule + "\n";
            for (const Row& row : rows) {
                md += "| " + row.label + " |";
                for (const std::string& t : tasks) {
                    const std::string cell = m.contains(row.label) && m[row.label].contains(t)
                                                 ? pct(m[row.label][t].get<double>()) : "-";
                    md += row.trained_task == t ? " **" + cell + "** |" : " " + cell + " |";
                }
                md += '\n';
            }
            return md;
        };
        std::string mat = matrix_md(matrix);
        for (const auto& [metric, m] : extra_matrix.items())
            mat += fmt::format("\n`{}` (%), same layout:\n\n{}", metric, matrix_md(m));
        // What each method costs beside what it reaches: its trainable parameters and training-step FLOPs
        // (forward + backward, on the first trained task's batches; the tasks share one length).
        std::string own = "| method | trainable params | step GFLOP |", own_rule = "|---|---:|---:|";
        for (const std::string& t : train_tasks) own += " " + t + " |", own_rule += "---:|";
        own += "\n" + own_rule + "\n";
        std::vector<Series> series;
        for (const std::string& entry : a.methods) {
            const std::string first = fmt::format("{} @ {}", entry, train_tasks.front());
            const auto cost = std::find_if(results.begin(), results.end(),
                                           [&](const MethodResult& m) { return m.label == first; });
            own += fmt::format("| {} | {} | {:.2f} |", entry, cost->trainable_params, double(cost->step_flops) / 1e9);
            Series s{entry, {}, ""};
            for (size_t i = 0; i < train_tasks.size(); ++i) {
                const double v = matrix[fmt::format("{} @ {}", entry, train_tasks[i])][train_tasks[i]].get<double>();
                own += " " + pct(v) + " |";
                s.points.emplace_back(double(i + 1), 100.0 * v);
            }
            own += '\n';
            series.push_back(s);
        }
        std::string task_axis;
        for (size_t i = 0; i < train_tasks.size(); ++i)
            task_axis += fmt::format("{}{}={}", i ? ", " : "", i + 1, train_tasks[i]);
        const std::string metric_name = tests.front().metric_name();
        plot_png(a.out + "/accuracy_own_task.png", "reproduce-petrov: " + metric_name + " on the task trained for",
                 "task (" + task_axis + ")", metric_name + " (%)", series);
        // The tasks' further metrics (digit accuracy) the same way: they move before exact match does.
        for (const auto& [metric, m] : extra_matrix.items()) {
            std::vector<Series> more;
            for (const std::string& entry : a.methods) {
                Series s{entry, {}, ""};
                for (size_t i = 0; i < train_tasks.size(); ++i) {
                    const std::string row = fmt::format("{} @ {}", entry, train_tasks[i]);
                    if (m.contains(row) && m[row].contains(train_tasks[i]))
                        s.points.emplace_back(double(i + 1), 100.0 * m[row][train_tasks[i]].get<double>());
                }
                more.push_back(s);
            }
            plot_png(a.out + "/accuracy_own_task_" + file_safe(metric) + ".png",
                     "reproduce-petrov: " + metric + " on the task trained for", "task (" + task_axis + ")",
                     metric + " (%)", more);
        }
        const std::string md = fmt::format(
            "# reproduce-petrov: Petrov et al. (ICLR 2024), Sections 5-6\n\n"
            "Base: {} (d={}, L={}, H={}, d_ff={}, vocab={}, T={}), pretrained {} steps of batch {} on the "
            "sort/add mixture (up to {} tokens), valid loss {:.3f}.\n"
            "Per (method, task): {} updates of batch {}{}; prefix/prompt length {}; seed {}.\n"
            "Exact-match accuracy (%) of the greedy output on {} held-out test inputs per task.\n\n"
            "## Accuracy on the task each adapter was trained for\n\n{}\n"
            "## The matrix (rows: trained; columns: tested; bold: the trained task)\n\n{}\n"
            "## Training runs\n\n{}\n{}"
            "Plots: `accuracy_own_task.png` and `accuracy_own_task_<metric>.png` (x: {}), `loss_curves.png`.\n"
            "Wall time: {:.0f} s.\n",
            base.model_path, base.config.d_model, base.config.n_layers, base.config.n_heads, base.config.d_ff,
            base.config.vocab, base.config.max_seq, a.pretrain_steps, a.batch,
            a.pretrain_steps * a.batch * base.config.max_seq, base.pretrain_valid_loss, a.steps, a.batch,
            search_steps ? fmt::format(", learning rate searched ({} updates per candidate)", search_steps)
                         : ", each method's default learning rate",
            a.prefix_len, a.seed, a.eval_examples, own, mat, table,
            attention_md.empty() ? "" : "See `attention.md` for the attention diagnostic.\n\n", task_axis,
            extra["wall_seconds"].get<double>());
        if (dist::is_root()) write_file_atomic(a.out + "/report.md", md);
        fmt::print("{} (%) on the task trained for, beside each method's cost:\n\n{}\n{}\nreport: {}/report.md  "
                   "results: {}/results.json\n",
                   metric_name, own, mat, a.out, a.out);
    } catch (const std::exception& e) {
        fmt::print(stderr, "reproduce_petrov: {}\n", e.what());
        return 1;
    }
    return 0;
}
