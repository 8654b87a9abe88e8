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
    bool builtin = false;  // in registry.cpp's list (not register_method's)
};

// The built-in methods (registry.cpp), then those registered at run time.
const std::vector<MethodInfo>& methods();
std::vector<std::string> method_names();
// Throws std::invalid_argument naming the unknown method and listing the known ones.
std::unique_ptr<Adapter> make_adapter(const std::string& name, const AdapterOptions& opts = {});
// Adds a method defined outside peft/ (a test, a user's program): from then on
// it is available everywhere by name, like the built-in ones. Throws
// std::invalid_argument for an empty or taken name or a missing factory.
void register_method(MethodInfo info);

}  // namespace peftlab::peft
