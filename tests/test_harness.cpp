// experiments/lib on its own: flag errors, the pretrain cache key, a short
// run_method on a file-backed task whose saved adapter reloads with
// peft::load_adapter to the same test loss, and the fields of results.json.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>

#include <fmt/format.h>

#include "datasets/tasks.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "experiments/lib/run.h"
#include "nn/checkpoint.h"
#include "peft/adapter_io.h"
#include "tests/harness_testing.h"
#include "tests/testing.h"

using namespace peftlab;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

harness::CommonArgs parse(std::vector<std::string> args) { return testing::parse_common_args(std::move(args)); }

std::string parse_error(std::vector<std::string> args) {
    try {
        parse(std::move(args));
    } catch (const std::exception& e) {
        return e.what();
    }
    return "(no error)";
}

// Runs in a scratch directory (the base cache runs/pretrain/ lands there).
struct InDir {
    fs::path saved = fs::current_path();
    explicit InDir(const fs::path& p) { fs::current_path(p); }
    ~InDir() { fs::current_path(saved); }
};

}  // namespace

TEST_CASE("harness flags: data-file flags parse and bad ones name the flag and value", "[harness]") {
    harness::CommonArgs a = parse({"--train", "d.csv", "--input-field", "mr", "--output-field", "ref"});
    CHECK(a.files.train == "d.csv");
    CHECK_FALSE(a.files.classification);
    CHECK(a.files.input_field == "mr");
    a = parse({"--train", "d.jsonl", "--label-words", "0=negative,1=positive"});
    CHECK(a.files.classification);  // implied by --label-words
    CHECK(a.files.label_words == std::map<std::string, std::string>{{"0", "negative"}, {"1", "positive"}});
    CHECK(parse({"--train", "d.jsonl", "--task-type", "classification"}).files.classification);

    CHECK_THAT(parse_error({"--valid", "v.csv"}), Contains("--valid: needs --train"));
    CHECK_THAT(parse_error({"--train", "d.csv", "--task", "e2e"}), Contains("--task e2e and --train d.csv"));
    CHECK_THAT(parse_error({"--task-type", "regression"}), Contains("--task-type: 'regression'"));
    CHECK_THAT(parse_error({"--label-words", "0negative"}), Contains("--label-words: '0negative' is not label=word"));
    CHECK_THAT(parse_error({"--label-words", "a=x,a=y"}), Contains("label 'a' is given twice"));
    CHECK_THAT(parse_error({"--truncate", "middle"}), Contains("--truncate: 'middle'"));
    CHECK_THAT(parse_error({"--task", "translate"}), Contains("--task: unknown task \"translate\"") && Contains("e2e"));
    CHECK_THAT(parse_error({"--config", "huge"}), Contains("--config: unknown preset 'huge'") && Contains("gpt2-xl"));
    CHECK_THAT(parse_error({"--methods", "lora,lora"}), Contains("'lora' is listed twice"));
    CHECK_THAT(parse_error({"--steps", "0"}), Contains("--steps: 0 must be >= 1"));
    // A field flag nothing would read: no data files, or the other task type.
    CHECK_THAT(parse_error({"--input-field", "mr"}), Contains("--input-field mr: data-file flags need --train"));
    CHECK_THAT(parse_error({"--task-type", "generation"}), Contains("--task-type generation: data-file flags need --train"));
    CHECK_THAT(parse_error({"--train", "d.csv", "--label-words", "0=neg", "--input-field", "mr"}),
               Contains("--input-field mr: applies to generation tasks, and this run is classification (--text-field, "
                        "--label-field or --label-words says so)"));
    CHECK_THAT(parse_error({"--train", "d.csv", "--task-type", "generation", "--label-field", "y"}),
               Contains("--label-field y: applies to classification tasks, and this run is generation (--task-type "
                        "generation)"));
    CHECK_THAT(parse_error({"--train", "d.csv", "--task-type", "classification", "--output-field", "ref"}),
               Contains("--output-field ref: applies to generation tasks") && Contains("(--task-type classification)"));
}

TEST_CASE("flags::split_list and whole_number: the one list and number parser", "[harness]") {
    CHECK(flags::split_list("a,,b,") == std::vector<std::string>{"a", "b"});
    CHECK(flags::split_list("").empty());
    // A JSON value's commas stay in its item (a --methods entry with a list option).
    CHECK(flags::split_list(R"(lora:target_modules=["fc","proj"],full,p:x="a,b")") ==
          std::vector<std::string>{R"(lora:target_modules=["fc","proj"])", "full", R"(p:x="a,b")"});
    CHECK(flags::method_entry("--methods", R"(lora:r=1:target_modules=["fc","proj"])").settings ==
          nlohmann::json{{"r", 1}, {"target_modules", {"fc", "proj"}}});
    CHECK(flags::whole_number("--sizes", "12", 0) == 12);
    CHECK_THROWS_WITH(flags::whole_number("--sizes", "1x", 0), "--sizes: '1x' is not a whole number");
    CHECK_THROWS_WITH(flags::whole_number("--sizes", "-1", 0), "--sizes: -1 must be >= 0");
    // A value kept in an int is bounded, never wrapped (4294967297 was read as 1).
    CHECK_THROWS_WITH(flags::whole_number("--top-k", "4294967297", 0, std::numeric_limits<int>::max()),
                      "--top-k: 4294967297 must be <= 2147483647");
    CHECK_THROWS_WITH(flags::whole_number("--seed", "9223372036854775808", 0),
                      "--seed: '9223372036854775808' is not a whole number");
    // Real numbers: the whole text, finite ("7x" was read as 7, "0x10" as 0).
    CHECK(flags::real_number("--lr", "0.003") == 0.003);
    CHECK(flags::real_number("--lr", "3e-4") == 3e-4);
    for (const char* bad : {"7x", "0x10", " 7", "", "nan", "inf", "1e999"})
        CHECK_THROWS_WITH(flags::real_number("--lr", bad), fmt::format("--lr: '{}' is not a finite real number", bad));
    CHECK(parse_error({"--lr", "7x"}) == "--lr: '7x' is not a finite real number");
    CHECK(parse_error({"--max-memory", "0x10"}) == "--max-memory: '0x10' is not a finite real number");
    CHECK(parse_error({"--seq", "4294967296"}) == "--seq: 4294967296 must be <= 2147483647");
}

TEST_CASE("pretrain cache key: what changes the base changes the directory, nothing else does", "[harness]") {
    testing::TempDir tmp;
    InDir in(tmp.dir);
    const std::string csv = tmp.file("d.csv", "input,output\na b,c\nd e,f\ng h,i\nj k,l\n");
    auto dir_of = [&](std::vector<std::string> extra) {
        std::vector<std::string> args = {"--config", "tiny", "--tokenizer", "byte", "--pretrain-steps", "5"};
        args.insert(args.end(), extra.begin(), extra.end());
        return harness::prepare_base(parse(args)).dir;
    };
    const std::string d0 = dir_of({});
    CHECK(d0.rfind("runs/pretrain/", 0) == 0);
    CHECK(dir_of({}) == d0);                      // deterministic
    CHECK(dir_of({"--steps", "7"}) == d0);         // fine-tuning flags are not part of the base
    CHECK(dir_of({"--n-train", "50"}) == d0);      // nor the training-set size
    CHECK(dir_of({"--pretrain-steps", "6"}) != d0);
    CHECK(dir_of({"--pretrain-patience", "0"}) == d0);  // off: the bases cached before early stopping existed
    CHECK(dir_of({"--pretrain-patience", "3"}) != d0);  // another base: it may stop early
    CHECK(dir_of({"--seed", "1"}) != d0);
    CHECK(dir_of({"--seq", "40"}) != d0);
    // The word vocabulary comes from the task's data, so a data file changes it.
    auto word_dir = [&](std::vector<std::string> extra) {
        std::vector<std::string> args = {"--config", "tiny", "--pretrain-steps", "5"};
        args.insert(args.end(), extra.begin(), extra.end());
        return harness::prepare_base(parse(args)).dir;
    };
    CHECK(word_dir({"--train", csv}) != word_dir({}));
}

TEST_CASE("a run tells its task whether its tokenizer encodes any text", "[harness]") {
    // A task whose one training target says what its factory was told.
    const std::vector<std::string> names = data::task_names();
    if (std::find(names.begin(), names.end(), "test-open-vocabulary") == names.end())
        data::register_task({"test-open-vocabulary", "records TaskRequest::open_vocabulary", data::TaskDefaults{1, 1, 1, 4, {}},
                             [](const data::TaskRequest& r) {
                                 data::Task t;
                                 const std::string said = r.open_vocabulary ? "open" : "closed";
                                 t.train = t.valid = t.test = {{"x", said, {said}, {}, ""}};
                                 t.scorer = data::exact_match_scorer();
                                 return t;
                             }});
    struct Case {
        std::string tokenizer, base;
        bool open;
    };
    for (const Case& c : {Case{"word", "", false}, Case{"byte", "", true}, Case{"gpt2:/some/dir", "", true},
                          Case{"word", "/a/hf/gpt2", true}}) {
        harness::CommonArgs a = parse({"--task", "test-open-vocabulary"});
        a.tokenizer = c.tokenizer;
        a.base = c.base;
        INFO("--tokenizer " << c.tokenizer << " --base '" << c.base << "'");
        CHECK(harness::open_vocabulary(a) == c.open);
        CHECK(harness::load_task(a).train.at(0).target == (c.open ? "open" : "closed"));
    }
    // The rule agrees with the tokenizers prepare_base builds, which a saved
    // base's evaluation asks instead (adapter eval).
    for (const char* tok : {"word", "byte"}) {
        harness::CommonArgs a = parse({"--task", "test-open-vocabulary", "--tokenizer", tok});
        const harness::Base base = harness::prepare_base(a);
        CHECK(base.tokenizer->open_vocabulary() == harness::open_vocabulary(a));
        CHECK(harness::load_task(a, base.tokenizer->open_vocabulary()).train.at(0).target == harness::load_task(a).train.at(0).target);
    }
}

TEST_CASE("scaled_pretrain_steps: tokens per parameter, a floor and a ceiling", "[harness]") {
    // 1 token per parameter of 10,000 parameters at 768 tokens per update: ceil(13.02) = 14 updates.
    CHECK(harness::scaled_pretrain_steps(10000, 1, 768, 5, 0) == 14);
    CHECK(harness::scaled_pretrain_steps(10000, 4, 768, 5, 0) == 53);    // ceil(52.08)
    CHECK(harness::scaled_pretrain_steps(10000, 1, 768, 300, 0) == 300);  // the floor, --pretrain-steps
    CHECK(harness::scaled_pretrain_steps(10000, 1, 768, 5, 10) == 10);    // the ceiling
    CHECK(harness::scaled_pretrain_steps(10000, 1, 768, 5, 20) == 14);    // a ceiling above the budget
    CHECK_THROWS_WITH(harness::scaled_pretrain_steps(10000, 1, 768, 300, 10),
                      "--pretrain-max-steps: 10 is below --pretrain-steps 300, the fewest steps of any base");
    CHECK_THROWS_WITH(harness::scaled_pretrain_steps(1e30L, 100, 1, 5, 0),
                      Contains("--pretrain-tokens-per-param") && Contains("set --pretrain-max-steps"));
    CHECK(harness::scaled_pretrain_steps(1e30L, 100, 1, 5, 1000) == 1000);
}

namespace {
// A small base of our own for the task of `a` (no pretraining: the harness
// only needs a saved model and its tokenizer), saved under `dir`.
harness::Base untrained_base(const harness::CommonArgs& a, const std::string& dir) {
    data::Task raw = harness::load_task(a);
    std::string text;
    for (const auto* split : {&raw.train, &raw.valid, &raw.test})
        for (const data::Example& ex : *split)
            for (const std::string& r : ex.references) text += ex.source + std::string(data::kSeparator) + r + "\n";
    harness::Base base;
    base.tokenizer = std::make_unique<data::WordTokenizer>(data::WordTokenizer::build(text, 1000));
    base.config.vocab = base.tokenizer->vocab_size();
    base.config.d_model = 16, base.config.n_layers = 1, base.config.n_heads = 2, base.config.d_ff = 32;
    base.config.max_seq = 40;
    base.dir = dir;
    base.model_path = dir + "/model.safetensors";
    fs::create_directories(base.dir);
    save_model(base.model_path, GPT(base.config, 3));
    base.cached = true;
    return base;
}
}  // namespace

TEST_CASE("adapters_not_in names the adapter directories no row saved, however --out was spelled", "[harness]") {
    testing::TempDir tmp;
    for (const char* label : {"lora", "prompt", "prefix"}) fs::create_directories(tmp.path("out/adapters/") + label);
    std::vector<harness::MethodResult> rs(3);
    rs[0].adapter_dir = tmp.path("out/adapters/lora");  // this run's
    rs[1].adapter_dir = "elsewhere/then/adapters/prompt";  // kept from a run given another spelling of --out
    // rs[2]: saved nothing (the unadapted base)
    CHECK(harness::adapters_not_in(tmp.path("out"), rs) == std::vector<std::string>{"prefix"});
    CHECK(harness::adapters_not_in(tmp.path("none"), rs).empty());
}

TEST_CASE("a split's loss is the mean over its target tokens, whatever the batch size", "[harness]") {
    testing::TempDir tmp;
    harness::CommonArgs a = parse({"--train", "tests/fixtures/data/restaurants.csv", "--input-field", "mr",
                                   "--output-field", "ref", "--out", tmp.path("out")});
    const harness::Base base = untrained_base(a, tmp.path("base"));
    const data::Task task = harness::load_task(a, base);
    harness::detail::Run run = harness::detail::make_run(base, harness::make_spec(a, "none"), 0);
    // References of different lengths: batches hold different numbers of target
    // tokens. Once, each batch's mean was weighted by its rows, and the valid
    // loss moved with --batch (3.3633 at 1, 3.3575 at 16 in one user's run).
    const auto& split = task.train;  // 32 examples
    const double one = harness::detail::split_loss(run, split, *base.tokenizer, 1);
    for (int64_t batch : {int64_t(3), int64_t(7), int64_t(split.size())}) {
        CAPTURE(batch);
        CHECK(harness::detail::split_loss(run, split, *base.tokenizer, batch) == Approx(one).epsilon(1e-5));
    }
}

TEST_CASE("run_method on a file-backed task: results, and a saved adapter that reloads", "[harness]") {
    testing::TempDir tmp;
    // A generation task from the E2E-format fixture, split from one file.
    harness::CommonArgs a = parse({"--train", "tests/fixtures/data/restaurants.csv", "--input-field", "mr",
                                   "--output-field", "ref", "--out", tmp.path("out")});
    const harness::Base base = untrained_base(a, tmp.path("base"));
    data::Task task = harness::load_task(a, base);
    CHECK(task.defaults.max_new_tokens > 1);  // from the data: the longest reference + EOS
    harness::MethodSpec spec = harness::make_spec(a, "lora");
    harness::Budget budget;
    budget.steps = 3;
    budget.search_steps = 1;
    budget.lr = 1e-2;
    budget.batch = 4;
    budget.eval_examples = 2;
    harness::MethodResult res = harness::run_method(base, task, spec, budget, tmp.path("out"), 0);
    CHECK(res.metric_name == "bleu");
    CHECK(res.extra_metrics.count("rouge_l") == 1);
    CHECK(res.steps == 3);
    CHECK(res.loss_curve.size() == 3);
    CHECK(res.eval_examples == 2);
    CHECK(std::isfinite(res.test_loss));
    REQUIRE(fs::exists(res.adapter_dir + "/" + peft::kAdapterConfigFile));
    // A random-init reference has no base on disk it could be loaded onto: nothing is saved for it.
    const harness::MethodResult random_init =
        harness::run_method(base, task, {"full", "full (random init)", {}, true}, budget, tmp.path("out"), 0);
    CHECK(random_init.adapter_dir.empty());
    CHECK(!fs::exists(tmp.path("out/adapters/full-random-init")));

    // The saved adapter on a fresh copy of the base gives the same test loss.
    auto model = load_model_new(base.model_path);
    auto adapter = peft::load_adapter(res.adapter_dir, *model);
    CHECK(adapter->method() == "lora");
    adapter->activate(*model);
    harness::MethodResult again =
        harness::evaluate(std::move(model), std::move(adapter), *base.tokenizer, task, 2, budget.batch, "reloaded");
    CHECK(again.test_loss == res.test_loss);
    CHECK(again.metric == res.metric);
    CHECK(harness::unknown_words_flag(task, *base.tokenizer).empty());  // the vocabulary was built from these data
    // Text the word vocabulary lacks is flagged: the metric then says little.
    data::Task foreign = task;
    foreign.test.front().source += " zyzzyva";
    CHECK(harness::unknown_words_flag(foreign, *base.tokenizer) ==
          fmt::format("unknown words: 1 of {} test examples have words the base's word vocabulary lacks (each encodes "
                      "as one unknown id; the vocabulary keeps the words frequent in the data it was built from)",
                      foreign.test.size()));
    CHECK(harness::unknown_words_flag(foreign, data::ByteTokenizer()).empty());  // an open vocabulary has none

    // The adapter records its data (absolute paths), and they rebuild the same examples from another directory.
    const nlohmann::json recorded = peft::trained_on(res.adapter_dir);
    CHECK(recorded.at("files").at("train") == fs::absolute("tests/fixtures/data/restaurants.csv").string());
    CHECK(recorded.at("files").at("input_field") == "mr");
    harness::CommonArgs b;
    {
        InDir elsewhere(tmp.dir);
        harness::apply_data_recipe(recorded, b, "cfg");
        const data::Task rebuilt = harness::load_task(b, base);
        CHECK(harness::data_report_json(rebuilt).at("content_hash") == harness::data_report_json(task).at("content_hash"));
    }
    auto recipe_error = [&](const std::function<void(nlohmann::json&)>& edit) {
        nlohmann::json j = recorded;
        edit(j);
        try {
            harness::apply_data_recipe(j, b, "cfg");
        } catch (const std::runtime_error& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    CHECK(recipe_error([](nlohmann::json& j) { j["seed"] = -1; }) == "cfg: key 'seed': must be a whole number >= 0");
    CHECK(recipe_error([](nlohmann::json& j) { j["task"] = "e2e"; }) == "cfg: key 'task': give exactly one of 'task' and 'files'");
    CHECK(recipe_error([](nlohmann::json& j) { j["files"].erase("label_field"); }) == "cfg: key 'files.label_field': must be text");
    CHECK_THAT(recipe_error([](nlohmann::json& j) { j["truncate"] = "middle"; }), Contains("cfg: key 'truncate'"));
    CHECK_THAT(recipe_error([](nlohmann::json& j) { j.erase("files"); j["task"] = "nope"; }),
               Contains("cfg: key 'task'") && Contains("nope"));

    // results.json: the fields a reader relies on, `extra` merged at the top.
    const nlohmann::json extra = {{"task", task.name}, {"data", harness::data_report_json(task)}};
    harness::write_results(tmp.path("out"), "compare", {res}, extra);
    std::ifstream f(tmp.path("out/results.json"));
    const nlohmann::json j = nlohmann::json::parse(f);
    CHECK(j.at("experiment") == "compare");
    CHECK(j.at("task") == "tests/fixtures/data/restaurants.csv");
    CHECK(j.at("data").at("splits").at("test").at("examples") == task.test.size());
    CHECK(j.at("data").at("left_out") == 0);
    const nlohmann::json& m = j.at("methods").at(0);
    for (const char* key : {"method", "label", "trainable_params", "final_valid_loss", "test_loss", "metric", "steps",
                            "lr", "lr_grid", "lr_search", "loss_curve", "valid_curve", "flags", "adapter_dir",
                            "eval_examples", "samples"})
        CHECK(m.contains(key));
    CHECK(m.at("metric").at("name") == "bleu");
    CHECK(m.at("metric").contains("rouge_l"));
    CHECK(m.at("adapter_dir") == res.adapter_dir);
    CHECK(m.at("loss_curve").size() == 3);
    // A rerun with the same settings finds the method finished; other settings do not.
    CHECK(harness::finished_results(tmp.path("out/results.json"), extra).count(res.label) == 1);
    CHECK(harness::finished_results(tmp.path("out/results.json"), {{"task", "other"}}).empty());
    // Data edited in place (same file, same row count, one target changed) is other settings too.
    data::Task edited = task;
    edited.test.back().target += " again";
    edited.test.back().references.front() = edited.test.back().target;
    const nlohmann::json edited_extra = {{"task", task.name}, {"data", harness::data_report_json(edited)}};
    CHECK(edited_extra.at("data").at("content_hash") != extra.at("data").at("content_hash"));
    CHECK(harness::finished_results(tmp.path("out/results.json"), edited_extra).empty());
    // Once, a generation that stopped inside a UTF-8 character (byte-level BPE)
    // made results.json's dump throw after the whole run: each bad byte is U+FFFD.
    harness::MethodResult broken = res;
    broken.samples = {{"source", std::string("ok \x90\x90", 5)}};
    harness::write_results(tmp.path("out"), "compare", {broken}, extra);
    const nlohmann::json written = nlohmann::json::parse(std::ifstream(tmp.path("out/results.json")));
    CHECK(written.at("methods").at(0).at("samples").at(0).at("generated") == "ok \uFFFD\uFFFD");
}

TEST_CASE("evaluate flags a model whose losses are not finite", "[harness]") {
    testing::TempDir tmp;
    harness::CommonArgs a = parse({"--train", "tests/fixtures/data/restaurants.csv", "--input-field", "mr",
                                   "--output-field", "ref"});
    const harness::Base base = untrained_base(a, tmp.path("base"));
    data::Task task = harness::load_task(a, base);
    auto model = load_model_new(base.model_path);
    harness::MethodResult fine = harness::evaluate(std::move(model), nullptr, *base.tokenizer, task, 2, 4, "fine");
    CHECK(std::none_of(fine.flags.begin(), fine.flags.end(),
                       [](const std::string& f) { return f.rfind("non-finite loss", 0) == 0; }));
    model = load_model_new(base.model_path);
    model->ln_f.weight.data()[0] = std::nanf("");  // what a diverged run leaves
    harness::MethodResult broken = harness::evaluate(std::move(model), nullptr, *base.tokenizer, task, 2, 4, "broken");
    CHECK(std::isnan(broken.test_loss));
    CHECK(std::any_of(broken.flags.begin(), broken.flags.end(),
                      [](const std::string& f) { return f.rfind("non-finite loss: valid nan, test nan", 0) == 0; }));
}

TEST_CASE("run_method with --patience keeps the weights of the lowest valid loss", "[harness]") {
    testing::TempDir tmp;
    harness::CommonArgs a = parse({"--train", "tests/fixtures/data/restaurants.csv", "--input-field", "mr",
                                   "--output-field", "ref", "--patience", "2"});
    CHECK(a.patience == 2);
    CHECK(parse_error({"--patience", "-1"}) == "--patience: -1 must be >= 0 (0: off)");
    // A value that is not a number names its flag (cxxopts names only the value).
    CHECK(parse_error({"--patience", "abc"}) == "--patience: 'abc' is not a valid value (see --help)");
    CHECK(parse_error({"--patience=2.5"}) == "--patience: '2.5' is not a valid value (see --help)");
    const harness::Base base = untrained_base(a, tmp.path("base"));
    data::Task task = harness::load_task(a, base);
    harness::Budget budget = harness::make_budget(a);
    CHECK(budget.patience == 2);
    budget.steps = 60;
    budget.lr = 3.0;  // far too high: the valid loss soon stops improving
    budget.batch = 4;
    budget.eval_examples = 1;
    harness::MethodResult res = harness::run_method(base, task, harness::make_spec(a, "lora"), budget, "", 0);
    // Evaluated every 60 / 20 = 3 updates; stopped 2 evaluations after the best one.
    REQUIRE(res.valid_curve.size() >= 3);
    auto best = res.valid_curve.begin();
    for (auto it = res.valid_curve.begin(); it != res.valid_curve.end(); ++it) {
        CHECK(it->first % 3 == 0);
        if (it->second < best->second) best = it;  // strict: the first of equal values
    }
    CHECK(res.best_step == best->first);
    CHECK(res.steps < budget.steps);
    CHECK(res.steps == res.valid_curve.back().first);
    CHECK(res.steps - res.best_step == 2 * 3);
    // The kept weights are the best evaluation's: the valid loss measured again equals it.
    CHECK(res.final_valid_loss == best->second);
    CHECK(harness::MethodResult::from_json(res.to_json()).best_step == res.best_step);
    CHECK_THAT(harness::results_table_md({res}),
               Contains(fmt::format("(update {} of {} run)", res.best_step, res.steps)));
    // The patience is a setting of the run: results of another patience are not reused.
    CHECK(harness::run_settings_json(a, base, 1).at("patience") == 2);
    CHECK(harness::run_settings_json(parse({}), base, 1).at("patience") == 0);
}

TEST_CASE("degenerate generations are flagged: all empty, or all the same", "[harness]") {
    // A task of three distinct prompts; a model whose every step predicts one
    // token whatever the input: zero weights (so the final hidden state is
    // ln_f's bias u) and the head row of word w (or EOS) equal to 5u.
    data::Task task = data::make_task("reverse", 20, 4, 4, 1);
    std::string text;
    for (const data::Example& ex : task.train) text += data::format_example(ex) + "\n";
    const data::WordTokenizer tok = data::WordTokenizer::build(text, 100);
    GPTConfig c;
    c.vocab = tok.vocab_size(), c.d_model = 8, c.n_layers = 1, c.n_heads = 2, c.d_ff = 16, c.max_seq = 48;
    auto constant_model = [&](int32_t token) {
        auto m = std::make_unique<GPT>(c, 0);
        for (auto& [name, t] : m->named_parameters()) std::fill(t.data(), t.data() + t.numel(), 0.f);
        m->parameter("ln_f.bias").data()[0] = 1.f;
        m->parameter("head.weight").data()[int64_t(token) * c.d_model] = 5.f;
        return m;
    };
    const int32_t word = tok.encode("3")[0];
    harness::MethodResult same = harness::evaluate(constant_model(word), nullptr, tok, task, 3, 3, "constant");
    REQUIRE(same.samples.size() == 3);
    CHECK(same.samples[0].second == same.samples[2].second);
    CHECK_FALSE(same.samples[0].second.empty());
    REQUIRE(same.flags.size() == 1);
    CHECK_THAT(same.flags[0], Contains("constant output: all 3 generations are \"" + same.samples[0].second + "\""));

    // A metric's own flag (BLEU 0 on a generation task) does not hide "constant output": once it did.
    const data::Task e2e = data::make_task("e2e", 20, 4, 4, 1);
    std::string e2e_text;
    for (const data::Example& ex : e2e.train) e2e_text += data::format_example(ex) + "\n";
    const data::WordTokenizer e2e_tok = data::WordTokenizer::build(e2e_text, 200);
    c.vocab = e2e_tok.vocab_size();
    harness::MethodResult e2e_same =
        harness::evaluate(constant_model(e2e_tok.encode("the")[0]), nullptr, e2e_tok, e2e, 3, 3, "constant");
    CHECK(std::count_if(e2e_same.flags.begin(), e2e_same.flags.end(),
                        [](const std::string& f) { return f.rfind("constant output: all 3", 0) == 0; }) == 1);
    CHECK(std::count_if(e2e_same.flags.begin(), e2e_same.flags.end(),
                        [](const std::string& f) { return f.rfind("bleu 0", 0) == 0; }) == 1);
    c.vocab = tok.vocab_size();

    harness::MethodResult empty = harness::evaluate(constant_model(tok.eos_id()), nullptr, tok, task, 3, 3, "empty");
    CHECK(empty.samples[0].second.empty());
    CHECK(empty.flags == std::vector<std::string>{"empty generations: all 3 outputs are empty"});
}

TEST_CASE("plot_png: labels with quotes (\"full's\") draw, and the PNG lands whole", "[harness]") {
    if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
        WARN("gnuplot is not installed (make deps installs gnuplot-nox): plot_png not exercised");
        return;
    }
    testing::TempDir tmp;
    const std::string png = tmp.path("gap's.png");
    harness::Series s;
    s.title = "prefix's gap";
    s.points = {{1e5, 0.4}, {1e6, 0.2}};
    REQUIRE(harness::plot_png(png, "gap to full's loss", "base parameters", "test loss - full's", {s}, true));
    std::ifstream f(png, std::ios::binary);
    char magic[4] = {};
    f.read(magic, 4);
    CHECK(std::string(magic + 1, 3) == "PNG");
    CHECK_FALSE(fs::exists(png + ".tmp"));
}
