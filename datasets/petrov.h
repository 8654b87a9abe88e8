#pragma once
// The digit-sequence tasks of Petrov, Torr & Bibi, "When Do Prompting and
// Prefix-Tuning Work? A Theory of Capabilities and Limitations" (ICLR 2024),
// Sections 5-6, as in their companion code (minGPT/mingpt/data_tools.py of
// AleksandarPetrov/prefix-tuning-theory):
//   an input is kPetrovLength digits, each uniform in 1..kPetrovDigits; half
//   of the draws are kept only if they have at most kPetrovLength / 2 distinct
//   digits (the paper's boost of inputs with many repeats, which the
//   histogram needs); the output is a function of the input:
//     sort-asc        the digits in ascending order
//     sort-desc       the digits in descending order
//     add1            each digit + 1 (no modulo: 2..9, the paper's `inp + 1`)
//     add2            each digit + 2 (3..10)
//     sort-asc-add1   sort ascending, then + 1 (their composite task)
//     hist            "double histogram": position i holds how many digits of
//                     the input equal digit i (1..10)
//     reverse         ours, not the paper's: the digits in reverse order. Output
//                     position i reads input position 9 - i, an attention
//                     pattern none of the mixture's tasks uses (add reads i,
//                     sort reads by value). By the paper's Theorem 1 a prefix
//                     cannot change the relative attention over the content
//                     at any layer given that layer's input, so it must build
//                     the pattern from biases alone; LoRA on attention and
//                     full fine-tuning can change the pattern itself (`make
//                     demo`'s unknown task).
// As text: "3 1 4 1 5 9 2 6 5 3" => "1 1 2 3 3 4 5 5 6 9", digits and counts
// as space-separated decimal words; loss on the output only (the shared
// conditioning format, task.h); exact match of the greedy output (the
// headline), and "digit_accuracy", the fraction of output positions right.
//
// The split is fixed, as the paper's: an input is a test input when the
// FNV-1a hash of its text is 0 mod 4 (a quarter of all inputs), whatever the
// task or seed; train and valid draw from the other three quarters, test from
// that one, so no test input is ever trained on, by any task.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "datasets/task.h"

namespace peftlab::data {

inline constexpr int kPetrovLength = 10;  // digits per input
inline constexpr int kPetrovDigits = 8;   // digits are 1..8

// The task's output for `input` (kPetrovLength digits in 1..kPetrovDigits).
// `task` is one of petrov_task_names() without the "petrov-" prefix ("sort-asc").
// Throws std::invalid_argument for another name, a wrong length or a digit
// out of range.
std::vector<int> petrov_output(const std::string& task, const std::vector<int>& input);
// "sort-asc", "sort-desc", "add1", "add2", "sort-asc-add1", "hist", "reverse".
const std::vector<std::string>& petrov_task_names();
// Whether an input belongs to the held-out quarter (FNV-1a of its text % 4 == 0).
bool petrov_is_test_input(const std::vector<int>& input);
// Space-separated decimal words: {3, 10} -> "3 10".
std::string petrov_text(const std::vector<int>& digits);

// The pretraining mixture: n_lines lines "input => output", each task drawn
// uniformly from sort-asc, sort-desc, add1, add2 (no task marker), inputs from
// the training quarters only. Deterministic in (n_lines, seed).
std::string petrov_corpus(size_t n_lines, uint64_t seed);
inline constexpr size_t kPetrovCorpusLines = 60000;

// The factories (task.cpp lists them as "petrov-<name>"). Each task
// pretrains on petrov_corpus(kPetrovCorpusLines, seed), so every petrov task
// names the same corpus_id. Throws std::invalid_argument when a split cannot
// get that many distinct inputs.
Task make_petrov_sort_asc_task(const TaskRequest& req);
Task make_petrov_sort_desc_task(const TaskRequest& req);
Task make_petrov_add1_task(const TaskRequest& req);
Task make_petrov_add2_task(const TaskRequest& req);
Task make_petrov_sort_asc_add1_task(const TaskRequest& req);
Task make_petrov_hist_task(const TaskRequest& req);
Task make_petrov_reverse_task(const TaskRequest& req);

}  // namespace peftlab::data
