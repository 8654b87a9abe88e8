#include "datasets/wordnet.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <stdexcept>
#include <unordered_map>

#include <fmt/format.h>

#include "autograd/rng.h"
#include "datasets/tokenizer.h"

namespace peftlab::data::wordnet {

namespace fs = std::filesystem;

namespace {

uint64_t fnv1a(std::string_view s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

// Reads the space-separated fields of one data line, checking each against
// the field's format; every error names the file, line and field.
class Fields {
public:
    Fields(std::string_view line, const std::string& file, size_t line_no) : line_(line), file_(file), no_(line_no) {}

    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error(fmt::format("{}:{}: {}", file_, no_, what));
    }

    // The next field; `what` names it in the error when the line has ended.
    std::string_view next(std::string_view what) {
        if (pos_ >= line_.size()) fail(fmt::format("line ends where {} was expected", what));
        size_t end = line_.find(' ', pos_);
        if (end == std::string_view::npos) end = line_.size();
        std::string_view f = line_.substr(pos_, end - pos_);
        if (f.empty()) fail(fmt::format("empty field (two spaces) where {} was expected, at byte {}", what, pos_));
        pos_ = end + 1;
        return f;
    }

    // A fixed-width number in base 10 or 16.
    uint64_t number(std::string_view what, size_t width, int base) {
        std::string_view f = next(what);
        if (f.size() != width) fail(fmt::format("{} '{}' is not {} {} digits", what, f, width, base == 16 ? "hex" : "decimal"));
        uint64_t v = 0;
        for (char c : f) {
            int d = base == 16 && c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : base == 16 && c >= 'A' && c <= 'F' ? c - 'A' + 10
                    : c >= '0' && c <= '9'               ? c - '0'
                                                         : -1;
            if (d < 0) fail(fmt::format("{} '{}' is not {} {} digits", what, f, width, base == 16 ? "hex" : "decimal"));
            v = v * uint64_t(base) + uint64_t(d);
        }
        return v;
    }

    // Fields left before the "|" that starts the gloss (all fields left if
    // there is none): the bound every count read from the line is checked against.
    size_t fields_before_bar() const {
        size_t n = 0;
        for (size_t p = pos_; p < line_.size();) {
            size_t end = std::min(line_.find(' ', p), line_.size());
            if (line_.substr(p, end - p) == "|") break;
            ++n;
            p = end + 1;
        }
        return n;
    }

    std::string_view rest() const { return pos_ >= line_.size() ? std::string_view{} : line_.substr(pos_); }

private:
    std::string_view line_;
    const std::string& file_;
    size_t no_;
    size_t pos_ = 0;
};

bool is_pos(char c) { return c == 'n' || c == 'v' || c == 'a' || c == 's' || c == 'r'; }

Synset parse_line(std::string_view line, const std::string& file, size_t line_no, uint64_t byte_offset, char pos) {
    Fields f(line, file, line_no);
    Synset s;
    s.line = line_no;
    s.offset = f.number("synset_offset", 8, 10);
    if (s.offset != byte_offset)
        f.fail(fmt::format("synset_offset {:08d} is not the line's byte offset {} (wndb(5WN): the field is the "
                           "line's offset in the file; was the file edited or truncated?)",
                           s.offset, byte_offset));
    s.lex_filenum = int(f.number("lex_filenum", 2, 10));
    std::string_view type = f.next("ss_type");
    const bool type_ok = type.size() == 1 && (type[0] == pos || (pos == 'a' && type[0] == 's'));
    if (!type_ok) f.fail(fmt::format("ss_type '{}' does not belong in a data file of part of speech '{}'", type, pos));
    s.ss_type = type[0];
    const size_t w_cnt = f.number("w_cnt", 2, 16);
    if (w_cnt == 0) f.fail("w_cnt is 00: a synset has at least one word");
    // Each word takes two fields, then p_cnt; checked before reserving anything.
    if (2 * w_cnt + 1 > f.fields_before_bar())
        f.fail(fmt::format("w_cnt {:02x} announces {} words but only {} fields precede the gloss", w_cnt, w_cnt,
                           f.fields_before_bar()));
    for (size_t i = 0; i < w_cnt; ++i) {
        Word w;
        std::string_view text = f.next(fmt::format("word {} of {}", i + 1, w_cnt));
        // data.adj: a syntactic marker "(a)", "(p)" or "(ip)" follows the word.
        if (pos == 'a' && text.size() > 2 && text.back() == ')') {
            size_t open = text.rfind('(');
            if (open != std::string_view::npos && open > 0) {
                w.marker = std::string(text.substr(open + 1, text.size() - open - 2));
                if (w.marker != "a" && w.marker != "p" && w.marker != "ip")
                    f.fail(fmt::format("word '{}' has syntactic marker '({})'; wninput(5WN) knows (a), (p), (ip)", text,
                                       w.marker));
                text = text.substr(0, open);
            }
        }
        w.lemma = std::string(text);
        w.lex_id = int(f.number(fmt::format("lex_id of word {}", i + 1), 1, 16));
        s.words.push_back(std::move(w));
    }
    const size_t p_cnt = f.number("p_cnt", 3, 10);
    if (4 * p_cnt > f.fields_before_bar())
        f.fail(fmt::format("p_cnt {:03d} announces {} pointers (4 fields each) but only {} fields precede the gloss",
                           p_cnt, p_cnt, f.fields_before_bar()));
    for (size_t i = 0; i < p_cnt; ++i) {
        Pointer p;
        p.symbol = std::string(f.next(fmt::format("pointer_symbol of pointer {}", i + 1)));
        p.offset = f.number(fmt::format("synset_offset of pointer {}", i + 1), 8, 10);
        std::string_view ppos = f.next(fmt::format("pos of pointer {}", i + 1));
        if (ppos.size() != 1 || !is_pos(ppos[0]))
            f.fail(fmt::format("pos '{}' of pointer {} is not one of n, v, a, s, r", ppos, i + 1));
        p.pos = ppos[0];
        const uint64_t st = f.number(fmt::format("source/target of pointer {}", i + 1), 4, 16);
        p.source = int(st >> 8);
        p.target = int(st & 0xff);
        if (size_t(p.source) > w_cnt)
            f.fail(fmt::format("pointer {} names source word {} of a synset with {} words", i + 1, p.source, w_cnt));
        s.pointers.push_back(std::move(p));
    }
    if (pos == 'v') {
        const size_t f_cnt = f.number("f_cnt", 2, 10);
        if (3 * f_cnt > f.fields_before_bar())
            f.fail(fmt::format("f_cnt {:02d} announces {} frames (3 fields each) but only {} fields precede the gloss",
                               f_cnt, f_cnt, f.fields_before_bar()));
        for (size_t i = 0; i < f_cnt; ++i) {
            if (f.next(fmt::format("'+' of frame {}", i + 1)) != "+") f.fail(fmt::format("frame {} does not start with '+'", i + 1));
            Frame fr;
            fr.f_num = int(f.number(fmt::format("f_num of frame {}", i + 1), 2, 10));
            fr.w_num = int(f.number(fmt::format("w_num of frame {}", i + 1), 2, 16));
            if (size_t(fr.w_num) > w_cnt)
                f.fail(fmt::format("frame {} names word {} of a synset with {} words", i + 1, fr.w_num, w_cnt));
            s.frames.push_back(fr);
        }
    }
    std::string_view bar = f.next("'|' before the gloss");
    if (bar != "|")
        f.fail(fmt::format("'{}' where '|' and the gloss should follow (the counts w_cnt {:02x}, p_cnt {:03d} do not "
                           "match the line)",
                           bar, w_cnt, p_cnt));
    std::string_view gloss = f.rest();
    while (!gloss.empty() && (gloss.back() == ' ' || gloss.back() == '\r')) gloss.remove_suffix(1);
    s.gloss = std::string(gloss);
    s.parsed = parse_gloss(s.gloss);
    return s;
}

// std::getline bounded by kMaxLineBytes. istream::getline into a buffer of
// kMaxLineBytes + 2 bytes stores up to one byte more than a line may have
// (which tells a longer line) and its '\0'; it fails having stored nothing
// at the end of the input, and having filled the buffer on a longer line.
class LineReader {
public:
    LineReader(std::istream& in, const std::string& file) : in_(in), file_(file), buf_(kMaxLineBytes + 2) {}

    // The next line, without its '\n', into `line`; false once the input has
    // ended. `line_no`, the line's number, is for the error.
    bool next(std::string& line, size_t line_no) {
        in_.getline(buf_.data(), std::streamsize(buf_.size()));
        const size_t got = size_t(in_.gcount());
        if (in_.fail() && got == 0) return false;
        const bool ended_by_lf = !in_.fail() && !in_.eof();  // else by the end of the input, or the buffer
        const size_t len = got - (ended_by_lf ? 1 : 0);
        if (len > kMaxLineBytes)
            throw std::runtime_error(
                fmt::format("{}:{}: a line longer than {} bytes (wndb(5WN) lines are short)", file_, line_no, kMaxLineBytes));
        line.assign(buf_.data(), len);
        return true;
    }

private:
    std::istream& in_;
    const std::string& file_;
    std::vector<char> buf_;
};

std::string trim(std::string_view s) {
    while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
    while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
    return std::string(s);
}

}  // namespace

Gloss parse_gloss(std::string_view gloss) {
    Gloss g;
    std::vector<std::string> definition;
    auto flush = [&](std::string_view seg) {
        std::string t = trim(seg);
        if (t.empty()) return;
        if (t.front() == '"') {
            size_t close = t.find('"', 1);
            std::string ex = trim(t.substr(1, close == std::string::npos ? std::string::npos : close - 1));
            if (!ex.empty()) g.examples.push_back(std::move(ex));
        } else {
            definition.push_back(std::move(t));
        }
    };
    bool quoted = false;
    size_t start = 0;
    for (size_t i = 0; i < gloss.size(); ++i) {
        if (gloss[i] == '"') quoted = !quoted;
        if (gloss[i] == ';' && !quoted) {
            flush(gloss.substr(start, i - start));
            start = i + 1;
        }
    }
    flush(gloss.substr(start));
    g.balanced = !quoted;
    for (size_t i = 0; i < definition.size(); ++i) g.definition += (i ? "; " : "") + definition[i];
    return g;
}

std::vector<Synset> parse_data(std::istream& in, const std::string& file, char pos) {
    if (pos != 'n' && pos != 'v' && pos != 'a' && pos != 'r')
        throw std::invalid_argument(fmt::format("wordnet::parse_data: part of speech '{}' is not n, v, a or r", pos));
    std::vector<Synset> out;
    std::string line;
    uint64_t offset = 0;
    size_t line_no = 0;
    LineReader lines(in, file);
    while (lines.next(line, line_no + 1)) {
        ++line_no;
        const uint64_t here = offset;
        offset += line.size() + 1;
        if (line.rfind("  ", 0) == 0) {
            if (!out.empty())
                throw std::runtime_error(fmt::format("{}:{}: a header line (two leading spaces) after the first synset",
                                                     file, line_no));
            continue;
        }
        if (line.empty() || line == "\r")
            throw std::runtime_error(fmt::format("{}:{}: empty line (wndb(5WN) has one synset per line)", file, line_no));
        out.push_back(parse_line(line, file, line_no, here, pos));
    }
    if (in.bad()) throw std::runtime_error(fmt::format("{}: read error after line {}", file, line_no));
    if (out.empty()) throw std::runtime_error(fmt::format("{}: no synset lines (only {} header lines)", file, line_no));
    return out;
}

std::string default_dir() {
    const char* env = std::getenv("PEFTLAB_WORDNET_DIR");
    return env && *env ? std::string(env) : std::string("/usr/share/wordnet");
}

Database load(const std::string& dir_in) {
    Database db;
    db.dir = dir_in.empty() ? default_dir() : dir_in;
    if (!fs::is_directory(db.dir))
        throw std::runtime_error(fmt::format("WordNet database directory '{}' not found: run `make deps` (it installs "
                                             "Debian's wordnet-base) or set PEFTLAB_WORDNET_DIR",
                                             db.dir));
    const std::pair<const char*, char> files[] = {{"noun", 'n'}, {"verb", 'v'}, {"adj", 'a'}, {"adv", 'r'}};
    std::vector<Synset>* dest[] = {&db.noun, &db.verb, &db.adj, &db.adv};
    for (size_t i = 0; i < 4; ++i) {
        const std::string path = db.dir + "/data." + files[i].first;
        std::error_code ec;
        if (const auto status = fs::status(path, ec); fs::exists(status) && !fs::is_regular_file(status))
            throw std::runtime_error(fmt::format("WordNet data file '{}' is not a regular file ({}): run `make deps` "
                                                 "(it installs Debian's wordnet-base) or set PEFTLAB_WORDNET_DIR",
                                                 path, fs::is_directory(status) ? "a directory" : "a device, FIFO or socket"));
        std::ifstream in(path, std::ios::binary);
        if (!in)
            throw std::runtime_error(fmt::format("WordNet data file '{}' cannot be opened: run `make deps` (it "
                                                 "installs Debian's wordnet-base) or set PEFTLAB_WORDNET_DIR",
                                                 path));
        *dest[i] = parse_data(in, path, files[i].second);
    }
    return db;
}

const Database& cached(const std::string& dir_in) {
    static std::mutex mu;
    static std::map<std::string, Database> dbs;
    const std::string dir = dir_in.empty() ? default_dir() : dir_in;
    std::lock_guard<std::mutex> lock(mu);
    auto it = dbs.find(dir);
    if (it == dbs.end()) it = dbs.emplace(dir, load(dir)).first;
    return it->second;
}

std::string pos_name(char ss_type) {
    switch (ss_type) {
        case 'n': return "noun";
        case 'v': return "verb";
        case 'a':
        case 's': return "adjective";
        case 'r': return "adverb";
    }
    throw std::invalid_argument(fmt::format("wordnet::pos_name: ss_type '{}' is not n, v, a, s or r", ss_type));
}

std::string head(const Synset& s) {
    std::string h = s.words.at(0).lemma;
    std::replace(h.begin(), h.end(), '_', ' ');
    return h;
}

std::string key(const Synset& s) { return head(s) + " (" + pos_name(s.ss_type) + ")"; }

Split split_of(const Synset& s) {
    const uint64_t b = fnv1a(key(s)) % 10;
    return b == 0 ? Split::Test : b == 1 ? Split::Valid : Split::Train;
}

std::string TaskReport::summary() const {
    size_t left_out = 0;
    std::string reasons;
    for (const auto& [why, n] : filtered) {
        left_out += n;
        reasons += fmt::format("{}{} {}", reasons.empty() ? "" : ", ", n, why);
    }
    const std::string head = fmt::format("{} synsets read, {} left out ({})", synsets, left_out,
                                         reasons.empty() ? "none" : reasons);
    if (lines || examples_left_out)  // a corpus
        return fmt::format("{}, {} example sentences left out; {} lines", head, examples_left_out, lines);
    return fmt::format("{}; examples available: train {}, valid {}, test {}", head, pool_train, pool_valid, pool_test);
}

namespace {

template <class F>
void for_each_synset(const Database& db, F&& f) {
    for (const auto* v : {&db.noun, &db.verb, &db.adj, &db.adv})
        for (const Synset& s : *v) f(s);
}

// The opt.common_words most frequent split_words() tokens of all glosses
// (definitions and examples), ties broken by the token's text; every token
// when opt.common_words is 0.
struct CommonTokens {
    bool everything = false;
    std::set<std::string> words;
    bool contains(const std::string& w) const { return everything || words.count(w) > 0; }
};
CommonTokens common_tokens(const Database& db, size_t n) {
    if (n == 0) return CommonTokens{true, {}};
    std::unordered_map<std::string, size_t> count;
    for_each_synset(db, [&](const Synset& s) {
        for (auto& w : split_words(s.parsed.definition)) ++count[w];
        for (auto& e : s.parsed.examples)
            for (auto& w : split_words(e)) ++count[w];
    });
    std::vector<std::pair<std::string, size_t>> v(count.begin(), count.end());
    std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second != b.second ? a.second > b.second : a.first < b.first; });
    CommonTokens out;
    for (size_t i = 0; i < std::min(n, v.size()); ++i) out.words.insert(v[i].first);
    return out;
}

// Why a synset's definition cannot be an example, or "" if it can.
std::string definition_problem(const Synset& s, const TaskOptions& opt, const CommonTokens& common) {
    if (!s.parsed.balanced) return "unbalanced quotes in gloss";
    if (s.parsed.definition.empty()) return "no definition (examples only)";
    if (s.parsed.definition.size() > opt.max_definition_bytes)
        return fmt::format("definition longer than {} bytes", opt.max_definition_bytes);
    for (auto& w : split_words(s.parsed.definition))
        if (!common.contains(w)) return fmt::format("definition has a word outside the {} most common", opt.common_words);
    return "";
}

bool is_lower_word(const std::string& s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= 'a' && c <= 'z'; });
}

template <class T>
void seeded_shuffle(std::vector<T>& v, uint64_t seed) {
    Rng rng(Rng(seed ^ 0x5752444E4554ull).next_u64());  // a stream of its own ("WRDNET")
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(uint32_t(i))]);
}

void check_pool(const char* task, const char* split, size_t want, size_t have, const std::string& what = "") {
    if (want > have)
        throw std::invalid_argument(fmt::format("{}: {} examples asked for the {} split{} but only {} qualify", task,
                                                want, split, what, have));
}

// Examples and (input, reference) pairs per split, for the run's data report.
void count_splits(Task& t) {
    for (auto [name, split] : {std::pair{"train", &t.train}, {"valid", &t.valid}, {"test", &t.test}}) {
        DataReport::Split& r = t.report.splits[name];
        r.examples = split->size();
        r.pairs = 0;
        for (const Example& e : *split) r.pairs += e.references.size();
    }
}

// Notes and corpus shared by both tasks. The corpus function holds its own
// copy of the database's directory: cached() keeps the database alive for the
// process, while `db` may be a caller's temporary.
std::string corpus_id(const Database& db, const TaskOptions& opt);
void attach_corpus(Task& t, const Database& db, const TaskOptions& opt, const TaskReport& rep) {
    t.report.notes.push_back(fmt::format("{}: WordNet at {}: {}", t.name, db.dir, rep.summary()));
    t.corpus_id = corpus_id(db, opt);
    if (db.dir.empty()) {  // an in-memory database (tests): the corpus is built now
        const std::string text = pretraining_corpus(db, 0, 0, opt);
        t.corpus = [text](uint64_t) { return text; };
        return;
    }
    t.corpus = [dir = db.dir, opt, name = t.name](uint64_t seed) {
        TaskReport r;
        std::string text = pretraining_corpus(cached(dir), 0, seed, opt, &r);
        fmt::print(stderr, "[{}] pretraining corpus: {}\n", name, r.summary());
        return text;
    };
}

}  // namespace

Task make_gloss_task(const Database& db, size_t n_train, size_t n_valid, size_t n_test, uint64_t seed,
                         const TaskOptions& opt, TaskReport* report) {
    const CommonTokens common = common_tokens(db, opt.common_words);
    TaskReport rep;
    // key -> definitions of its qualifying senses, in file (offset) order per pos.
    std::map<std::string, std::vector<std::string>> senses[3];  // by Split
    for_each_synset(db, [&](const Synset& s) {
        ++rep.synsets;
        std::string why = definition_problem(s, opt, common);
        if (why.empty() && !is_lower_word(s.words[0].lemma)) why = "head word not one lower-case a-z word";
        if (why.empty() && !common.contains(s.words[0].lemma))
            why = fmt::format("head word outside the {} most common", opt.common_words);
        if (!why.empty()) {
            ++rep.filtered[why];
            return;
        }
        senses[int(split_of(s))][key(s)].push_back(s.parsed.definition);
    });
    std::vector<Example> pairs;
    for (auto& [k, defs] : senses[int(Split::Train)])
        for (auto& d : defs) pairs.push_back(Example{k, d, {d}, {}, {}});
    rep.pool_train = pairs.size();
    rep.pool_valid = senses[int(Split::Valid)].size();
    rep.pool_test = senses[int(Split::Test)].size();
    if (report) *report = rep;
    check_pool("wordnet-gloss", "train", n_train, rep.pool_train);
    check_pool("wordnet-gloss", "valid", n_valid, rep.pool_valid);
    check_pool("wordnet-gloss", "test", n_test, rep.pool_test);
    Task t;
    t.name = "wordnet-gloss";
    t.scorer = generation_scorer();
    attach_corpus(t, db, opt, rep);
    // valid / test: one example per key, the first n in FNV-1a order of the key.
    auto held_out = [&](Split sp, size_t n, std::vector<Example>& out) {
        std::vector<std::pair<uint64_t, std::string>> keys;
        for (auto& [k, defs] : senses[int(sp)]) keys.emplace_back(fnv1a(k), k);
        std::sort(keys.begin(), keys.end());
        for (size_t i = 0; i < n; ++i) {
            const auto& defs = senses[int(sp)][keys[i].second];
            out.push_back(Example{keys[i].second, defs[0], defs, {}, {}});
        }
    };
    held_out(Split::Test, n_test, t.test);
    held_out(Split::Valid, n_valid, t.valid);
    seeded_shuffle(pairs, seed);
    pairs.resize(n_train);
    t.train = std::move(pairs);
    count_splits(t);
    return t;
}

Task make_pos_task(const Database& db, size_t n_train, size_t n_valid, size_t n_test, uint64_t seed,
                       const TaskOptions& opt, TaskReport* report) {
    static const std::vector<std::string> kLabels = {"noun", "verb", "adjective", "adverb"};
    const CommonTokens common = common_tokens(db, opt.common_words);
    TaskReport rep;
    // [split][class] -> (FNV-1a of "key offset", definition)
    std::vector<std::pair<uint64_t, std::string>> pool[3][4];
    for_each_synset(db, [&](const Synset& s) {
        ++rep.synsets;
        const std::string why = definition_problem(s, opt, common);
        if (!why.empty()) {
            ++rep.filtered[why];
            return;
        }
        const size_t c = size_t(std::find(kLabels.begin(), kLabels.end(), pos_name(s.ss_type)) - kLabels.begin());
        pool[int(split_of(s))][c].emplace_back(fnv1a(fmt::format("{} {:08d}", key(s), s.offset)), s.parsed.definition);
    });
    // The same definition text under two parts of speech would be a contradictory example.
    std::map<std::string, std::set<size_t>> classes_of;
    for (auto& sp : pool)
        for (size_t c = 0; c < 4; ++c)
            for (auto& [h, d] : sp[c]) classes_of[d].insert(c);
    for (auto& sp : pool)
        for (auto& cls : sp)
            std::erase_if(cls, [&](auto& e) {
                const bool ambiguous = classes_of[e.second].size() > 1;
                if (ambiguous) ++rep.filtered["definition shared by two parts of speech"];
                return ambiguous;
            });
    for (size_t c = 0; c < 4; ++c) {
        rep.pool_train += pool[int(Split::Train)][c].size();
        rep.pool_valid += pool[int(Split::Valid)][c].size();
        rep.pool_test += pool[int(Split::Test)][c].size();
    }
    if (report) *report = rep;
    Task t;
    t.name = "wordnet-pos";
    t.scorer = label_scorer(kLabels);
    t.labels = kLabels;
    attach_corpus(t, db, opt, rep);
    auto take = [&](Split sp, size_t n, const char* name, bool shuffle, std::vector<Example>& out) {
        for (size_t c = 0; c < 4; ++c) {
            auto v = pool[int(sp)][c];
            std::sort(v.begin(), v.end());
            if (shuffle) seeded_shuffle(v, seed + c);
            const size_t want = n / 4 + (c < n % 4);
            check_pool("wordnet-pos", name, want, v.size(), fmt::format(" of class '{}'", kLabels[c]));
            for (size_t i = 0; i < want; ++i) out.push_back(Example{v[i].second, kLabels[c], {kLabels[c]}, {}, {}});
        }
        // Classes interleaved by a fixed order, not in blocks (eval takes a prefix).
        std::vector<std::pair<uint64_t, size_t>> order;
        for (size_t i = 0; i < out.size(); ++i) order.emplace_back(fnv1a(out[i].source + out[i].target), i);
        std::sort(order.begin(), order.end());
        if (shuffle) seeded_shuffle(order, seed);
        std::vector<Example> sorted;
        for (auto& [h, i] : order) sorted.push_back(out[i]);
        out = std::move(sorted);
    };
    take(Split::Test, n_test, "test", false, t.test);
    take(Split::Valid, n_valid, "valid", false, t.valid);
    take(Split::Train, n_train, "train", true, t.train);
    count_splits(t);
    return t;
}

std::string pretraining_corpus(const Database& db, size_t max_lines, uint64_t seed, const TaskOptions& opt,
                               TaskReport* report) {
    const CommonTokens common = common_tokens(db, opt.common_words);
    auto all_common = [&](const std::string& text) {
        for (auto& w : split_words(text))
            if (!common.contains(w)) return false;
        return true;
    };
    TaskReport rep;
    std::vector<std::string> lines;
    for_each_synset(db, [&](const Synset& s) {
        ++rep.synsets;
        const char* why = split_of(s) != Split::Train  ? "in the valid/test split"
                          : !s.parsed.balanced         ? "unbalanced quotes in gloss"
                          : s.parsed.definition.empty() ? "no definition (examples only)"
                          : nullptr;
        if (why) {
            ++rep.filtered[why];
            return;
        }
        if (!(all_common(head(s)) && all_common(s.parsed.definition))) {
            ++rep.filtered[fmt::format("head or definition has a word outside the {} most common", opt.common_words)];
            return;
        }
        std::string line = key(s) + ": " + s.parsed.definition + ".";
        for (auto& e : s.parsed.examples) {
            if (all_common(e))
                line += " \"" + e + "\"";
            else
                ++rep.examples_left_out;
        }
        lines.push_back(std::move(line));
    });
    seeded_shuffle(lines, seed);
    if (max_lines && lines.size() > max_lines) {
        rep.filtered["beyond max_lines"] += lines.size() - max_lines;
        lines.resize(max_lines);
    }
    rep.lines = lines.size();
    if (report) *report = rep;
    std::string out;
    for (auto& l : lines) (out += l) += '\n';
    return out;
}

namespace {

// Names the corpus text in the base's cache key: the database (directory and
// data file sizes), the options and this code's version of the line format.
std::string corpus_id(const Database& db, const TaskOptions& opt) {
    return fmt::format("wordnet-corpus v1 {} synsets {}/{}/{}/{} common {} max_def {}", db.dir, db.noun.size(),
                       db.verb.size(), db.adj.size(), db.adv.size(), opt.common_words, opt.max_definition_bytes);
}

}  // namespace

}  // namespace peftlab::data::wordnet

namespace peftlab::data {

namespace {

// The vocabulary filter exists for a word tokenizer built from the data; a
// tokenizer that encodes any text gets every gloss.
wordnet::TaskOptions options_for(const TaskRequest& req) {
    wordnet::TaskOptions opt;
    if (req.open_vocabulary) opt.common_words = 0;
    return opt;
}

}  // namespace

Task make_wordnet_gloss_task(const TaskRequest& req) {
    return wordnet::make_gloss_task(wordnet::cached(), req.n_train, req.n_valid, req.n_test, req.seed, options_for(req));
}
Task make_wordnet_pos_task(const TaskRequest& req) {
    return wordnet::make_pos_task(wordnet::cached(), req.n_train, req.n_valid, req.n_test, req.seed, options_for(req));
}

}  // namespace peftlab::data
