#pragma once
// The named model sizes, in one table: the experiments' --config (tiny ..
// medium, trained here) and the released GPT-2 sizes (Radford et al. 2019;
// Hugging Face's gpt2 .. gpt2-xl config.json), which the report prices
// analytically.
#include <string>
#include <vector>

#include "nn/gpt.h"

namespace peftlab {

struct ModelPreset {
    std::string name;
    GPTConfig config;  // tiny .. medium: vocab is the GPTConfig default; a run sets it from its tokenizer
    std::string use;   // one line: what the size is for
};

const std::vector<ModelPreset>& model_presets();
std::vector<std::string> model_preset_names();
// The config of preset `name`; throws std::invalid_argument naming it and
// listing the known ones.
GPTConfig model_preset(const std::string& name);

}  // namespace peftlab
