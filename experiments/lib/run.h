#pragma once
// Internal to experiments/lib: the model and adapter of one fine-tuning run
// and the steps that fine-tuning (finetune.cpp), evaluation (evaluate.cpp)
// and the base (base.cpp) share. Not for the experiment binaries: they use
// harness.h.
#include <chrono>
#include <memory>
#include <string_view>
#include <vector>

#include "experiments/lib/harness.h"
#include "nn/module.h"

namespace peftlab::harness::detail {

// The model and adapter of one run, built fresh from the cached base.
struct Run {
    std::unique_ptr<GPT> model;
    std::unique_ptr<peft::Adapter> adapter;  // null for "none"
};

// The base (or a fresh random model, spec.random_base) with spec's adapter
// activated on it; for "none" the base frozen.
Run make_run(const Base& base, const MethodSpec& spec, uint64_t seed);
// The tensors a run trains: the adapter's parameters (none for "none").
NamedTensors trained_tensors(const Run& r);
// Mean loss over every target token of a split (each batch's mean weighted by
// its counted targets), computed in batches of `batch` examples: the same for
// any batch size up to rounding.
double split_loss(Run& r, const std::vector<data::Example>& split, const data::Tokenizer& tok, int64_t batch);
double valid_loss(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t batch);
// The task's metric(s) on greedy generations for the first n test examples,
// with samples and the generic flags (empty or constant outputs), into res.
void score(Run& r, const data::Task& task, const data::Tokenizer& tok, int64_t n, int64_t batch, MethodResult& res);
// load_task(args) fitted to the base's tokenizer and --seq (--truncate), quietly.
data::Task fitted_task(const CommonArgs& args, const data::Tokenizer& tok, int64_t max_seq);
double seconds_since(std::chrono::steady_clock::time_point t0);
// 64-bit FNV-1a of s, continuing from h (cache keys: bases, results.json).
uint64_t fnv1a(std::string_view s, uint64_t h = 1469598103934665603ull);

}  // namespace peftlab::harness::detail
