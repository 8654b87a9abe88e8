// The task a run uses: a registered one by name or one from files, fitted
// to the base's context, and its data report.
#include <fmt/format.h>

#include "datasets/batch.h"
#include "experiments/lib/harness.h"
#include "experiments/lib/run.h"

namespace peftlab::harness {

bool open_vocabulary(const CommonArgs& args) { return !args.base.empty() || args.tokenizer != "word"; }

data::Task load_task(const CommonArgs& args) { return load_task(args, open_vocabulary(args)); }

data::Task load_task(const CommonArgs& args, bool open_vocabulary) {
    if (!args.files.train.empty()) {
        data::FileTaskOptions o = args.files;
        o.n_train = args.n_train;
        return data::load_file_task(o);
    }
    const data::TaskDefaults& d = data::task_info(args.task).defaults;
    return data::make_task(args.task, args.n_train ? args.n_train : d.n_train, d.n_valid, d.n_test, args.seed + 100,
                           open_vocabulary);
}

data::Task detail::fitted_task(const CommonArgs& args, const Base& base) {
    data::Task task = load_task(args, base.tokenizer->open_vocabulary());
    data::fit_to_context(task, *base.tokenizer, int(base.config.max_seq), data::parse_truncate(args.truncate));
    return task;
}

data::Task load_task(const CommonArgs& args, const Base& base) {
    data::Task task = detail::fitted_task(args, base);
    for (const std::string& note : task.report.notes) fmt::print(stderr, "[data] {}\n", note);
    for (const auto& [split, r] : task.report.splits) {
        std::string left_out;
        if (r.blank_rows) left_out += fmt::format(", {} blank rows left out", r.blank_rows);
        if (r.duplicate_rows) left_out += fmt::format(", {} duplicate rows left out", r.duplicate_rows);
        if (r.dropped_too_long) left_out += fmt::format(", {} left out as too long for --seq {}", r.dropped_too_long, base.config.max_seq);
        if (r.truncated) left_out += fmt::format(", {} sources cut to fit --seq {} (--truncate {})", r.truncated, base.config.max_seq, args.truncate);
        fmt::print(stderr, "[data] {} {}: {} examples ({} pairs{}){}\n", task.name, split, r.examples, r.pairs,
                   r.path.empty() ? "" : " from " + r.path, left_out);
    }
    return task;
}

nlohmann::json data_report_json(const data::Task& task) {
    // The examples' content: results.json from edited data files (same names, same row counts) is not kept.
    uint64_t h = detail::fnv1a("");
    for (const auto* split : {&task.train, &task.valid, &task.test}) {
        h = detail::fnv1a("\x1e", h);
        for (const data::Example& ex : *split) {
            for (const std::string& text : ex.references) h = detail::fnv1a(text + '\x1f', h);
            for (const auto& [key, value] : ex.slots) h = detail::fnv1a(key + '\x1f' + value + '\x1f', h);
            h = detail::fnv1a(ex.source + '\x1f' + ex.target + '\x1d', h);
        }
    }
    nlohmann::json j = {{"task", task.name},
                        {"notes", task.report.notes},
                        {"left_out", task.report.left_out()},
                        {"content_hash", fmt::format("{:016x}", h)}};
    for (const auto& [split, r] : task.report.splits)
        j["splits"][split] = {{"path", r.path},           {"rows", r.rows},
                              {"examples", r.examples},   {"pairs", r.pairs},
                              {"blank_rows", r.blank_rows}, {"duplicate_rows", r.duplicate_rows},
                              {"truncated", r.truncated}, {"dropped_too_long", r.dropped_too_long}};
    return j;
}

}  // namespace peftlab::harness
