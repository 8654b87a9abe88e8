#include "datasets/gpt2_tokenizer.h"
#include "nn/json_limits.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include <fmt/format.h>

namespace fs = std::filesystem;

namespace peftlab::data {

namespace {

// GPT-2's pre-tokenizer (encoder.py). \s is written as \p{White_Space}, the
// Unicode property that Python's `regex` module and Hugging Face's tokenizers
// use for \s: PCRE2's own UCP \s adds U+180E (through \h, for Perl), which
// Unicode stopped counting as white space in 6.3.
constexpr const char* kPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\p{White_Space}\p{L}\p{N}]+)"
    R"(|\p{White_Space}+(?!\P{White_Space})|\p{White_Space}+)";

// Words kept in the cache before it is emptied: bounds its memory (~100 bytes
// an entry) on corpora with an open vocabulary.
constexpr size_t kMaxCacheEntries = size_t(1) << 18;

// bytes_to_unicode() of encoder.py: the printable Latin-1 bytes stand for
// themselves, the other 68 bytes (controls, space, 0x7f-0xa0, 0xad) for
// U+0100.. in byte order, so every byte has a visible, non-space symbol.
struct ByteSymbols {
    std::array<uint32_t, 256> code{};  // byte -> code point
    std::array<int16_t, 324> byte{};   // code point -> byte, -1 if none (all code points < 256 + 68)
    ByteSymbols() {
        byte.fill(-1);
        auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae); };
        uint32_t n = 0;
        for (int b = 0; b < 256; ++b) {
            code[b] = printable(b) ? uint32_t(b) : 256 + n++;
            byte[code[b]] = int16_t(b);
        }
    }
};
const ByteSymbols& byte_symbols() {
    static const ByteSymbols s;
    return s;
}

std::string utf8(uint32_t cp) {
    std::string s;
    if (cp < 0x80) {
        s += char(cp);
    } else {  // byte symbols are all below U+0800
        s += char(0xc0 | (cp >> 6));
        s += char(0x80 | (cp & 0x3f));
    }
    return s;
}

// The bytes a vocab key stands for, or an error message naming the first
// character that is not a byte symbol. `key` is valid UTF-8 (the JSON parser
// checks it).
bool symbols_to_bytes(const std::string& key, std::string& out, std::string& why) {
    const auto& bs = byte_symbols();
    out.clear();
    for (size_t i = 0; i < key.size();) {
        auto c = static_cast<unsigned char>(key[i]);
        uint32_t cp;
        size_t len;
        if (c < 0x80) {
            cp = c, len = 1;
        } else if ((c >> 5) == 0x6 && i + 1 < key.size()) {
            cp = ((c & 0x1fu) << 6) | (static_cast<unsigned char>(key[i + 1]) & 0x3fu), len = 2;
        } else {
            cp = 0x800, len = 1;  // 3- and 4-byte characters are never byte symbols
            if ((c >> 4) == 0xe && i + 2 < key.size())
                cp = ((c & 0xfu) << 12) | ((static_cast<unsigned char>(key[i + 1]) & 0x3fu) << 6) |
                     (static_cast<unsigned char>(key[i + 2]) & 0x3fu);
            else if ((c >> 3) == 0x1e && i + 3 < key.size())
                cp = ((c & 0x7u) << 18) | ((static_cast<unsigned char>(key[i + 1]) & 0x3fu) << 12) |
                     ((static_cast<unsigned char>(key[i + 2]) & 0x3fu) << 6) |
                     (static_cast<unsigned char>(key[i + 3]) & 0x3fu);
        }
        if (cp >= bs.byte.size() || bs.byte[cp] < 0) {
            why = fmt::format("character U+{:04X} is not one of GPT-2's 256 byte symbols", cp);
            return false;
        }
        out += char(bs.byte[cp]);
        i += len;
    }
    return true;
}

// GPT-2's encoder.json is 1.0 MB and vocab.bpe 0.46 MB; a vocabulary 60x larger still fits.
std::string read_file(const fs::path& p) { return read_small_file(p.string(), size_t(64) << 20, "GPT2Tokenizer"); }

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}
uint64_t fnv1a_u32(uint64_t h, uint32_t v) {
    const unsigned char b[4] = {uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)};
    return fnv1a(h, b, 4);
}

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

// SAX handler for a vocab file: one JSON object of string -> integer,
// collected in file order. Anything else throws, naming the file and key.
struct VocabReader : nlohmann::json::json_sax_t {
    struct Entry {
        std::string key;
        int64_t id;        // -1 for an integer beyond int64
        std::string text;  // the id as written, for messages
    };
    std::vector<Entry> entries;
    const std::string& file;
    std::string key_;
    int depth_ = 0;

    explicit VocabReader(const std::string& f) : file(f) {}

    [[noreturn]] void bad_value(const std::string& what) const {
        if (depth_ == 0)
            throw std::runtime_error(fmt::format("{}: expected a JSON object of token -> id, got {}", file, what));
        throw std::runtime_error(fmt::format("{}: key {}: the id must be an integer, got {}", file,
                                             nlohmann::json(key_).dump(), what));
    }
    bool id(int64_t v, std::string text) {
        if (depth_ != 1) bad_value(text);
        entries.push_back({std::move(key_), v, std::move(text)});
        return true;
    }
    bool null() override { bad_value("null"); }
    bool boolean(bool v) override { bad_value(v ? "true" : "false"); }
    bool number_integer(number_integer_t v) override { return id(v, std::to_string(v)); }
    bool number_unsigned(number_unsigned_t v) override {
        return id(v > uint64_t(INT64_MAX) ? -1 : int64_t(v), std::to_string(v));
    }
    bool number_float(number_float_t, const string_t& s) override { bad_value(s); }
    bool string(string_t& v) override { bad_value(nlohmann::json(v).dump()); }
    bool binary(binary_t&) override { bad_value("binary data"); }
    bool start_object(std::size_t) override {
        if (depth_ != 0) bad_value("an object");
        ++depth_;
        return true;
    }
    bool key(string_t& k) override {
        key_ = std::move(k);
        return true;
    }
    bool end_object() override {
        --depth_;
        return true;
    }
    bool start_array(std::size_t) override { bad_value("an array"); }
    bool end_array() override { return true; }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override { throw e; }
};

}  // namespace

struct GPT2Tokenizer::Impl {
    std::string dir, vocab_file, merges_file, fingerprint;
    std::vector<std::string> tokens;         // id -> bytes
    std::array<int32_t, 256> byte_id{};      // byte -> id of its one-symbol token
    struct Merge {
        int32_t rank, result;
    };
    std::unordered_map<uint64_t, Merge> merges;  // pair_key(left id, right id) -> rank, merged id
    size_t num_merges = 0;
    std::vector<std::pair<int32_t, int32_t>> merge_order;  // rank -> (left id, right id)
    int32_t eot = -1;

    pcre2_code* re = nullptr;

    mutable std::mutex cache_mu;
    // Transparent hash: look-ups take the word as a string_view, no copy.
    struct WordHash {
        using is_transparent = void;
        size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
    };
    mutable std::unordered_map<std::string, std::vector<int32_t>, WordHash, std::equal_to<>> cache;

    Impl() = default;
    Impl(const Impl&) = delete;
    Impl& operator=(const Impl&) = delete;
    ~Impl() { pcre2_code_free(re); }

    void compile_pattern();
    void bpe(std::string_view word, std::vector<int32_t>& out) const;
    void encode_word(std::string_view word, std::vector<int32_t>& out) const;
    void encode_piece(std::string_view text, pcre2_match_data* md, std::vector<int32_t>& out) const;
};

void GPT2Tokenizer::Impl::compile_pattern() {
    int err = 0;
    PCRE2_SIZE err_off = 0;
    // MATCH_INVALID_UTF: invalid UTF-8 is allowed in the subject and never
    // matched (PCRE2 >= 10.34), instead of failing the whole match.
    re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED,
                       PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &err_off, nullptr);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        throw std::runtime_error(fmt::format("GPT2Tokenizer: PCRE2 rejects the pre-tokenizer pattern at offset {}: {}",
                                             err_off, reinterpret_cast<const char*>(msg)));
    }
    // The JIT is ~5x faster; where it is unavailable the interpreter gives the
    // same matches.
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
}

// Byte-pair merging of one word exactly as encoder.py's bpe(): the adjacent
// pair of lowest rank is merged at all its occurrences, left to right and
// non-overlapping, then the pairs this formed compete again. A linked list of
// symbols and a heap of (rank, position) candidates make it O(n log n) in the
// word's length, so a long run of digits or spaces costs no more than its
// size. New pairs are queued only after a rank's pass is complete, as in
// encoder.py (this matters only for merge tables where a token made by a
// later merge is used by an earlier one, which BPE training never produces).
void GPT2Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
    const int n = int(word.size());
    if (n == 1) {
        out.push_back(byte_id[static_cast<unsigned char>(word[0])]);
        return;
    }
    struct Sym {
        int32_t id;      // -1 once merged into its left neighbour
        int prev, next;  // -1 at the ends
    };
    std::vector<Sym> sym(n);
    for (int i = 0; i < n; ++i) sym[i] = {byte_id[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1};
    struct Cand {
        int32_t rank;
        int pos;
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto merge_at = [&](int i) -> const Merge* {
        if (i < 0 || sym[i].id < 0 || sym[i].next < 0) return nullptr;
        auto it = merges.find(pair_key(sym[i].id, sym[sym[i].next].id));
        return it == merges.end() ? nullptr : &it->second;
    };
    auto push = [&](int i) {
        if (const Merge* m = merge_at(i)) heap.push({m->rank, i});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    std::vector<int> merged;
    while (!heap.empty()) {
        const int32_t rank = heap.top().rank;
        merged.clear();
        while (!heap.empty() && heap.top().rank == rank) {  // positions ascending
            const int i = heap.top().pos;
            heap.pop();
            const Merge* m = merge_at(i);
            if (!m || m->rank != rank) continue;  // stale: the symbol or its neighbour changed
            Sym& r = sym[sym[i].next];
            sym[i].id = m->result;
            r.id = -1;
            sym[i].next = r.next;
            if (r.next >= 0) sym[r.next].prev = i;
            merged.push_back(i);
        }
        for (int i : merged) {
            push(sym[i].prev);
            push(i);
        }
    }
    for (int i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
}

void GPT2Tokenizer::Impl::encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.size() > kMaxCachedWordBytes) {
        bpe(word, out);
        return;
    }
    {
        std::lock_guard lock(cache_mu);
        auto it = cache.find(word);
        if (it != cache.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    const size_t start = out.size();
    bpe(word, out);
    std::lock_guard lock(cache_mu);
    if (cache.size() >= kMaxCacheEntries) cache.clear();
    cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + long(start), out.end()));
}

void GPT2Tokenizer::Impl::encode_piece(std::string_view text, pcre2_match_data* md, std::vector<int32_t>& out) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t pos = 0;
    while (pos < text.size()) {
        int rc = pcre2_match(re, subject, text.size(), pos, 0, md, nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) {  // only invalid UTF-8 is left
            encode_word(text.substr(pos), out);
            return;
        }
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            throw std::runtime_error(fmt::format("GPT2Tokenizer::encode: PCRE2 match failed at byte {}: {}", pos,
                                                 reinterpret_cast<const char*>(msg)));
        }
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        const size_t start = ov[0], end = ov[1];
        // Every valid character matches some alternative, so bytes skipped
        // before a match are invalid UTF-8: they form a word of their own.
        if (start > pos) encode_word(text.substr(pos, start - pos), out);
        if (end <= start)  // no alternative can match the empty string
            throw std::logic_error(fmt::format("GPT2Tokenizer::encode: empty match at byte {}", start));
        encode_word(text.substr(start, end - start), out);
        pos = end;
    }
}

// ---------------------------------------------------------------- loading

GPT2Tokenizer GPT2Tokenizer::from_dir(const std::string& dir) {
    const fs::path d(dir);
    std::error_code ec;
    if (!fs::is_directory(d, ec))
        throw std::runtime_error(fmt::format("GPT2Tokenizer: '{}' is not a directory", dir));
    std::string vocab_name, merges_name;
    if (fs::exists(d / "vocab.json", ec)) {
        vocab_name = "vocab.json", merges_name = "merges.txt";
    } else if (fs::exists(d / "encoder.json", ec)) {
        vocab_name = "encoder.json", merges_name = "vocab.bpe";
    } else {
        throw std::runtime_error(
            fmt::format("GPT2Tokenizer: {} holds neither vocab.json + merges.txt (Hugging Face) nor encoder.json + "
                        "vocab.bpe (OpenAI)",
                        dir));
    }
    if (!fs::exists(d / merges_name, ec))
        throw std::runtime_error(fmt::format("GPT2Tokenizer: {} has {} but no {}", dir, vocab_name, merges_name));
    const std::string vocab = read_file(d / vocab_name), merges = read_file(d / merges_name);
    GPT2Tokenizer t = from_strings(vocab, merges, (d / vocab_name).string(), (d / merges_name).string());
    auto impl = std::const_pointer_cast<Impl>(t.impl_);  // not yet shared: from_strings made it
    impl->dir = fs::absolute(d).lexically_normal().string();
    if (impl->dir.size() > 1 && impl->dir.back() == '/') impl->dir.pop_back();
    impl->vocab_file = vocab_name;
    impl->merges_file = merges_name;
    return t;
}

GPT2Tokenizer GPT2Tokenizer::from_strings(std::string_view vocab_json, std::string_view merges_txt,
                                          const std::string& vocab_name, const std::string& merges_name) {
    auto impl = std::make_shared<Impl>();
    impl->vocab_file = vocab_name;
    impl->merges_file = merges_name;

    // ---- vocab: {"symbols": id, ...}, read with a SAX parser (no DOM: 4x
    // faster on GPT-2's 1 MB file, and repeated keys stay visible).
    VocabReader reader(vocab_name);
    try {
        nlohmann::json::sax_parse(vocab_json, &reader);
    } catch (const nlohmann::json::exception& e) {
        throw std::runtime_error(fmt::format("{}: not valid JSON: {}", vocab_name, e.what()));
    }
    const std::vector<VocabReader::Entry>& entries = reader.entries;
    const size_t n = entries.size();
    if (n > size_t(INT32_MAX)) throw std::runtime_error(fmt::format("{}: {} entries do not fit int32 ids", vocab_name, n));
    impl->tokens.assign(n, std::string());
    std::vector<const std::string*> owner(n, nullptr);  // id -> its key, to name both keys of a repeated id
    std::unordered_map<std::string_view, int32_t> id_of;  // byte-symbol spelling -> id
    id_of.reserve(n);
    std::string bytes, why;
    for (const VocabReader::Entry& e : entries) {
        const std::string k = nlohmann::json(e.key).dump();
        if (e.id < 0 || e.id >= int64_t(n))
            throw std::runtime_error(fmt::format("{}: key {}: id {} is outside [0, {}) (ids must number the {} entries "
                                                 "densely from 0)",
                                                 vocab_name, k, e.text, n, n));
        if (!id_of.emplace(e.key, int32_t(e.id)).second)
            throw std::runtime_error(fmt::format("{}: key {} appears twice", vocab_name, k));
        if (owner[e.id])
            throw std::runtime_error(fmt::format("{}: key {}: id {} is also the id of key {}", vocab_name, k, e.id,
                                                 nlohmann::json(*owner[e.id]).dump()));
        if (!symbols_to_bytes(e.key, bytes, why))
            throw std::runtime_error(fmt::format("{}: key {} (id {}): {}", vocab_name, k, e.id, why));
        owner[e.id] = &e.key;
        impl->tokens[e.id] = bytes;
    }
    const auto& bs = byte_symbols();
    for (int b = 0; b < 256; ++b) {
        auto it = id_of.find(utf8(bs.code[b]));
        if (it == id_of.end())
            throw std::runtime_error(fmt::format("{}: no token for byte 0x{:02x} (symbol \"{}\"), so some text could not "
                                                 "be encoded",
                                                 vocab_name, b, utf8(bs.code[b])));
        impl->byte_id[b] = it->second;
    }
    auto eot = id_of.find(std::string(kEndOfText));
    if (eot == id_of.end())
        throw std::runtime_error(fmt::format("{}: no \"{}\" token (GPT-2's PAD/BOS/EOS)", vocab_name, kEndOfText));
    impl->eot = eot->second;

    // ---- merges: an optional "#version" line, then "left right" per line, by rank
    std::unordered_map<uint64_t, size_t> line_of;  // pair -> line, for repeats
    std::vector<std::pair<int32_t, int32_t>> order;
    size_t line_no = 0, pos = 0;
    std::string joined;
    while (pos < merges_txt.size()) {
        size_t eol = merges_txt.find('\n', pos);
        if (eol == std::string_view::npos) eol = merges_txt.size();
        std::string_view line = merges_txt.substr(pos, eol - pos);
        pos = eol + 1;
        ++line_no;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.empty() || (line_no == 1 && line.substr(0, 8) == "#version")) continue;
        const size_t sp = line.find(' ');
        if (sp == std::string_view::npos || sp == 0 || sp + 1 == line.size() ||
            line.find(' ', sp + 1) != std::string_view::npos)
            throw std::runtime_error(fmt::format("{} line {}: expected two symbols separated by one space, got {}",
                                                 merges_name, line_no, nlohmann::json(std::string(line)).dump(
                                                     -1, ' ', false, nlohmann::json::error_handler_t::replace)));
        const std::string_view left = line.substr(0, sp), right = line.substr(sp + 1);
        auto find = [&](std::string_view s) {
            auto it = id_of.find(s);
            if (it == id_of.end())
                throw std::runtime_error(fmt::format("{} line {}: symbol {} is not in {}", merges_name, line_no,
                                                     nlohmann::json(std::string(s)).dump(-1, ' ', false,
                                                                            nlohmann::json::error_handler_t::replace),
                                                     vocab_name));
            return it->second;
        };
        const int32_t a = find(left), b = find(right);
        joined.assign(left).append(right);
        auto res = id_of.find(joined);
        if (res == id_of.end())
            throw std::runtime_error(fmt::format("{} line {}: merging \"{} {}\" makes \"{}\", which is not in {}",
                                                 merges_name, line_no, left, right, joined, vocab_name));
        auto [it, fresh] = line_of.emplace(pair_key(a, b), line_no);
        if (!fresh)
            throw std::runtime_error(fmt::format("{} line {}: merge \"{} {}\" repeats line {}", merges_name, line_no,
                                                 left, right, it->second));
        impl->merges.emplace(pair_key(a, b), Impl::Merge{int32_t(order.size()), res->second});
        order.emplace_back(a, b);
    }
    impl->num_merges = order.size();
    impl->merge_order = order;

    // Every token but the 256 byte tokens and "<|endoftext|>" is the result of
    // one merge (GPT-2: 256 + 50000 + 1 = 50257). One that no merge makes can
    // never be produced: a merges file cut short (or empty, or of another
    // vocabulary) would otherwise load as a smaller tokenizer and encode text
    // into different, longer id sequences without a word.
    std::vector<char> made(n, 0);
    for (const auto& [key, m] : impl->merges) made[size_t(m.result)] = 1;
    for (int b = 0; b < 256; ++b) made[size_t(impl->byte_id[b])] = 1;
    made[size_t(impl->eot)] = 1;
    const size_t unmade = size_t(std::count(made.begin(), made.end(), char(0)));
    if (unmade > 0) {
        const size_t first = size_t(std::find(made.begin(), made.end(), char(0)) - made.begin());
        throw std::runtime_error(fmt::format(
            "{}: {} of {}'s {} tokens are made by no merge, e.g. {} (id {}); the {} merges read are too few: the file "
            "is truncated or belongs to another vocabulary",
            merges_name, unmade, vocab_name, n, nlohmann::json(*owner[first]).dump(), first, order.size()));
    }

    // ---- fingerprint: FNV-1a 64 over the parsed tables, not the file bytes,
    // so that the same vocabulary under either file naming matches.
    uint64_t h = 0xcbf29ce484222325ull;
    h = fnv1a_u32(h, uint32_t(n));
    for (const std::string& t : impl->tokens) {
        h = fnv1a_u32(h, uint32_t(t.size()));
        h = fnv1a(h, t.data(), t.size());
    }
    h = fnv1a_u32(h, uint32_t(order.size()));
    for (auto [a, b] : order) h = fnv1a_u32(fnv1a_u32(h, uint32_t(a)), uint32_t(b));
    h = fnv1a_u32(h, uint32_t(impl->eot));
    impl->fingerprint = fmt::format("{:016x}", h);

    impl->compile_pattern();
    return GPT2Tokenizer(std::move(impl));
}

// ---------------------------------------------------------------- encode / decode

std::vector<int32_t> GPT2Tokenizer::encode(std::string_view text) const {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3);
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(impl_->re, nullptr), &pcre2_match_data_free);
    if (!md) throw std::bad_alloc();
    size_t pos = 0;
    while (true) {
        const size_t eot = text.find(kEndOfText, pos);
        impl_->encode_piece(text.substr(pos, eot == std::string_view::npos ? std::string_view::npos : eot - pos),
                            md.get(), ids);
        if (eot == std::string_view::npos) break;
        ids.push_back(impl_->eot);
        pos = eot + kEndOfText.size();
    }
    return ids;
}

std::string GPT2Tokenizer::decode(const std::vector<int32_t>& ids) const { return decode(ids, false); }

std::string GPT2Tokenizer::decode(const std::vector<int32_t>& ids, bool keep_special) const {
    std::string out;
    out.reserve(ids.size() * 4);
    for (size_t i = 0; i < ids.size(); ++i) {
        const int32_t id = ids[i];
        if (id < 0 || id >= vocab_size())
            throw std::out_of_range(fmt::format("GPT2Tokenizer::decode: id {} at position {} is outside the vocabulary "
                                                "[0, {})",
                                                id, i, vocab_size()));
        if (id == impl_->eot && !keep_special) continue;
        out += impl_->tokens[id];
    }
    return out;
}

int32_t GPT2Tokenizer::vocab_size() const { return int32_t(impl_->tokens.size()); }
int32_t GPT2Tokenizer::eot_id() const { return impl_->eot; }
size_t GPT2Tokenizer::num_merges() const { return impl_->num_merges; }

std::string GPT2Tokenizer::token_symbols(int32_t id) const {
    const auto& bs = byte_symbols();
    std::string out;
    for (unsigned char b : token_bytes(id)) out += utf8(bs.code[b]);
    return out;
}

std::string GPT2Tokenizer::merge_symbols(size_t rank) const {
    if (rank >= impl_->num_merges)
        throw std::out_of_range(
            fmt::format("GPT2Tokenizer::merge_symbols: rank {} is outside [0, {})", rank, impl_->num_merges));
    const auto [a, b] = impl_->merge_order[rank];
    return token_symbols(a) + " " + token_symbols(b);
}
const std::string& GPT2Tokenizer::fingerprint() const { return impl_->fingerprint; }

const std::string& GPT2Tokenizer::token_bytes(int32_t id) const {
    if (id < 0 || id >= vocab_size())
        throw std::out_of_range(
            fmt::format("GPT2Tokenizer::token_bytes: id {} is outside the vocabulary [0, {})", id, vocab_size()));
    return impl_->tokens[id];
}

nlohmann::json GPT2Tokenizer::to_json() const {
    return {{"type", "gpt2"},
            {"dir", impl_->dir},
            {"vocab_file", impl_->vocab_file},
            {"merges_file", impl_->merges_file},
            {"fingerprint", impl_->fingerprint}};
}

}  // namespace peftlab::data
