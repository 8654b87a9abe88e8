#include "datasets/corpus.h"

#include <cmath>
#include <filesystem>
#include <numeric>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

#include "autograd/rng.h"
#include "nn/json_limits.h"

namespace peftlab::data {

std::optional<size_t> find_invalid_utf8(std::string_view text) {
    size_t i = 0;
    while (i < text.size()) {
        auto b0 = static_cast<unsigned char>(text[i]);
        size_t len;
        uint32_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
        if (b0 < 0x80) {
            ++i;
            continue;
        } else if (b0 >= 0xC2 && b0 <= 0xDF) {
            len = 2;
        } else if (b0 >= 0xE0 && b0 <= 0xEF) {
            len = 3;
            if (b0 == 0xE0) lo = 0xA0;  // overlong
            if (b0 == 0xED) hi = 0x9F;  // UTF-16 surrogates
        } else if (b0 >= 0xF0 && b0 <= 0xF4) {
            len = 4;
            if (b0 == 0xF0) lo = 0x90;  // overlong
            if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
        } else {
            return i;  // continuation byte without a lead, or C0/C1/F5..FF
        }
        if (i + len > text.size()) return i;
        for (size_t k = 1; k < len; ++k) {
            auto b = static_cast<unsigned char>(text[i + k]);
            uint32_t kl = k == 1 ? lo : 0x80, kh = k == 1 ? hi : 0xBF;
            if (b < kl || b > kh) return i;
        }
        i += len;
    }
    return std::nullopt;
}

TextSplit load_text_corpus(const std::string& path, double valid_fraction, uint64_t seed) {
    if (!(valid_fraction >= 0.0 && valid_fraction < 1.0))
        throw std::invalid_argument(
            fmt::format("load_text_corpus('{}'): valid_fraction {} must be in [0, 1)", path, valid_fraction));

    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (!std::filesystem::exists(status))
        throw std::runtime_error(fmt::format("load_text_corpus: '{}' does not exist", path));
    // Before opening: a FIFO's open would wait for a writer, /dev/zero never ends.
    if (!std::filesystem::is_regular_file(status))
        throw std::runtime_error(fmt::format("load_text_corpus: '{}' is not a regular file", path));
    // The size refuses a large (or sparse) file before any byte is read; the
    // read below holds to the limit whatever the size said.
    if (const auto size = std::filesystem::file_size(path, ec); !ec && size > kMaxCorpusBytes)
        throw std::runtime_error(fmt::format("load_text_corpus: '{}' has {} bytes, more than the {} a corpus may have",
                                             path, size, kMaxCorpusBytes));
    const std::string file = read_small_file(path, kMaxCorpusBytes, "load_text_corpus");
    // Offsets in messages count from the file's start, a byte-order mark included.
    const size_t bom = std::string_view(file).substr(0, 3) == "\xEF\xBB\xBF" ? 3 : 0;
    const std::string_view text = std::string_view(file).substr(bom);

    if (auto nul = text.find('\0'); nul != std::string_view::npos)
        throw std::runtime_error(
            fmt::format("load_text_corpus: '{}' is not a text file: NUL byte at byte offset {}", path, nul + bom));
    if (auto bad = find_invalid_utf8(text))
        throw std::runtime_error(
            fmt::format("load_text_corpus: '{}' is not UTF-8 text: invalid byte 0x{:02x} at byte offset {}", path,
                        static_cast<unsigned char>(text[*bad]), *bad + bom));

    std::vector<std::string_view> lines;
    for (size_t start = 0; start < text.size();) {
        size_t end = text.find('\n', start);
        if (end == std::string_view::npos) end = text.size();
        std::string_view line(text.data() + start, end - start);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.find_first_not_of(" \t\r\v\f") != std::string_view::npos) lines.push_back(line);
        start = end + 1;
    }
    if (lines.empty())
        throw std::runtime_error(fmt::format("load_text_corpus: '{}' is empty (no non-blank line)", path));

    size_t n_valid = size_t(std::llround(valid_fraction * double(lines.size())));
    n_valid = std::min(n_valid, lines.size() - 1);

    // Fisher-Yates over line indices; the first n_valid go to valid.
    std::vector<size_t> order(lines.size());
    std::iota(order.begin(), order.end(), size_t{0});
    Rng rng(seed);
    for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.below(uint32_t(i + 1))]);
    std::vector<bool> is_valid(lines.size(), false);
    for (size_t k = 0; k < n_valid; ++k) is_valid[order[k]] = true;

    TextSplit split;
    for (size_t i = 0; i < lines.size(); ++i) {
        std::string& dst = is_valid[i] ? split.valid : split.train;
        dst.append(lines[i]);
        dst += '\n';
    }
    return split;
}

}  // namespace peftlab::data
