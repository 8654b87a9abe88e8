#pragma once
// Hugging Face GPT-2 checkpoints (transformers' GPT2LMHeadModel, hub layout) to
// and from our GPT.
//
// A directory holds config.json and model.safetensors, or shards listed by
// model.safetensors.index.json ({"weight_map": {key: file}}). Keys may carry
// the "transformer." prefix or not. Mapping (transformers modeling_gpt2.py):
//   wte.weight [V, C], wpe.weight [n_positions, C]     -> wte, wpe
//   h.N.ln_1 / ln_2 / ln_f {weight, bias} [C]          -> blocks.N.ln1 / ln2, ln_f
//   h.N.attn.c_attn.{weight [C, 3C], bias [3C]}       -> q_proj, k_proj, v_proj
//       (Conv1D stores [in, out]: y = x W + b, so each [C, C] column block is
//       transposed into our Linear [out, in]; columns 0..C-1 are q, then k, v)
//   h.N.attn.c_proj [C, C], h.N.mlp.c_fc [C, F], h.N.mlp.c_proj [F, C]
//                                                       -> o_proj, mlp.fc, mlp.proj (transposed)
//   lm_head.weight [V, C] (nn.Linear)                  -> head; absent: tied to wte
//   h.N.attn.bias / h.N.attn.masked_bias               -> ignored (causal-mask buffers)
// Config: n_embd, n_layer, n_head, n_positions (or n_ctx), vocab_size,
// n_inner (null: 4*n_embd), layer_norm_epsilon, activation_function
// ("gelu_new": tanh form, "gelu": exact), tie_word_embeddings. Attention is
// scaled by 1/sqrt(C/H) as GPT-2's scale_attn_weights; dropout is 0 in the
// loaded model (the *_pdrop fields are not applied).
#include <memory>
#include <string>
#include <vector>

#include "nn/gpt.h"

namespace peftlab {

// Loads a GPT-2 checkpoint directory into a float32 GPT. Tensors in F32, F16
// or BF16 are converted one at a time from the memory-mapped files (peak
// memory: the model plus its largest tensor). Throws std::runtime_error naming
// the file (and key or field) for: a missing or non-JSON config.json, a
// missing field or a feature we do not implement (scale_attn_by_inverse_layer_idx,
// add_cross_attention, scale_attn_weights false, another activation, a
// model_type other than gpt2), no weights file, any corruption the
// safetensors reader refuses, a bad shard index or shard name, a missing,
// duplicated or unknown tensor, a shape that disagrees with config.json, a
// NaN or Inf weight (named with its element), and an lm_head.weight that
// differs from wte.weight while the config ties them.
std::unique_ptr<GPT> load_hf_gpt2(const std::string& dir);

// The GPTConfig of dir/config.json alone (no weights read), with the same checks.
GPTConfig load_hf_gpt2_config(const std::string& dir);

// Writes `model` to `dir` (created if missing) as config.json and
// model.safetensors (F32, keys "transformer.*", lm_head.weight only when
// untied, metadata format "pt"), each file atomically (temp + fsync + rename).
// load_hf_gpt2 gives back bitwise the same parameters. The model's dropout is
// written as resid_pdrop/embd_pdrop. Throws std::runtime_error naming the path.
void save_hf_gpt2(const GPT& model, const std::string& dir);

// ---- GPT-2 module names, for adapters exported to / imported from HF PEFT ----------------
// A GPT-2 block's four Conv1D modules (weight [in, out]) and, in the order of
// their output columns, our Linear layers each holds (paths inside a block):
//   attn.c_attn [C, 3C] -> attn.q_proj, attn.k_proj, attn.v_proj (C outputs each)
//   attn.c_proj [C, C]  -> attn.o_proj
//   mlp.c_fc    [C, F]  -> mlp.fc
//   mlp.c_proj  [F, C]  -> mlp.proj
struct HfGpt2Module {
    std::string name;                  // "attn.c_attn": the path inside transformer.h.N
    std::string target;                // how PEFT's target_modules names it alone: "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"
    std::vector<std::string> linears;  // ours, in output order: {"attn.q_proj", "attn.k_proj", "attn.v_proj"}
};
const std::vector<HfGpt2Module>& hf_gpt2_block_modules();

// The module holding our Linear `linear` ("attn.v_proj", a path inside a block)
// and the index of its output block in it (v_proj: 2); throws
// std::invalid_argument for a path that is none of ours.
std::pair<const HfGpt2Module*, int> hf_gpt2_module_of(const std::string& linear);

// The block modules a PEFT target_modules entry selects: PEFT matches a module
// whose full name equals the entry or ends with "." + entry, so "c_proj" selects
// attn.c_proj and mlp.c_proj, "attn.c_attn" and "c_attn" the fused attention
// input. Empty when it selects none (e.g. "q_proj", "ln_1").
std::vector<const HfGpt2Module*> hf_gpt2_select(const std::string& target);

// "transformer.h.<layer>.<module>": the module's name in GPT2LMHeadModel
// (PEFT prefixes its adapter keys with "base_model.model.").
std::string hf_gpt2_module_key(int layer, const std::string& module);

// PEFT's layers_pattern for GPT-2: the ModuleList holding the blocks (transformer.h).
inline constexpr const char* kHfGpt2LayersPattern = "h";

}  // namespace peftlab
