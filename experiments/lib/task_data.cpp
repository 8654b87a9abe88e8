// The task a run uses: a registered one by name or one from files, fitted
// to the base's context, and its data report.
#include <filesystem>
#include <stdexcept>

#include <fmt/format.h>

#include "datasets/batch.h"
#include "experiments/lib/harness.h"
#include "experiments/lib/run.h"

namespace peftlab::harness {

namespace fs = std::filesystem;

bool open_vocabulary(const CommonArgs& args) { return !args.base.empty() || args.tokenizer != "word"; }

data::Task load_task(const CommonArgs& args) { return load_task(args, open_vocabulary(args)); }

data::Task load_task(const CommonArgs& args, bool open_vocabulary) {
    data::Task task;
    if (!args.files.train.empty()) {
        data::FileTaskOptions o = args.files;
        o.n_train = args.n_train;
        o.seed = args.seed + 100;  // the data's own stream, as for the built-in tasks below
        task = data::load_file_task(o);
    } else {
        const data::TaskDefaults& d = data::task_info(args.task).defaults;
        task = data::make_task(args.task, args.n_train ? args.n_train : d.n_train, d.n_valid, d.n_test,
                               args.seed + 100, open_vocabulary);
    }
    task.recipe = data_recipe(args);
    return task;
}

nlohmann::json data_recipe(const CommonArgs& a) {
    nlohmann::json j = {{"seed", a.seed}, {"n_train", a.n_train}, {"truncate", a.truncate}};
    if (a.files.train.empty()) {
        j["task"] = a.task;
        return j;
    }
    // Absolute, so that an evaluation from another directory reads the same files.
    auto absolute = [](const std::string& p) { return p.empty() ? p : fs::absolute(p).lexically_normal().string(); };
    const data::FileTaskOptions& f = a.files;
    j["files"] = {{"train", absolute(f.train)},      {"valid", absolute(f.valid)},
                  {"test", absolute(f.test)},        {"classification", f.classification},
                  {"input_field", f.input_field},    {"output_field", f.output_field},
                  {"text_field", f.text_field},      {"label_field", f.label_field},
                  {"label_words", f.label_words}};
    return j;
}

void apply_data_recipe(const nlohmann::json& j, CommonArgs& a, const std::string& where) {
    auto bad = [&](const std::string& key, const std::string& why) {
        return std::runtime_error(fmt::format("{}: key '{}': {}", where, key, why));
    };
    if (!j.is_object()) throw std::runtime_error(fmt::format("{}: a JSON {}, expected an object", where, j.type_name()));
    auto text = [&](const nlohmann::json& o, const std::string& key, const std::string& prefix = "") {
        if (!o.contains(key) || !o[key].is_string()) throw bad(prefix + key, "must be text");
        return o[key].get<std::string>();
    };
    auto count = [&](const std::string& key) {
        if (!j.contains(key) || !j[key].is_number_unsigned()) throw bad(key, "must be a whole number >= 0");
        return j[key].get<uint64_t>();
    };
    a.seed = count("seed");
    a.n_train = size_t(count("n_train"));
    a.truncate = text(j, "truncate");
    try {
        data::parse_truncate(a.truncate);
    } catch (const std::invalid_argument& e) {
        throw bad("truncate", e.what());
    }
    a.files = data::FileTaskOptions{};
    if (j.contains("task") == j.contains("files")) throw bad("task", "give exactly one of 'task' and 'files'");
    if (j.contains("task")) {
        a.task = text(j, "task");
        try {
            data::task_info(a.task);
        } catch (const std::invalid_argument& e) {
            throw bad("task", e.what());
        }
    } else {
        const nlohmann::json& f = j["files"];
        if (!f.is_object()) throw bad("files", "must be an object");
        a.files.train = text(f, "train", "files.");
        a.files.valid = text(f, "valid", "files.");
        a.files.test = text(f, "test", "files.");
        if (a.files.train.empty()) throw bad("files.train", "is empty");
        if (!f.contains("classification") || !f["classification"].is_boolean())
            throw bad("files.classification", "must be true or false");
        a.files.classification = f["classification"].get<bool>();
        a.files.input_field = text(f, "input_field", "files.");
        a.files.output_field = text(f, "output_field", "files.");
        a.files.text_field = text(f, "text_field", "files.");
        a.files.label_field = text(f, "label_field", "files.");
        if (!f.contains("label_words") || !f["label_words"].is_object()) throw bad("files.label_words", "must be an object");
        for (const auto& [label, word] : f["label_words"].items()) {
            if (!word.is_string()) throw bad("files.label_words." + label, "must be text");
            a.files.label_words[label] = word.get<std::string>();
        }
    }
}

data::Task detail::fitted_task(const CommonArgs& args, const data::Tokenizer& tok, int64_t max_seq) {
    data::Task task = load_task(args, tok.open_vocabulary());
    data::fit_to_context(task, tok, int(max_seq), data::parse_truncate(args.truncate));
    return task;
}

data::Task load_task(const CommonArgs& args, const Base& base) {
    return load_task(args, *base.tokenizer, base.config.max_seq);
}

data::Task load_task(const CommonArgs& args, const data::Tokenizer& tok, int64_t max_seq) {
    data::Task task = detail::fitted_task(args, tok, max_seq);
    for (const std::string& note : task.report.notes) fmt::print(stderr, "[data] {}\n", note);
    for (const auto& [split, r] : task.report.splits) {
        std::string left_out;
        if (r.blank_rows) left_out += fmt::format(", {} blank rows left out", r.blank_rows);
        if (r.duplicate_rows) left_out += fmt::format(", {} duplicate rows left out", r.duplicate_rows);
        if (r.dropped_too_long) left_out += fmt::format(", {} left out as too long for --seq {}", r.dropped_too_long, max_seq);
        if (r.truncated) left_out += fmt::format(", {} source{} cut to fit --seq {} (--truncate {})", r.truncated, r.truncated == 1 ? "" : "s", max_seq, args.truncate);
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
