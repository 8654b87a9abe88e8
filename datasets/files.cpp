#include "datasets/files.h"

#include <csv.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <map>
#include <set>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/rng.h"
#include "datasets/corpus.h"
#include "nn/json_limits.h"

namespace peftlab::data {

namespace {

// Where a format's lines end: CSV/TSV at a CR, an LF or a CRLF (counted
// once), as libcsv reports records; JSON Lines at an LF only (a CR is JSON
// whitespace, so a CR-only file is one line there).
enum class LineEnds { CrOrLf, Lf };

size_t line_ends(std::string_view s, LineEnds ends) {
    if (ends == LineEnds::Lf) return size_t(std::count(s.begin(), s.end(), '\n'));
    size_t n = 0;
    for (size_t i = 0; i < s.size(); ++i)
        n += s[i] == '\r' || (s[i] == '\n' && (i == 0 || s[i - 1] != '\r'));
    return n;
}

size_t line_of(std::string_view text, size_t offset, LineEnds ends) {
    return 1 + line_ends(text.substr(0, offset), ends);
}

// The text without a UTF-8 byte-order mark; refuses invalid UTF-8 and NUL
// bytes, naming the line and byte offset.
// Byte offsets in messages count from the file's start, the mark included.
std::string_view checked_text(std::string_view text, const std::string& path, LineEnds ends) {
    const size_t bom = text.substr(0, 3) == "\xEF\xBB\xBF" ? 3 : 0;
    text.remove_prefix(bom);
    if (auto bad = find_invalid_utf8(text))
        throw std::runtime_error(
            fmt::format("{}:{}: invalid UTF-8 at byte {}", path, line_of(text, *bad, ends), *bad + bom));
    if (size_t nul = text.find('\0'); nul != std::string_view::npos)
        throw std::runtime_error(
            fmt::format("{}:{}: NUL byte at byte {} (not a text file)", path, line_of(text, nul, ends), nul + bom));
    return text;
}

std::string join(const std::vector<std::string>& items) {
    std::string s;
    for (const std::string& i : items) s += (s.empty() ? "" : ", ") + i;
    return s;
}

bool blank(std::string_view s) {
    return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

std::string trimmed(std::string_view s) {
    auto space = [](unsigned char c) { return std::isspace(c) != 0; };
    while (!s.empty() && space(s.front())) s.remove_prefix(1);
    while (!s.empty() && space(s.back())) s.remove_suffix(1);
    return std::string(s);
}

// ------------------------------------------------------------------ CSV via libcsv

struct CsvState {
    std::string_view path;
    size_t line = 1;        // the line the parser is on
    size_t row_line = 1;    // the line the current record started on
    size_t row_bytes = 0;
    bool in_row = false;
    bool after_cr = false;  // the last record ended at a CR: an empty LF record next is the CRLF's LF
    std::vector<std::string> fields;
    std::vector<std::pair<size_t, std::vector<std::string>>> records;  // (line, fields)
    size_t blank_rows = 0;
    std::string error;  // set by a callback; libcsv has no way to stop, so later callbacks do nothing
};

void on_field(void* data, size_t len, void* state_ptr) {
    auto& st = *static_cast<CsvState*>(state_ptr);
    if (!st.error.empty()) return;
    if (!st.in_row) st.in_row = true, st.row_line = st.line;
    std::string_view f(static_cast<const char*>(data), data ? len : 0);
    st.line += line_ends(f, LineEnds::CrOrLf);  // quoted line ends
    st.row_bytes += len + 1;
    if (st.row_bytes > kMaxRowBytes) {
        st.error = fmt::format("{}:{}: a record longer than {} bytes", st.path, st.row_line, kMaxRowBytes);
        return;
    }
    st.fields.emplace_back(f);
}

// A line ends at a CR, an LF, or a CRLF (counted once, at its CR).
void on_row(int terminator, void* state_ptr) {
    auto& st = *static_cast<CsvState*>(state_ptr);
    if (!st.error.empty()) return;
    const bool crlf_tail = terminator == '\n' && st.after_cr && !st.in_row;  // the LF of a CRLF
    if (crlf_tail) {
        st.after_cr = false;
        return;
    }
    if (!st.in_row) {  // an empty record: a blank line
        ++st.blank_rows;
    } else if (st.fields.size() == 1 && blank(st.fields[0])) {  // a line of spaces only
        ++st.blank_rows;
    } else {
        st.records.emplace_back(st.row_line, std::move(st.fields));
    }
    st.fields.clear();
    st.in_row = false;
    st.row_bytes = 0;
    if (terminator == '\n' || terminator == '\r') ++st.line;
    st.after_cr = terminator == '\r';
}

int no_space(unsigned char) { return 0; }  // RFC 4180: spaces are part of a field

}  // namespace

Table parse_delimited(std::string_view raw, const std::string& path, char delimiter) {
    std::string_view text = checked_text(raw, path, LineEnds::CrOrLf);
    csv_parser p;
    if (csv_init(&p, CSV_STRICT | CSV_STRICT_FINI | CSV_REPALL_NL) != 0)
        throw std::runtime_error(fmt::format("{}: libcsv could not start", path));
    struct Free {
        csv_parser* p;
        ~Free() { csv_free(p); }
    } free_parser{&p};
    csv_set_delim(&p, static_cast<unsigned char>(delimiter));
    csv_set_space_func(&p, no_space);
    CsvState st;
    st.path = path;
    const size_t used = csv_parse(&p, text.data(), text.size(), on_field, on_row, &st);
    if (!st.error.empty()) throw std::runtime_error(st.error);
    if (used != text.size()) {
        const int err = csv_error(&p);
        throw std::runtime_error(fmt::format("{}:{}: malformed {} ({}) at byte {}{}", path, line_of(text, used, LineEnds::CrOrLf),
                                             delimiter == '\t' ? "TSV" : "CSV", csv_strerror(err),
                                             used + (raw.size() - text.size()),  // a byte-order mark's 3 bytes
                                             err == CSV_EPARSE ? ": a quote inside an unquoted field, or text after "
                                                                 "a closing quote"
                                                               : ""));
    }
    if (csv_fini(&p, on_field, on_row, &st) != 0)
        throw std::runtime_error(fmt::format("{}:{}: malformed {}: a quoted field starting on this record is never "
                                             "closed",
                                             path, st.in_row ? st.row_line : st.line, delimiter == '\t' ? "TSV" : "CSV"));
    if (!st.error.empty()) throw std::runtime_error(st.error);

    Table t;
    t.path = path;
    t.blank_rows = st.blank_rows;
    if (st.records.empty()) throw std::runtime_error(fmt::format("{}: empty file (a header row is required)", path));
    t.columns = st.records[0].second;
    t.header_line = st.records[0].first;
    for (size_t i = 0; i < t.columns.size(); ++i)
        for (size_t j = 0; j < i; ++j)
            if (t.columns[i] == t.columns[j])
                throw std::runtime_error(
                    fmt::format("{}:{}: header names column '{}' twice", path, st.records[0].first, t.columns[i]));
    for (size_t r = 1; r < st.records.size(); ++r) {
        auto& [line, fields] = st.records[r];
        if (fields.size() != t.columns.size())
            throw std::runtime_error(fmt::format("{}:{}: {} fields, the header has {} ({})", path, line, fields.size(),
                                                 t.columns.size(), join(t.columns)));
        Row row;
        row.line = line;
        for (size_t c = 0; c < fields.size(); ++c) row.fields.emplace(t.columns[c], std::move(fields[c]));
        t.rows.push_back(std::move(row));
    }
    return t;
}

namespace {
// The spellings of a row's top-level floating-point numbers as written: the
// parsed double would print 1.50 as 1.5 and 1e2 as 100.0, so a label would
// not be the file's text. Runs on rows parse_json_limited has already accepted.
class FloatSpellings final : public nlohmann::json_sax<nlohmann::json> {
public:
    std::map<std::string, std::string> raw;  // key -> the number's text
    bool null() override { return true; }
    bool boolean(bool) override { return true; }
    bool number_integer(number_integer_t) override { return true; }
    bool number_unsigned(number_unsigned_t) override { return true; }
    bool number_float(number_float_t, const string_t& text) override {
        if (depth_ == 1) raw[key_] = text;
        return true;
    }
    bool string(string_t&) override { return true; }
    bool binary(binary_t&) override { return true; }
    bool start_object(std::size_t) override { return ++depth_, true; }
    bool key(string_t& k) override {
        if (depth_ == 1) key_ = k;
        return true;
    }
    bool end_object() override { return --depth_, true; }
    bool start_array(std::size_t) override { return ++depth_, true; }
    bool end_array() override { return --depth_, true; }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

private:
    int depth_ = 0;
    std::string key_;
};

// What parse_json_limited(row, "row") said, for "PATH:LINE: malformed JSON (...)":
// "row: not valid JSON ([json.exception.parse_error.101] parse error at line 1, column 5: ...)"
// becomes "column 5: ..." (the line is the file's, not nlohmann's 1); "row: JSON nested deeper
// than 64 levels" or "row: duplicate key \"k\"" lose only "row: ". The cut is at nlohmann's
// ", column <digits>" alone, as the word "column" may be a key's text. Bounded in length, as it
// may quote a long number.
std::string row_error(std::string_view message) {
    constexpr std::string_view kRow = "row: ", kSyntax = "not valid JSON (", kColumn = ", column ";
    std::string_view what = message.substr(message.starts_with(kRow) ? kRow.size() : 0);
    const size_t at = what.find(kColumn), digit = at + kColumn.size();
    if (what.starts_with(kSyntax) && what.ends_with(')') && at != std::string_view::npos && digit < what.size() &&
        std::isdigit(static_cast<unsigned char>(what[digit])))
        what = what.substr(at + 2, what.size() - 1 - (at + 2));  // less the ')' that closes kSyntax
    return what.size() > 160 ? std::string(what.substr(0, 160)) + "..." : std::string(what);
}
}  // namespace

Table parse_jsonl(std::string_view raw, const std::string& path) {
    std::string_view text = checked_text(raw, path, LineEnds::Lf);
    Table t;
    t.path = path;
    std::set<std::string> seen_columns;
    size_t line = 0, pos = 0;
    while (pos < text.size()) {
        size_t end = text.find('\n', pos);
        if (end == std::string_view::npos) end = text.size();
        std::string_view l = text.substr(pos, end - pos);
        pos = end + 1;
        ++line;
        if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
        if (l.size() > kMaxRowBytes)
            throw std::runtime_error(fmt::format("{}:{}: a line of {} bytes, longer than {}", path, line, l.size(), kMaxRowBytes));
        if (blank(l)) {
            ++t.blank_rows;
            continue;
        }
        nlohmann::json j;
        try {
            // Depth-bounded, and every nlohmann error (syntax, and a number too
            // large for a double: out_of_range.406) comes back as runtime_error.
            j = parse_json_limited(l, "row");
        } catch (const std::runtime_error& e) {
            throw std::runtime_error(fmt::format("{}:{}: malformed JSON ({})", path, line, row_error(e.what())));
        }
        if (!j.is_object())
            throw std::runtime_error(fmt::format("{}:{}: a JSON {}, expected an object", path, line, j.type_name()));
        Row row;
        row.line = line;
        FloatSpellings floats;
        if (std::any_of(j.begin(), j.end(), [](const nlohmann::json& v) { return v.is_number_float(); }))
            nlohmann::json::sax_parse(l, &floats);
        for (auto& [k, v] : j.items()) {
            if (seen_columns.insert(k).second) t.columns.push_back(k);
            if (v.is_string()) row.fields[k] = v.get<std::string>();
            else if (v.is_number_float()) row.fields[k] = floats.raw.at(k);
            else if (v.is_number() || v.is_boolean()) row.fields[k] = v.dump();
            else row.not_text[k] = v.type_name();
        }
        t.rows.push_back(std::move(row));
    }
    if (t.rows.empty()) throw std::runtime_error(fmt::format("{}: empty file (no JSON object)", path));
    return t;
}

const std::string& Table::field(const Row& row, const std::string& name) const {
    auto it = row.fields.find(name);
    if (it == row.fields.end()) {
        if (auto nt = row.not_text.find(name); nt != row.not_text.end())
            throw std::runtime_error(
                fmt::format("{}:{}: field '{}' is {}{}, expected text", path, row.line, name,
                            nt->second == "array" || nt->second == "object" ? "an " : "", nt->second));
        std::vector<std::string> have;
        for (auto& [k, v] : row.fields) have.push_back(k);
        for (auto& [k, v] : row.not_text) have.push_back(k);
        throw std::runtime_error(fmt::format("{}:{}: no field '{}' (fields: {})", path, row.line, name, join(have)));
    }
    if (blank(it->second)) throw std::runtime_error(fmt::format("{}:{}: field '{}' is empty", path, row.line, name));
    return it->second;
}

Table read_table(const std::string& path) {
    std::string ext = std::filesystem::path(path).extension().string();
    for (char& c : ext) c = char(std::tolower(static_cast<unsigned char>(c)));
    if (ext != ".jsonl" && ext != ".csv" && ext != ".tsv")
        throw std::invalid_argument(
            fmt::format("{}: unknown data format '{}' (the extension says it: .jsonl, .csv or .tsv)", path, ext));
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (!std::filesystem::exists(status)) throw std::runtime_error(fmt::format("{}: no such file", path));
    if (!std::filesystem::is_regular_file(status))
        throw std::runtime_error(fmt::format("{}: not a regular file ({}), expected a data file", path,
                                             std::filesystem::is_directory(status) ? "a directory" : "a device, FIFO or socket"));
    // The size refuses a large (or sparse) file before any byte is read; it is
    // not trusted beyond that: a /proc file says 0, and a file may grow.
    const auto size = std::filesystem::file_size(path, ec);
    if (ec) throw std::runtime_error(fmt::format("{}: cannot read its size ({})", path, ec.message()));
    if (size > kMaxDataFileBytes)
        throw std::runtime_error(
            fmt::format("{}: {} bytes, more than the {} a data file may have", path, size, kMaxDataFileBytes));
    const std::string text = read_small_file(path, kMaxDataFileBytes, "read_table");
    if (ext == ".jsonl") return parse_jsonl(text, path);
    return parse_delimited(text, path, ext == ".tsv" ? '\t' : ',');
}

// ------------------------------------------------------------------ tasks from tables

namespace {

// One (input, output) or (text, label) row, where it came from.
struct Pair {
    std::string in, out;
    std::string origin;  // "PATH:LINE"
};

struct SplitRows {
    std::vector<Pair> pairs;
    DataReport::Split report;
};

SplitRows read_pairs(const std::string& path, const FileTaskOptions& o) {
    const std::string& in_field = o.classification ? o.text_field : o.input_field;
    const std::string& out_field = o.classification ? o.label_field : o.output_field;
    Table t = read_table(path);
    SplitRows s;
    s.report.path = path;
    s.report.rows = t.rows.size();
    s.report.blank_rows = t.blank_rows;
    // A column the header lacks is the header's fault, not the first row's.
    auto has = [&](const std::string& c) { return std::find(t.columns.begin(), t.columns.end(), c) != t.columns.end(); };
    if (t.header_line)
        for (const std::string* name : {&in_field, &out_field})
            if (!has(*name)) {
                // Quoted: a header "input , output" names ' output', which plain would hide.
                std::vector<std::string> quoted;
                for (const std::string& c : t.columns) quoted.push_back("'" + c + "'");
                // The other kind of task's columns: the file is likely of that kind.
                const char* other = o.classification ? "generation" : "classification";
                const bool other_kind = o.classification ? has(o.input_field) && has(o.output_field)
                                                         : has(o.text_field) && has(o.label_field);
                throw std::runtime_error(fmt::format(
                    "{}:{}: the header has no column '{}' (columns: {}){}", path, t.header_line, *name, join(quoted),
                    other_kind ? fmt::format("; it has {}'s columns: --task-type {}", other, other) : ""));
            }
    std::set<std::pair<std::string, std::string>> seen;
    for (const Row& row : t.rows) {
        Pair p{t.field(row, in_field), t.field(row, out_field), fmt::format("{}:{}", path, row.line)};
        if (!seen.insert({p.in, p.out}).second) {
            ++s.report.duplicate_rows;
            continue;
        }
        s.pairs.push_back(std::move(p));
    }
    if (s.pairs.empty()) throw std::runtime_error(fmt::format("{}: no data rows", path));
    return s;
}

// Independent stream for the split of a single file.
Rng split_rng(uint64_t seed) {
    Rng mix(seed ^ 0x5B11750F11E5ull);
    return Rng(mix.next_u64());
}

template <class T>
void shuffle(std::vector<T>& v, Rng& rng) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(uint32_t(i))]);
}

// 10% of n, rounded, at least 1 once n >= 3 (so that 3 items give 1/1/1).
size_t carve_count(size_t n) { return n < 3 ? 0 : std::max<size_t>(1, (n + 5) / 10); }

// Generation: pairs grouped by input, in order of first appearance.
struct Group {
    std::string input;
    std::vector<Pair> pairs;
};
std::vector<Group> group_by_input(const std::vector<Pair>& pairs) {
    std::vector<Group> groups;
    std::map<std::string, size_t> index;
    for (const Pair& p : pairs) {
        auto [it, fresh] = index.emplace(p.in, groups.size());
        if (fresh) groups.push_back({p.in, {}});
        groups[it->second].pairs.push_back(p);
    }
    return groups;
}

Example grouped_example(const Group& g) {
    Example ex;
    ex.source = g.input;
    ex.target = g.pairs[0].out;
    for (const Pair& p : g.pairs) ex.references.push_back(p.out);
    ex.origin = g.pairs[0].origin;
    return ex;
}

}  // namespace

Task load_file_task(const FileTaskOptions& o) {
    if (o.train.empty()) throw std::invalid_argument("load_file_task: no training file");
    // One field for both would make every target a copy of its input.
    if (o.classification ? o.text_field == o.label_field : o.input_field == o.output_field)
        throw std::invalid_argument(o.classification
                                        ? fmt::format("--text-field and --label-field are both '{}': every label would be "
                                                      "its own text",
                                                      o.text_field)
                                        : fmt::format("--input-field and --output-field are both '{}': every target "
                                                      "would be its own input",
                                                      o.input_field));
    Task task;
    task.name = o.train;
    task.source_name = fmt::format("field '{}'", o.classification ? o.text_field : o.input_field);
    task.target_name = o.classification ? fmt::format("the label word of field '{}'", o.label_field)
                                        : fmt::format("field '{}'", o.output_field);
    SplitRows train = read_pairs(o.train, o);
    std::optional<SplitRows> valid, test;
    if (!o.valid.empty()) valid = read_pairs(o.valid, o);
    if (!o.test.empty()) test = read_pairs(o.test, o);
    Rng rng = split_rng(o.seed);

    // Missing splits carved from the training rows: a list of "units" (an
    // input's group, or one classification row), shuffled, the first ones taken.
    std::vector<Pair> carved_valid, carved_test;
    auto carve = [&](std::vector<std::vector<Pair>> units, const std::string& what) {
        shuffle(units, rng);
        const size_t n = carve_count(units.size());
        const size_t nv = valid ? 0 : n, nt = test ? 0 : n;
        std::vector<Pair> kept;
        for (size_t i = 0; i < units.size(); ++i) {
            auto& dst = i < nt ? carved_test : i < nt + nv ? carved_valid : kept;
            dst.insert(dst.end(), units[i].begin(), units[i].end());
        }
        if (nv + nt > 0)
            task.report.notes.push_back(fmt::format("{} split of {} {}: {} valid, {} test, {} train (seed {})", o.train,
                                                    units.size(), what, nv, nt, units.size() - nv - nt, o.seed));
        return kept;
    };
    if (!valid || !test) {
        if (o.classification) {
            // Per label, so that every label keeps examples in training.
            std::map<std::string, std::vector<Pair>> by_label;
            for (const Pair& p : train.pairs) by_label[p.out].push_back(p);
            std::vector<Pair> kept;
            for (auto& [label, rows] : by_label) {
                std::vector<std::vector<Pair>> units;
                for (const Pair& p : rows) units.push_back({p});
                std::vector<Pair> k = carve(units, "rows labelled '" + label + "'");
                kept.insert(kept.end(), k.begin(), k.end());
            }
            // Back to file order, so that --n-train takes a file-order prefix.
            std::map<std::string, size_t> order;
            for (size_t i = 0; i < train.pairs.size(); ++i) order[train.pairs[i].origin] = i;
            std::sort(kept.begin(), kept.end(), [&](const Pair& a, const Pair& b) { return order[a.origin] < order[b.origin]; });
            train.pairs = std::move(kept);
        } else {
            std::vector<std::vector<Pair>> units;
            for (Group& g : group_by_input(train.pairs)) units.push_back(std::move(g.pairs));
            if (units.size() < 3)
                throw std::runtime_error(fmt::format(
                    "{}: {} distinct input(s); splitting one file into train/valid/test needs at least 3 (or give "
                    "--valid and --test)",
                    o.train, units.size()));
            std::vector<Pair> kept = carve(units, "distinct inputs");
            train.pairs = std::move(kept);
        }
        auto carved = [&](std::vector<Pair> pairs) {
            SplitRows s;
            s.pairs = std::move(pairs);
            s.report.path = o.train + " (carved)";
            s.report.rows = s.pairs.size();
            return s;
        };
        if (!valid) valid = carved(std::move(carved_valid));
        if (!test) test = carved(std::move(carved_test));
        if (valid->pairs.empty() || test->pairs.empty())
            throw std::runtime_error(fmt::format("{}: too few rows to carve valid and test splits from (give --valid "
                                                 "and --test)",
                                                 o.train));
        train.report.rows = train.pairs.size();
    }

    std::map<std::string, size_t> rows_of_label;  // before --n-train, to explain a label it left out
    for (const Pair& p : train.pairs) ++rows_of_label[p.out];
    if (o.n_train > 0) {
        if (o.n_train > train.pairs.size())
            throw std::invalid_argument(fmt::format("--n-train {}: {} has {} training examples", o.n_train, o.train,
                                                    train.pairs.size()));
        train.pairs.resize(o.n_train);
    }

    if (o.classification) {
        std::set<std::string> label_set;
        for (const Pair& p : train.pairs) label_set.insert(p.out);
        const std::vector<std::string> labels(label_set.begin(), label_set.end());
        // With one label every prediction scores 1: nothing would be measured.
        if (labels.size() < 2)
            throw std::runtime_error(fmt::format(
                "{}: field '{}': the training data has one label, '{}'; classification needs at least two{}", o.train,
                o.label_field, labels[0],
                rows_of_label.size() > 1 ? fmt::format(" (--n-train {} took the first {} rows in file order, all "
                                                       "labelled '{}': shuffle the file)",
                                                       o.n_train, o.n_train, labels[0])
                                         : ""));
        for (auto& [label, word] : o.label_words) {
            if (!label_set.count(label))
                throw std::invalid_argument(fmt::format("--label-words: label '{}' does not occur in the training data "
                                                        "(labels: {})",
                                                        label, join(labels)));
            if (blank(word) || word != std::string(word.substr(0, word.find_last_not_of(" \t") + 1)) ||
                std::isspace(static_cast<unsigned char>(word[0])))
                throw std::invalid_argument(fmt::format("--label-words: word '{}' for label '{}' is empty or has "
                                                        "surrounding spaces",
                                                        word, label));
        }
        std::map<std::string, std::string> word_of;
        for (const std::string& l : labels) {
            auto it = o.label_words.find(l);
            // A label is its own word unless mapped; spaces around it (CSV keeps
            // the space of "text, pos") would become part of every target.
            if (it == o.label_words.end() && trimmed(l) != l) {
                const auto first = std::find_if(train.pairs.begin(), train.pairs.end(), [&](const Pair& p) { return p.out == l; });
                throw std::runtime_error(fmt::format(
                    "{}: field '{}': label '{}' has surrounding spaces, which would be part of its word (a CSV keeps "
                    "the space after a comma); remove them or map the label with --label-words",
                    first->origin, o.label_field, l));
            }
            word_of[l] = it == o.label_words.end() ? l : it->second;
            task.labels.push_back(word_of[l]);
        }
        for (size_t i = 0; i < labels.size(); ++i)
            for (size_t j = 0; j < i; ++j)
                if (task.labels[i] == task.labels[j])
                    throw std::invalid_argument(fmt::format("labels '{}' and '{}' have the same word '{}' (--label-words)",
                                                            labels[j], labels[i], task.labels[i]));
        auto make = [&](const SplitRows& s, const char* split, std::vector<Example>& out) {
            for (const Pair& p : s.pairs) {
                auto it = word_of.find(p.out);
                if (it == word_of.end()) {
                    const auto before = rows_of_label.find(p.out);
                    throw std::runtime_error(fmt::format(
                        "{}: field '{}': label '{}' never occurs in the training data (labels: {}){}{}", p.origin,
                        o.label_field, p.out, join(labels),
                        before == rows_of_label.end()
                            ? ""
                            : fmt::format("; --n-train {} took the first {} training rows in file order, and the {} "
                                          "rows labelled '{}' come later: shuffle the file",
                                          o.n_train, o.n_train, before->second, p.out),
                        trimmed(p.out) != p.out && word_of.count(trimmed(p.out))
                            ? fmt::format("; without its surrounding spaces it would be label '{}'", trimmed(p.out))
                            : ""));
                }
                out.push_back(Example{p.in, it->second, {it->second}, {}, p.origin});
            }
            DataReport::Split r = s.report;
            r.examples = r.pairs = out.size();
            task.report.splits[split] = r;
        };
        make(train, "train", task.train);
        make(*valid, "valid", task.valid);
        make(*test, "test", task.test);
        task.scorer = label_scorer(task.labels);
    } else {
        for (const Pair& p : train.pairs) {
            task.train.push_back(Example{p.in, p.out, {}, {}, p.origin});
        }
        // Every training pair, each with all the references of its input.
        std::map<std::string, std::vector<std::string>> refs;
        for (const Pair& p : train.pairs) refs[p.in].push_back(p.out);
        for (Example& ex : task.train) ex.references = refs[ex.source];
        DataReport::Split tr = train.report;
        tr.examples = tr.pairs = task.train.size();
        task.report.splits["train"] = tr;
        auto grouped = [&](const SplitRows& s, const char* split, std::vector<Example>& out) {
            for (const Group& g : group_by_input(s.pairs)) out.push_back(grouped_example(g));
            DataReport::Split r = s.report;
            r.examples = out.size();
            r.pairs = s.pairs.size();
            task.report.splits[split] = r;
        };
        grouped(*valid, "valid", task.valid);
        grouped(*test, "test", task.test);
        task.scorer = generation_scorer();
        size_t overlap = 0;
        for (const Example& ex : task.test) overlap += refs.count(ex.source);
        if (overlap)
            task.report.notes.push_back(
                fmt::format("{} of the {} test inputs also occur in the training data", overlap, task.test.size()));
    }
    task.defaults.n_train = task.train.size();
    task.defaults.n_valid = task.valid.size();
    task.defaults.n_test = task.test.size();
    task.defaults.max_new_tokens = 0;
    return task;
}

}  // namespace peftlab::data
