#pragma once
// GGUF export: the single-file model format of ggml and llama.cpp.
//
// Format (GGUF version 3, ggml's docs/gguf.md), all little-endian:
//   "GGUF" | u32 version = 3 | u64 tensor_count | u64 metadata_kv_count
//   metadata_kv_count x { string key | u32 value_type | value }
//     value_type: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string,
//     9 array (u32 element type | u64 n | n values), 10 u64, 11 i64, 12 f64;
//     string = u64 byte length | UTF-8 bytes (no terminator)
//   tensor_count x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
//     ne[0] is the innermost (contiguous) dimension: a PyTorch tensor of shape
//     [out, in] is written with ne = {in, out}; ggml_type 0 = F32, 1 = F16;
//     offset is relative to the data section and a multiple of the alignment
//   zero padding to the alignment (general.alignment, default 32), then the data
//   section: each tensor's bytes, each padded with zeros to the alignment.
//
// save_gguf_gpt2 writes a GPT as llama.cpp's "gpt2" architecture, with the names and
// shapes llama.cpp's loader expects (src/llama-arch.cpp, src/llama-model.cpp; the same
// as convert_hf_to_gguf.py writes for a Hugging Face GPT-2):
//   token_embd.weight {C, V}, position_embd.weight {C, n_ctx}
//   blk.N.attn_norm.{weight,bias} {C}          <- blocks.N.ln1
//   blk.N.attn_qkv.weight {C, 3C}, .bias {3C}  <- q_proj, k_proj, v_proj stacked (q rows first)
//   blk.N.attn_output.{weight {C, C}, bias}    <- attn.o_proj
//   blk.N.ffn_norm.{weight,bias} {C}           <- blocks.N.ln2
//   blk.N.ffn_up.{weight {C, F}, bias {F}}     <- mlp.fc
//   blk.N.ffn_down.{weight {F, C}, bias {C}}   <- mlp.proj
//   output_norm.{weight,bias} {C}              <- ln_f
//   output.weight {C, V}                       <- head (only when untied; llama.cpp reuses
//                                                  token_embd otherwise)
// (shapes in ggml's ne order; our Linear weights are [out, in] row-major, which is exactly
// ggml's {in, out}, so no transpose is needed). Keys: general.architecture "gpt2",
// general.name, general.file_type (0 all F32, 1 mostly F16), general.alignment,
// gpt2.context_length, gpt2.embedding_length, gpt2.feed_forward_length,
// gpt2.block_count, gpt2.attention.head_count, gpt2.attention.layer_norm_epsilon,
// gpt2.vocab_size, and the tokenizer (below).
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "nn/gpt.h"

namespace peftlab {

// ggml tensor types this writer produces (ggml.h enum ggml_type).
enum class GgmlType : uint32_t { F32 = 0, F16 = 1 };

// Builds a GGUF v3 file in memory (metadata) and writes it with the tensors' data streamed
// from the caller's buffers.
class GgufWriter {
public:
    // Metadata, written in the order set. Keys are non-empty, unique (a duplicate throws
    // std::invalid_argument naming the key) and at most 65535 bytes (the spec's limit).
    void set_u32(const std::string& key, uint32_t v);
    void set_i32(const std::string& key, int32_t v);
    void set_f32(const std::string& key, float v);
    void set_bool(const std::string& key, bool v);
    void set_string(const std::string& key, const std::string& v);
    void set_strings(const std::string& key, const std::vector<std::string>& v);
    void set_i32s(const std::string& key, const std::vector<int32_t>& v);

    // A tensor of `shape` in PyTorch order (outermost first; row-major `data`, product(shape)
    // floats), written as ggml's ne = reversed shape, in `type` (F16: converted with
    // float_to_half, autograd/half.h). `data` is borrowed until write(); with `fill` instead, the writer calls
    // fill(buf) for a scratch buffer of product(shape) floats just before writing the tensor
    // (a transpose or concatenation costs one tensor of memory, not a model copy).
    // Throws std::invalid_argument naming the tensor for a duplicate, empty or over 64-byte
    // name (GGML_MAX_NAME), more
    // than 4 dimensions (GGML_MAX_DIMS), a dimension < 1, or no data.
    void add_tensor(const std::string& name, std::vector<int64_t> shape, GgmlType type, const float* data);
    void add_tensor(const std::string& name, std::vector<int64_t> shape, GgmlType type,
                    std::function<void(float*)> fill);

    // Writes the file atomically (temp file + fsync + rename, nn/atomic_file.h), tensors in
    // the order added, aligned to general.alignment when set (a power of two), else 32.
    // Throws std::runtime_error naming the path when it cannot be written; the target is
    // then left as it was.
    void write(const std::string& path) const;

private:
    struct Tensor {
        std::string name;
        std::vector<int64_t> shape;
        GgmlType type;
        const float* data;
        std::function<void(float*)> fill;
    };
    void begin_key(const std::string& key, uint32_t type);
    void add(const std::string& name, std::vector<int64_t> shape, GgmlType type, const float* data,
             std::function<void(float*)> fill);
    std::string kv_;  // the serialized key/value pairs
    std::vector<std::string> keys_;
    uint64_t n_kv_ = 0;
    uint32_t alignment_ = 32;
    std::vector<Tensor> tensors_;
};

// The tokenizer section of a GGUF model (llama.cpp's llama-vocab.cpp reads it):
//   tokenizer.ggml.model "gpt2" (byte-level BPE), tokenizer.ggml.pre (pre-tokenizer: "gpt-2"),
//   tokenizer.ggml.tokens (each token spelled as in vocab.json, i.e. in GPT-2's byte symbols),
//   tokenizer.ggml.token_type (llama_token_type: 1 normal, 3 control, 5 unused),
//   tokenizer.ggml.merges ("left right" by rank, as merges.txt),
//   tokenizer.ggml.bos_token_id / eos_token_id (u32).
// An empty `tokens` writes tokenizer.ggml.model "no_vocab" (llama.cpp then takes the size from
// gpt2.vocab_size and cannot tokenize text, only run token ids).
struct GgufVocab {
    std::string model = "gpt2";
    std::string pre = "gpt-2";
    std::vector<std::string> tokens;
    std::vector<int32_t> token_type;  // one per token
    std::vector<std::string> merges;
    std::optional<int32_t> bos, eos;
};

// llama_token_type values (llama.h).
inline constexpr int32_t kGgufTokenNormal = 1, kGgufTokenControl = 3, kGgufTokenUnused = 5;

struct GgufGpt2Options {
    GgmlType type = GgmlType::F32;  // F16: the 2-D weights in F16, norms and biases in F32
    std::string name = "peftlab-gpt2";  // general.name
};

// Writes `model` to `path` as a llama.cpp "gpt2" GGUF (layout above), atomically. A vocabulary
// with fewer tokens than the model's rows is padded with "[PAD<id>]" tokens of type unused (as
// convert_hf_to_gguf.py pads). Throws std::invalid_argument for what llama.cpp's gpt2 graph
// cannot run: an activation other than "gelu_new" (llama.cpp's GELU is the tanh form), more
// tokens than the model's vocab, token_type and tokens of different lengths, a bos/eos outside
// the vocab; std::runtime_error naming the path when it cannot be written.
void save_gguf_gpt2(const GPT& model, const std::string& path, const GgufVocab& vocab,
                    const GgufGpt2Options& opts = {});

// The gpt2 GGUF tensor holding our Linear `linear` (a path inside a block) of layer `layer`:
// "attn.q_proj", "attn.k_proj", "attn.v_proj" -> "blk.<layer>.attn_qkv.weight", "attn.o_proj" ->
// attn_output, "mlp.fc" -> ffn_up, "mlp.proj" -> ffn_down. Throws std::invalid_argument for
// another path.
std::string gguf_gpt2_linear_name(int layer, const std::string& linear);

// A LoRA adapter in llama.cpp's form (src/llama-adapter.cpp; convert_lora_to_gguf.py): per
// adapted base tensor, W x + scale * B (A x), with A and B in PyTorch order (PEFT's
// lora_A.weight [r, in] and lora_B.weight [out, r]).
struct GgufLoraPair {
    std::string base_tensor;  // the model tensor it adapts: "blk.3.attn_qkv.weight"
    Tensor A;                 // [r, in]
    Tensor B;                 // [out, r]
    float scale;              // alpha / r of the method's own convention
};
struct GgufLora {
    std::vector<GgufLoraPair> pairs;
};

// Writes `lora` for a gpt2 base of config `base` (general.type "adapter", adapter.type "lora",
// general.architecture "gpt2", tensors "<base_tensor>.lora_a" {in, r} and ".lora_b" {r, out} in
// F32), atomically. llama.cpp scales each pair by adapter.lora.alpha / r (r read from the pair):
// when every pair's scale * r agrees, that is the alpha written; otherwise alpha is 0 (llama.cpp
// then applies no alpha / r) and each B is written already multiplied by its scale. Throws
// std::invalid_argument naming the tensor for an empty adapter, an unknown or repeated
// base_tensor, or shapes that do not fit the base tensor or each other.
void save_gguf_lora(const std::string& path, const GPTConfig& base, const GgufLora& lora,
                    const std::string& name = "peftlab-lora");

}  // namespace peftlab
