#include "nn/json_limits.h"

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

namespace peftlab {

nlohmann::json parse_json_limited(std::string_view text, std::string_view what) {
    using nlohmann::json;
    // The callback sees each value's depth as it opens; refusing there stops the
    // parse before the deep value is built.
    // The keys of each open object, innermost last; the callback also sees
    // array_start, whose entry stays empty.
    std::vector<std::set<std::string>> keys;
    std::string refused;  // why the callback stopped the parse
    const json::parser_callback_t limit = [&](int depth, json::parse_event_t event, json& parsed) {
        switch (event) {
            case json::parse_event_t::object_start:
            case json::parse_event_t::array_start:
                if (depth >= kMaxJsonDepth) {
                    refused = fmt::format("JSON nested deeper than {} levels", kMaxJsonDepth);
                    throw std::runtime_error("");
                }
                keys.emplace_back();
                break;
            case json::parse_event_t::object_end:
            case json::parse_event_t::array_end:
                keys.pop_back();
                break;
            case json::parse_event_t::key:
                if (!keys.back().insert(parsed.get<std::string>()).second) {
                    refused = fmt::format("duplicate key {}", json_excerpt(parsed));
                    throw std::runtime_error("");
                }
                break;
            case json::parse_event_t::value: break;
        }
        return true;
    };
    try {
        return json::parse(text.begin(), text.end(), limit);
    } catch (const json::exception& e) {  // syntax errors, numbers too large for a double
        throw std::runtime_error(fmt::format("{}: not valid JSON ({})", what, e.what()));
    } catch (const std::runtime_error&) {
        if (refused.empty()) throw;
        throw std::runtime_error(fmt::format("{}: {}", what, refused));
    }
}

std::string read_small_file(const std::string& path, size_t max_bytes, std::string_view who) {
    auto fail = [&](const std::string& why) { return std::runtime_error(fmt::format("{}: '{}': {}", who, path, why)); };
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status)) throw fail("cannot open (no such file)");
    if (!std::filesystem::is_regular_file(status)) throw fail("not a regular file");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw fail(fmt::format("cannot open ({})", std::strerror(errno)));
    // In pieces, whatever the size said: a file may grow while it is read.
    std::string text;
    std::array<char, 1 << 16> piece;
    while (in.read(piece.data(), piece.size()) || in.gcount() > 0) {
        text.append(piece.data(), size_t(in.gcount()));
        if (text.size() > max_bytes) throw fail(fmt::format("more than the {} bytes this file may have", max_bytes));
    }
    if (in.bad()) throw fail("read error");
    return text;
}

std::string json_excerpt(const nlohmann::json& v, size_t max_chars) {
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > max_chars) s = s.substr(0, max_chars) + "...";
    return s;
}

}  // namespace peftlab
