#pragma once
// Adapters by name. The list itself is in registry.cpp, one line per method.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "peft/adapter.h"

namespace peftlab::peft {

struct MethodInfo {
    std::string name;         // "prefix-kv"
    std::string description;  // one line, for --help and reports
    std::function<std::unique_ptr<Adapter>(const AdapterOptions&)> make;
};

const std::vector<MethodInfo>& methods();
std::vector<std::string> method_names();
// Throws std::invalid_argument naming the unknown method and listing the known ones.
std::unique_ptr<Adapter> make_adapter(const std::string& name, const AdapterOptions& opts = {});

}  // namespace peftlab::peft
