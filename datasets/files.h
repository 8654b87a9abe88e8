#pragma once
// Fine-tuning tasks from the user's own files: JSONL, CSV and TSV tables read
// into generation or classification tasks (datasets/task.h).
//
// Formats, by the file name's extension (case-insensitive):
//   .jsonl  one JSON object per line (nlohmann::json); a member used as a
//           field must be a string, a number or a boolean (numbers and
//           booleans are taken as written, e.g. a label 1 or true).
//   .csv    RFC 4180 CSV read by Debian's libcsv (strict mode): quoted
//           fields with embedded commas, quotes ("") and newlines; a header
//           row naming the columns is required; whitespace is part of a field.
//   .tsv    the same with a tab as the delimiter (quotes work the same way).
// Every format: UTF-8 (a leading byte-order mark is skipped), LF or CRLF line
// ends (CSV and TSV also CR alone, as libcsv reads them), no NUL byte; blank lines are left out and counted. Errors name the
// file and the line (and the field), as "data.csv:12: field 'ref' is empty".
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "datasets/task.h"

namespace peftlab::data {

// Bounds a reader holds to whatever a file says: a file larger than
// kMaxDataFileBytes or a row (a JSONL line, a CSV record) longer than
// kMaxRowBytes is refused with its size.
inline constexpr size_t kMaxDataFileBytes = size_t(512) << 20;  // 512 MiB
inline constexpr size_t kMaxRowBytes = size_t(1) << 20;         // 1 MiB

// One data row: the line it starts on (1-based; a CSV record with quoted
// newlines spans several) and its fields by column name.
struct Row {
    size_t line = 0;
    std::map<std::string, std::string> fields;
    // JSONL members whose value is not text (an object, an array or null),
    // with their JSON type: an error only if the field is used.
    std::map<std::string, std::string> not_text;
};

struct Table {
    std::string path;
    std::vector<std::string> columns;  // CSV/TSV: the header's names; JSONL: every member seen, first use order
    std::vector<Row> rows;             // data rows in file order
    size_t blank_rows = 0;             // blank lines left out
    size_t header_line = 0;            // CSV/TSV: the header's line (1 unless blank lines precede it); JSONL: 0
    // The value of `field` in `row`; throws std::runtime_error
    // "PATH:LINE: no field 'x' (fields: a, b)", or "...: field 'x' is an array,
    // expected text", or "...: field 'x' is empty".
    const std::string& field(const Row& row, const std::string& name) const;
};

// Parses the text of a file (`path` names it in errors). Throws
// std::runtime_error "PATH:LINE: ..." for malformed JSON or CSV, a row that
// is not an object or has a different number of fields than the header, a
// duplicate column name, invalid UTF-8 or a NUL byte (with the line and byte
// offset), a row longer than kMaxRowBytes, and an empty file (no header or
// no row: "PATH: empty file").
Table parse_jsonl(std::string_view text, const std::string& path);
Table parse_delimited(std::string_view text, const std::string& path, char delimiter);
// Reads `path` (by extension: .jsonl, .csv, .tsv; another extension throws
// std::invalid_argument naming it). Throws std::runtime_error naming the file
// when it is missing, not a regular file, unreadable or larger than
// kMaxDataFileBytes (by its size before reading, and while reading to its
// end whatever the size said: a /proc file says 0, a file may grow).
Table read_table(const std::string& path);

struct FileTaskOptions {
    std::string train, valid, test;  // files; valid/test "" = carved from train (see load_file_task)
    bool classification = false;     // else generation
    std::string input_field = "input", output_field = "output";  // generation
    std::string text_field = "text", label_field = "label";      // classification
    std::map<std::string, std::string> label_words;              // label -> word; others are their own word
    size_t n_train = 0;  // use the first n training examples (0: all); more than there are throws
    uint64_t seed = 0;   // of the split of a single file
};

// A task from files.
//   Generation: each row gives (input_field, output_field). Rows sharing an
//   input are one example with several references: the training split holds
//   one example per (input, output) pair (target = that output), the valid and
//   test splits one example per distinct input (target = its first output in
//   file order, references = all its outputs), so each input is scored once
//   against every reference (BLEU-4, ROUGE-L). A pair seen again is left out
//   and counted.
//   Classification: each row gives (text_field, label_field); the labels are
//   the sorted distinct labels of the training split, a target is its label's
//   word (label_words, else the label itself); accuracy and macro-F1. A label
//   in valid/test that the training split lacks throws naming file, line and
//   field; so does a label_words entry for a label the data lacks, two
//   labels with the same word, and training data with a single label.
// One field named for both input and output (or text and label) throws.
// Missing splits are carved from the training file, deterministically in
// `seed`: 10% of the distinct inputs (generation) or of each label's rows
// (classification, so every label stays in training) each for valid and test,
// at least one when there are 3 or more. The split sizes and whatever was left
// out are in Task::report; Task::name is the training file's path;
// defaults.max_new_tokens is 0 (the longest target, once tokenized).
Task load_file_task(const FileTaskOptions& opts);

}  // namespace peftlab::data
