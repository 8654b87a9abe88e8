#include "nn/json_limits.h"

#include <stdexcept>

#include <fmt/format.h>

namespace peftlab {

nlohmann::json parse_json_limited(std::string_view text, std::string_view what) {
    using nlohmann::json;
    // The callback sees each value's depth as it opens; refusing there stops the
    // parse before the deep value is built.
    bool too_deep = false;
    const json::parser_callback_t limit = [&](int depth, json::parse_event_t event, json&) {
        if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
            depth >= kMaxJsonDepth) {
            too_deep = true;
            throw std::runtime_error("");
        }
        return true;
    };
    try {
        return json::parse(text.begin(), text.end(), limit);
    } catch (const json::exception& e) {  // syntax errors, numbers too large for a double
        throw std::runtime_error(fmt::format("{}: not valid JSON ({})", what, e.what()));
    } catch (const std::runtime_error&) {
        if (!too_deep) throw;
        throw std::runtime_error(fmt::format("{}: JSON nested deeper than {} levels", what, kMaxJsonDepth));
    }
}

std::string json_excerpt(const nlohmann::json& v, size_t max_chars) {
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > max_chars) s = s.substr(0, max_chars) + "...";
    return s;
}

}  // namespace peftlab
