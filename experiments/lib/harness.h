#pragma once
// Shared machinery of the experiment binaries: common flags, the cached
// pretrained base, fine-tuning one PEFT method on a task under a fixed budget,
// evaluation, and the files every run writes (results.json, metrics.csv,
// report.md, plots).
#include <cxxopts.hpp>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "datasets/files.h"
#include "datasets/task.h"
#include "datasets/tokenizer.h"
#include "nn/gpt.h"
#include "peft/adapter.h"

namespace peftlab::harness {

// Flags every experiment takes (same names everywhere).
struct CommonArgs {
    std::string config = "demo";  // named dimension preset; dimension flags override it
    GPTConfig model;
    int64_t batch = 16;  // the global batch: rows per update over all ranks and micro-batches
    int grad_accum = 1;  // micro-batches per update on each rank (--grad-accum)
    std::string task = "e2e";
    // A task from files instead (datasets/files.h): --train [--valid --test],
    // generation (--input-field/--output-field) or classification
    // (--text-field/--label-field/--label-words); --truncate for examples
    // longer than --seq.
    data::FileTaskOptions files;  // files.train "" = the registered task --task
    std::string truncate = "left";
    std::vector<std::string> methods;
    uint64_t seed = 0;
    int threads = 0;
    int64_t steps = 0;  // fine-tuning updates per method
    // > 0: fine-tuning evaluates every steps / patience_evals updates (20; sweep-data 10) and stops after this
    // many evaluations without a lower valid loss, keeping the best
    // evaluation's weights: the training length is chosen on the validation
    // split (Hugging Face's EarlyStoppingCallback with load_best_model_at_end).
    // 0: every step runs and the last weights are kept.
    int64_t patience = 0;
    double lr = 0.0;    // 0: lr_zero below says what
    // What --lr 0 means in this binary (its --help says it): a search over each
    // method's lr_grid (compare, sweep-scale) or each method's default rate.
    std::string lr_zero = "a small per-method search over a few rates";
    // With --patience, fine-tuning evaluates every max(1, steps / this) updates.
    int64_t patience_evals = 20;
    std::string out;    // run directory, default runs/<experiment>
    int64_t prefix_len = 16;
    std::string tokenizer = "word";  // word | byte | gpt2:DIR
    std::string corpus;              // a UTF-8 file to pretrain on instead of the built-in corpus
    std::string base;       // a Hugging Face GPT-2 directory: its config, weights and tokenizer; no pretraining
    std::string positions;  // adapters' position convention: hf | keep; "" = hf with --base, else keep
    int64_t pretrain_steps = 4000;  // one default for every experiment, so they share the cached base
    // > 0: pretraining evaluates every pretrain_steps / 20 updates and stops
    // after this many evaluations without a lower valid loss; the base is the
    // best evaluation's weights (Trainer's early stopping). 0: every step runs.
    int64_t pretrain_patience = 0;
    size_t n_train = 0, n_valid = 0, n_test = 0;
    int64_t eval_examples = 0;  // test examples scored by generation
    // Fine-tuning's blocks with activation recomputation (GPT::set_recompute),
    // a layer spec as the adapters' (all, none, top:k, bottom:k, 0,2): same
    // results bit for bit, less memory, one more forward of those blocks.
    std::string recompute = "none";
    // The memory a run may use, in bytes: 0 = what the system has available
    // (MemAvailable, RLIMIT_AS); < 0 = no check (--max-memory GB, 0 there).
    double max_memory = 0;
    // Whether the binary fine-tunes: pretrain sets false, and then the
    // fine-tuning flags (--methods, --steps, --lr, ...) are neither offered nor read.
    bool fine_tunes = true;
    // Common flags this binary sets itself, each with the reason (e.g. "d-model"
    // -> "sweep-scale sets the dimensions from --sizes"): given on the command
    // line, parse_common refuses them, so that no flag is ignored silently.
    std::map<std::string, std::string> taken_over;
};

// Adds the common flags to `opts` with the experiment's defaults (only the
// pretraining ones when defaults.fine_tunes is false).
void add_common_flags(cxxopts::Options& opts, const CommonArgs& defaults);
// The flags that name a run's data, which add_common_flags includes: --task, or
// --train [--valid --test] with --task-type and the field flags, --label-words,
// --truncate and --seed. parse_data_flags sets them on `args`, refusing (with
// std::invalid_argument naming the flag and value) an unknown task, --task
// with --train, and a field flag that nothing would read.
// With `recorded` non-empty, --task and --seed show it as their default
// (e.g. "the data the adapter was trained on") and, when not given, keep
// the values `args` had before parse_data_flags.
void add_data_flags(cxxopts::Options& opts, const CommonArgs& defaults, const std::string& recorded = "");
void parse_data_flags(const cxxopts::ParseResult& r, CommonArgs& args);
// The data `args` name, as JSON a saved adapter keeps under "trained_on" so
// that `adapter eval` finds them again: {"task": NAME} or {"files": {"train",
// "valid", "test" (absolute paths), "classification", "input_field",
// "output_field", "text_field", "label_field", "label_words"}}, with "seed",
// "n_train" and "truncate" (a saved adapter's record adds "content_hash", the
// examples' hash of data_report_json, which apply_data_recipe leaves to the
// caller to compare). apply_data_recipe sets them back on `args`;
// throws std::runtime_error naming `where` and the key for a malformed one.
nlohmann::json data_recipe(const CommonArgs& args);
void apply_data_recipe(const nlohmann::json& recipe, CommonArgs& args, const std::string& where);
// Parses them; bad values throw std::invalid_argument naming the flag and value
// (an empty or duplicated --methods list included).
CommonArgs parse_common(const cxxopts::ParseResult& r, const CommonArgs& defaults);
// Parses argv; --help prints the flags and, for a fine-tuning binary, the
// registered methods with their descriptions. Applies the thread count
// (--threads, else PEFTLAB_THREADS; capped at the cores, see
// flags::configure_threads) and prints it. On a bad flag prints the error and
// exits with status 2.
CommonArgs parse_or_exit(cxxopts::Options& opts, int argc, char** argv, const CommonArgs& defaults,
                         cxxopts::ParseResult* result = nullptr);
// The --help text after the flags: every --methods entry with its description.
std::string methods_help();

// The pretrained base and its tokenizer, loaded from the cache under
// runs/pretrain/<hash of config, tokenizer, corpus, steps, seed>/ or trained
// there first.
struct Base {
    std::string dir;  // cache directory holding model.safetensors
    std::string model_path;
    std::unique_ptr<data::Tokenizer> tokenizer;
    GPTConfig config;
    double pretrain_valid_loss = 0.0;
    double pretrain_seconds = 0.0;  // 0 when loaded from the cache
    int64_t pretrain_best_step = 0;  // --pretrain-patience: the update the base's weights are from (0: the last)
    bool cached = false;
    nlohmann::json key;                 // what the cache directory's name hashes
    std::vector<int32_t> corpus_tokens;  // the pretraining stream (only while not cached)
    bool hf = false;  // dir (= model_path) is a Hugging Face GPT-2 directory (--base)
};
// Checks the run first (check_run), then loads the base from the cache or
// pretrains it (saying why a new base is needed: which part of the cache key
// differs from the nearest cached base). Pretraining checkpoints every
// ~5% of its steps into the cache directory and resumes from there when a
// killed run is started again.
Base load_or_pretrain(const CommonArgs& args);
// The tokenizer of a base a user names by path: `spec` "gpt2:DIR" (GPT-2 BPE
// files in DIR), else a Hugging Face GPT-2 directory's own files, else the
// tokenizer a peftlab checkpoint records in its metadata. Throws naming the
// path when none is found, and std::invalid_argument when `spec` beside a
// checkpoint is not the vocabulary it records (another fingerprint, or
// another kind of tokenizer).
std::unique_ptr<data::Tokenizer> base_tokenizer(const std::string& spec, const std::string& base_path);
// Throws std::invalid_argument naming the base and both sizes when `tok` has
// more tokens than the model's embedding rows (model_vocab): its larger ids
// would have no embedding. A smaller tokenizer is fine (GPT-2 bases are often
// padded to a rounder vocabulary).
void check_tokenizer_fits(const data::Tokenizer& tok, int64_t model_vocab, const std::string& base_path);
// The tokenizer, config and cache directory of the base `args` describe,
// without training anything (base.cached says whether the model exists).
Base prepare_base(const CommonArgs& args);

// What a run needs before it spends any compute, checked up front. Throws
// std::invalid_argument naming the flag and value for: an --out that cannot
// be written; a method with no trainable parameters under the options (e.g.
// --prefix-len 0); a --seq too short for the task's targets and generation; a
// corpus too small for pretraining windows of --seq tokens; an estimated peak
// memory above what the run may use (estimate_peak_bytes; --max-memory
// overrides). Prints notes (to stderr) for what it adjusts or warns about.
void check_run(const CommonArgs& args, const Base& base, const data::Task& task);

// Estimated peak bytes of one training step (weights, the trained tensors'
// gradients and AdamW moments, saved activations, logits, attention
// scratch), from the config alone; long double because a user's sizes can
// exceed 64 bits. `trainable` = the adapter's formula count (the base's own
// parameter count for full fine-tuning, which then adds no weights);
// `extra_tokens` = virtual tokens or prefix keys per row.
struct MemoryEstimate {
    long double weights = 0, training_state = 0, activations = 0, attention = 0;
    long double total() const { return weights + training_state + activations + attention; }
    std::string describe() const;  // "12.3 GB (weights 1.0 GB, ...)"
};
MemoryEstimate estimate_peak_bytes(const GPTConfig& cfg, int64_t batch, int64_t seq, long double trainable,
                                   bool trains_base, int64_t extra_tokens, int threads);
// Base parameters of cfg (tied embeddings: wte, wpe, L blocks, final LayerNorm).
long double base_param_count(const GPTConfig& cfg);
// A pretraining budget that grows with the base: ceil(tokens_per_param x
// n_params / tokens_per_step) updates, at least min_steps and, when
// max_steps > 0, at most max_steps (the ceiling that lets a large base into a
// sweep whose smaller bases keep their full budget; report it as capped).
// Throws std::invalid_argument naming --pretrain-max-steps when it is below
// min_steps (--pretrain-steps).
int64_t scaled_pretrain_steps(long double n_params, int64_t tokens_per_param, int64_t tokens_per_step,
                              int64_t min_steps, int64_t max_steps);
// Bytes this process may still allocate: min(MemAvailable, RLIMIT_AS - VmSize); -1 if unknown.
long double available_memory_bytes();

// Whether the tokenizer prepare_base gives `args` encodes any text (a --base's
// GPT-2 BPE, --tokenizer byte or gpt2:DIR) rather than being a word
// vocabulary built from the data (data::TaskRequest::open_vocabulary).
bool open_vocabulary(const CommonArgs& args);
// The task's data as read or generated: the files of --train/--valid/--test,
// else the registered task --task sized by --n-train (or its defaults), told
// whether the run's tokenizer has an open vocabulary (open_vocabulary(args)
// unless given: a saved base's own tokenizer).
data::Task load_task(const CommonArgs& args);
data::Task load_task(const CommonArgs& args, bool open_vocabulary);
// The same fitted to the base's tokenizer and context (data::fit_to_context
// with --truncate), its data report printed to stderr: what a run trains on.
data::Task load_task(const CommonArgs& args, const Base& base);
// The same for a base given as its tokenizer and context length (max_seq).
data::Task load_task(const CommonArgs& args, const data::Tokenizer& tok, int64_t max_seq);
// The task's data report as results.json holds it: the name, and per split
// the file, rows, examples, pairs and the rows left out or truncated, with notes.
nlohmann::json data_report_json(const data::Task& task);

// One fine-tuning run's outcome (the fields of results.json).
struct MethodResult {
    std::string method;  // registry name, or a label such as "none" / "full (random init)"
    std::string label;   // display name, e.g. "prefix (reparam)"
    int64_t trainable_params = 0;
    double trainable_pct = 0.0;
    int64_t step_flops = 0;  // one training step, from the autograd counters
    double ms_per_step = 0.0;
    int64_t peak_bytes = 0;  // peak tracked tensor bytes during a training step
    double final_valid_loss = 0.0;
    std::string metric_name;
    double metric = 0.0;
    std::map<std::string, double> extra_metrics;  // e.g. slot_error_rate
    std::vector<std::pair<std::string, std::string>> samples;  // (source, generated) of the first test examples
    int64_t steps = 0;      // updates run (fewer than the budget when early stopping ended the run)
    int64_t best_step = 0;  // with patience: the update the kept weights are from; 0: the last
    double lr = 0.0;
    std::vector<std::pair<double, double>> lr_search;     // (lr, valid loss) tried
    std::vector<double> loss_curve;                       // training loss per update
    std::vector<std::pair<int64_t, double>> valid_curve;  // (update, valid loss)
    std::vector<double> lr_grid;  // the grid searched (extended past an edge that won)
    double test_loss = 0.0;       // held-out: the test split, never used for selection
    int64_t eval_examples = 0;    // test examples actually scored
    // Degenerate outcomes said in words: "single class: ...", "constant output: ...",
    // "empty generations: ...", "below base: ...", "lr at grid edge: ...", "non-finite loss: ...".
    std::vector<std::string> flags;
    std::string adapter_dir;  // where the trained adapter was saved (peft::save_adapter), "" if not
    nlohmann::json to_json() const;
    // Reads what to_json wrote plus "loss_curve" (a rerun skips finished methods).
    static MethodResult from_json(const nlohmann::json& j);
};
// Flags every result whose metric is below the unadapted base's (method "none").
void flag_below_base(std::vector<MethodResult>& rs);
// A label as a file name: letters, digits, '-', '_', '.'; runs of others become '-'.
std::string file_safe(const std::string& label);
// One line in the spirit of Hugging Face PEFT's print_trainable_parameters:
// "trainable params: 8,192 || all params: 843,904 || trainable%: 0.971 (L*n*d = 8,192; L=4, d=128, n=16)".
std::string trainable_params_line(const peft::Adapter& adapter, const GPT& model);

// What to fine-tune and how long.
struct MethodSpec {
    std::string method;  // registry name, or "none" (no training: the unadapted base)
    std::string label;
    peft::AdapterOptions options;
    bool random_base = false;  // start from a freshly initialised model instead of the pretrained one
    std::string recompute = "none";  // CommonArgs::recompute
};

struct Budget {
    int64_t steps = 300;
    int64_t search_steps = 60;    // per learning-rate candidate
    std::vector<double> lr_grid;  // empty: the method's default grid
    double lr = 0.0;              // > 0: no search
    int64_t batch = 16;      // global batch
    int grad_accum = 1;      // micro-batches per update on each rank
    int64_t eval_every = 0;  // 0: steps / 5 (steps / 20 with patience)
    int64_t patience = 0;    // CommonArgs::patience
    int64_t eval_examples = 100;
};

// The spec of a --methods entry (flags::method_entry: a method, optionally with
// settings of its own options, "prefix:reparam=true") with the common options:
// n, seed, positions.
MethodSpec make_spec(const CommonArgs& args, const std::string& entry);
// The budget the common flags describe (lr 0 = search).
Budget make_budget(const CommonArgs& args);
// Default lr when a sweep does not search: the middle of the method's grid.
double default_lr(const std::string& method);


// Default learning-rate grid per method (3 candidates, the same count for all).
std::vector<double> default_lr_grid(const std::string& method);

// Fine-tunes `spec` from the base on the task (lr search, then the full
// budget at the best lr) and evaluates on the test split.
MethodResult run_method(const Base& base, const data::Task& task, const MethodSpec& spec, const Budget& budget,
                        const std::string& out_dir, uint64_t seed);

// A flag when `tok` has a closed (word) vocabulary and test examples hold
// words it lacks: "unknown words: N of M test examples ..."; "" otherwise.
// For data other than a base was built for, where the metric then says little.
std::string unknown_words_flag(const data::Task& task, const data::Tokenizer& tok);

// Evaluates `model` (with `adapter` activated on it, or none) on the task:
// loss on the validation and test splits, and the task's metric on the first
// eval_examples test examples (greedy decoding), flags included.
MethodResult evaluate(std::unique_ptr<GPT> model, std::unique_ptr<peft::Adapter> adapter, const data::Tokenizer& tok,
                      const data::Task& task, int64_t eval_examples, int64_t batch, const std::string& label);

// Writes results.json (with `extra` merged at the top level), metrics.csv (one
// row per method and update: method, step, train_loss, valid_loss) and the
// loss-curve plot. Returns the markdown table of the results.
std::string write_results(const std::string& dir, const std::string& experiment, const std::vector<MethodResult>& rs,
                          const nlohmann::json& extra);
std::string results_table_md(const std::vector<MethodResult>& rs);
// The directories under out_dir/adapters/ that no row of rs saved (an earlier
// run's, with other settings or methods), sorted: run_method overwrites only
// its own, so the run's summary names these rather than list them as its own.
std::vector<std::string> adapters_not_in(const std::string& out_dir, const std::vector<MethodResult>& rs);
// Early stopping (--patience, --pretrain-patience) in words for a report:
// ", kept at the best of its valid-loss evaluations ..."; "" when patience is 0.
std::string early_stopping_words(int64_t patience);
// The settings a training experiment's results.json starts with (and that
// finished_results compares): the base's config and file, the seed, the
// budget (steps, search_steps, batch, lr), prefix_len, n_train, tokenizer.
// Each experiment adds its own fields (task, tasks, eval_examples, ...).
nlohmann::json run_settings_json(const CommonArgs& a, const Base& base, int64_t search_steps);
// The methods (by label) of an earlier run's results.json whose top-level
// settings equal every field of `settings`; empty when the file is missing,
// unreadable or from other settings.
std::map<std::string, MethodResult> finished_results(const std::string& path, const nlohmann::json& settings);
void print_results_table(const std::vector<MethodResult>& rs);

// gnuplot line/point plot to dir/name.png; series: title -> (x, y) points.
// Returns false (after saying why on stderr) if gnuplot is missing or fails.
struct Series {
    std::string title;
    std::vector<std::pair<double, double>> points;
    std::string style = "";  // gnuplot "with" style; "": lines with points
};
bool plot_png(const std::string& path, const std::string& title, const std::string& xlabel, const std::string& ylabel,
              const std::vector<Series>& series, bool log_x = false);

}  // namespace peftlab::harness
