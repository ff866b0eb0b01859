// What both checkpoint loaders (gguf.hpp, llama2c.hpp) produce: a Llama model's configuration and
// its tensors as (type, dims, bytes) spans into the file, with dequantization to float and the
// reordering of Q/K rows between the two RoPE pairings.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "file_reader.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "tokenizer.hpp"

namespace infuse::llama {

// ggml's tensor type ids, as GGUF stores them (ggml.h's enum ggml_type).
enum class ggml_type : std::uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8 };

struct ggml_type_info {
  std::string_view name;       // empty: no such type id
  std::uint32_t block_values;  // values per block (1 for plain floats and integers)
  std::uint32_t block_bytes;   // bytes per block
};

// Every type id ggml has defined, so that a file holding any of them parses and a tensor of an
// unsupported one is reported by name. Ids 4, 5 and 31..33 were removed from ggml.
inline constexpr std::array<ggml_type_info, 36> ggml_types = {{
    {"F32", 1, 4},        {"F16", 1, 2},       {"Q4_0", 32, 18},     {"Q4_1", 32, 20},
    {"", 0, 0},           {"", 0, 0},          {"Q5_0", 32, 22},     {"Q5_1", 32, 24},
    {"Q8_0", 32, 34},     {"Q8_1", 32, 36},    {"Q2_K", 256, 84},    {"Q3_K", 256, 110},
    {"Q4_K", 256, 144},   {"Q5_K", 256, 176},  {"Q6_K", 256, 210},   {"Q8_K", 256, 292},
    {"IQ2_XXS", 256, 66}, {"IQ2_XS", 256, 74}, {"IQ3_XXS", 256, 98}, {"IQ1_S", 256, 50},
    {"IQ4_NL", 32, 18},   {"IQ3_S", 256, 110}, {"IQ2_S", 256, 82},   {"IQ4_XS", 256, 136},
    {"I8", 1, 1},         {"I16", 1, 2},       {"I32", 1, 4},        {"I64", 1, 8},
    {"F64", 1, 8},        {"IQ1_M", 256, 56},  {"BF16", 1, 2},       {"", 0, 0},
    {"", 0, 0},           {"", 0, 0},          {"TQ1_0", 256, 54},   {"TQ2_0", 256, 66},
}};

// The info of a type id, or nullptr for an id ggml does not define.
inline const ggml_type_info* find_ggml_type(std::uint32_t id) {
  return id < ggml_types.size() && !ggml_types[id].name.empty() ? &ggml_types[id] : nullptr;
}

inline std::string_view type_name(ggml_type type) {
  const auto* info = find_ggml_type(static_cast<std::uint32_t>(type));
  return info != nullptr ? info->name : "unknown";
}

// The types that to_float decodes and the runner accepts.
inline bool is_supported(ggml_type type) {
  return type == ggml_type::f32 || type == ggml_type::f16 || type == ggml_type::q8_0 ||
         type == ggml_type::q4_0;
}
inline constexpr std::string_view supported_types = "F32, F16, Q8_0 or Q4_0";

struct tensor {
  std::string name;
  ggml_type type = ggml_type::f32;
  std::vector<std::uint64_t> dims;  // ggml order: dims[0] is the contiguous row length
  std::span<const std::byte> bytes;
  std::uint64_t source_offset = 0;  // where the file describes it: GGUF tensor info, llama2.c data

  [[nodiscard]] std::uint64_t row_length() const { return dims.empty() ? 1 : dims[0]; }
  [[nodiscard]] std::uint64_t rows() const {
    std::uint64_t rows = 1;
    for (std::size_t d = 1; d < dims.size(); ++d) rows *= dims[d];
    return rows;
  }
  [[nodiscard]] std::uint64_t elements() const { return row_length() * rows(); }
  // Bytes per row: whole blocks of its type (row_length() must be a multiple of the block).
  [[nodiscard]] std::uint64_t row_bytes() const {
    const auto& info = ggml_types[static_cast<std::uint32_t>(type) % ggml_types.size()];
    return info.block_values == 0 ? 0 : row_length() / info.block_values * info.block_bytes;
  }
};

// The bytes of a tensor of type `type_id` and `dims`, checked: a known type, rows made of whole
// blocks, no overflow. Errors name the file position `at` that describes the tensor.
inline std::uint64_t checked_tensor_bytes(const byte_reader& file, std::uint64_t at,
                                          std::string_view name, std::uint32_t type_id,
                                          std::span<const std::uint64_t> dims) {
  const auto* info = find_ggml_type(type_id);
  if (info == nullptr) {
    file.fail(at, "a known ggml type id for tensor " + std::string(name), std::to_string(type_id));
  }
  const std::uint64_t row = dims.empty() ? 1 : dims[0];
  if (row % info->block_values != 0) {
    file.fail(at,
              "a row length of tensor " + std::string(name) + " that is a multiple of " +
                  std::to_string(info->block_values) + " (" + std::string(info->name) + ")",
              std::to_string(row));
  }
  std::uint64_t bytes = row / info->block_values * info->block_bytes;
  for (std::size_t d = 1; d < dims.size(); ++d) {
    if (!checked_multiply(bytes, dims[d], bytes)) {
      file.fail(at, "dims of tensor " + std::string(name) + " whose size fits in 64 bits");
    }
  }
  return bytes;
}

namespace detail {

inline float half_at(const std::byte* source) {
  std::uint16_t bits;
  std::memcpy(&bits, source, sizeof(bits));
  return static_cast<float>(half::from_bits(bits));
}

// Decodes `count` values (whole blocks) of `type` from `source` into `out`.
inline void dequantize(ggml_type type, const std::byte* source, std::uint64_t count, float* out) {
  switch (type) {
    case ggml_type::f32:
      std::memcpy(out, source, count * sizeof(float));
      return;
    case ggml_type::f16:
      for (std::uint64_t i = 0; i < count; ++i) out[i] = half_at(source + 2 * i);
      return;
    case ggml_type::q8_0:  // block: fp16 scale d, then 32 int8 q; w = d * q
      for (std::uint64_t block = 0; block < count / 32; ++block, source += 34, out += 32) {
        const float scale = half_at(source);
        for (int i = 0; i < 32; ++i) {
          out[i] = scale * static_cast<float>(static_cast<std::int8_t>(source[2 + i]));
        }
      }
      return;
    case ggml_type::q4_0:
      // Block: fp16 scale d, then 16 bytes; byte j holds value j in its low nibble and value
      // j + 16 in its high nibble; w = d * (q - 8). This is infuse's int4 block layout with a
      // symmetric zero point of 8 and one scale per 32 values.
      for (std::uint64_t block = 0; block < count / 32; ++block, source += 18, out += 32) {
        const float scale = half_at(source);
        for (int j = 0; j < 16; ++j) {
          const auto packed = static_cast<unsigned>(source[2 + j]);
          out[j] = scale * static_cast<float>(static_cast<int>(packed & 0xFu) - 8);
          out[j + 16] = scale * static_cast<float>(static_cast<int>(packed >> 4) - 8);
        }
      }
      return;
  }
  throw error("infuse::llama::to_float", "tensor.type", std::string(type_name(type)),
              std::string(supported_types));
}

inline void require_decodable(const tensor& t, std::string_view call) {
  require(is_supported(t.type), call, "tensor " + t.name + " type", type_name(t.type),
          supported_types);
  const auto& info = ggml_types[static_cast<std::uint32_t>(t.type)];
  require(t.row_length() % info.block_values == 0 && t.bytes.size() == t.row_bytes() * t.rows(),
          call, "tensor " + t.name + " bytes", t.bytes.size(), "the size of its dims in its type");
}

}  // namespace detail

// Row `row` of `t` as floats into `out` (row_length() values).
inline void to_float_row(const tensor& t, std::uint64_t row, std::span<float> out) {
  detail::require_decodable(t, "infuse::llama::to_float_row");
  require(row < t.rows(), "infuse::llama::to_float_row", "row", row,
          "below the row count " + std::to_string(t.rows()));
  require(out.size() == t.row_length(), "infuse::llama::to_float_row", "out.size()", out.size(),
          "the row length " + std::to_string(t.row_length()));
  detail::dequantize(t.type, t.bytes.data() + row * t.row_bytes(), t.row_length(), out.data());
}

// The whole tensor as floats, row after row.
inline std::vector<float> to_float(const tensor& t) {
  detail::require_decodable(t, "infuse::llama::to_float");
  std::vector<float> values(t.elements());
  for (std::uint64_t row = 0; row < t.rows(); ++row) {
    detail::dequantize(t.type, t.bytes.data() + row * t.row_bytes(), t.row_length(),
                       values.data() + row * t.row_length());
  }
  return values;
}

// How RoPE pairs the dimensions of one head: llama2.c and GGUF store Q/K weights for
// `interleaved` pairs (2m, 2m+1), as Meta's original checkpoints do (llama.cpp's convert script
// permutes Hugging Face's q/k rows back to that order); Hugging Face and the runner use
// `rotate_half` pairs (m, m + head_dim/2). Pair m rotates by the same angle in both.
enum class rope_pairing { interleaved, rotate_half };

// For each row r of one head in the `to` order, the row of the `from` order it comes from.
inline std::vector<std::uint64_t> rope_row_order(std::uint64_t head_dim, rope_pairing from,
                                                 rope_pairing to) {
  require(head_dim > 0 && head_dim % 2 == 0, "infuse::llama::rope_row_order", "head_dim", head_dim,
          "a positive even number");
  const std::uint64_t half_dim = head_dim / 2;
  std::vector<std::uint64_t> order(head_dim);
  for (std::uint64_t r = 0; r < head_dim; ++r) {
    // Row r is component `part` (0 or 1) of pair `pair` in the `to` order.
    const std::uint64_t pair = to == rope_pairing::interleaved ? r / 2 : r % half_dim;
    const std::uint64_t part = to == rope_pairing::interleaved ? r % 2 : r / half_dim;
    order[r] = from == rope_pairing::interleaved ? 2 * pair + part : part * half_dim + pair;
  }
  return order;
}

// The bytes of a Q or K weight (rows = heads * head_dim outputs) with the rows of every head
// reordered from one pairing to the other. Rows are whole blocks, so this works for every type.
inline std::vector<std::byte> reorder_rope_rows(const tensor& weight, std::uint64_t heads,
                                                rope_pairing from, rope_pairing to) {
  const std::uint64_t rows = weight.rows();
  require(heads > 0 && rows % heads == 0 && weight.bytes.size() == rows * weight.row_bytes(),
          "infuse::llama::reorder_rope_rows", "heads", heads,
          "a divisor of the row count " + std::to_string(rows) + " of " + weight.name);
  const std::uint64_t head_dim = rows / heads;
  const std::uint64_t row_bytes = weight.row_bytes();
  const auto order = rope_row_order(head_dim, from, to);
  std::vector<std::byte> reordered(weight.bytes.size());
  for (std::uint64_t head = 0; head < heads; ++head) {
    for (std::uint64_t r = 0; r < head_dim; ++r) {
      std::memcpy(reordered.data() + (head * head_dim + r) * row_bytes,
                  weight.bytes.data() + (head * head_dim + order[r]) * row_bytes, row_bytes);
    }
  }
  return reordered;
}

struct model_config {
  int dim = 0;         // embedding width
  int hidden_dim = 0;  // feed-forward width
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int vocab_size = 0;
  int context_length = 0;  // the longest sequence the model was trained for
  float rope_base = 10000.0f;
  float rms_eps = 1e-5f;

  [[nodiscard]] int head_dim() const { return dim / n_heads; }
  [[nodiscard]] int kv_dim() const { return head_dim() * n_kv_heads; }
};

// Checks a configuration read from `file` (described at byte `at`).
inline void validate_config(const byte_reader& file, std::uint64_t at, const model_config& c) {
  const std::pair<std::string_view, int> positive[] = {{"dim", c.dim},
                                                       {"hidden_dim", c.hidden_dim},
                                                       {"n_layers", c.n_layers},
                                                       {"n_heads", c.n_heads},
                                                       {"n_kv_heads", c.n_kv_heads},
                                                       {"vocab_size", c.vocab_size},
                                                       {"context_length", c.context_length}};
  for (const auto& [name, value] : positive) {
    if (value <= 0) file.fail(at, "a positive " + std::string(name), std::to_string(value));
  }
  if (c.dim % c.n_heads != 0) {
    file.fail(at, "dim a multiple of n_heads " + std::to_string(c.n_heads), std::to_string(c.dim));
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    file.fail(at, "n_heads a multiple of n_kv_heads " + std::to_string(c.n_kv_heads),
              std::to_string(c.n_heads));
  }
  if (c.head_dim() % 2 != 0) {
    file.fail(at, "an even head dim (dim / n_heads) for RoPE", std::to_string(c.head_dim()));
  }
  if (!(c.rope_base > 1.0f) || !(c.rms_eps > 0.0f)) {
    file.fail(at, "rope_base > 1 and rms_eps > 0",
              std::to_string(c.rope_base) + " and " + std::to_string(c.rms_eps));
  }
}

// Checks that a tensor the model uses has the expected dims (ggml order) and a supported type.
inline void require_tensor(const byte_reader& file, const tensor& t,
                           std::initializer_list<std::uint64_t> dims) {
  auto show = [](std::span<const std::uint64_t> values) {
    std::string text = "[";
    for (std::size_t i = 0; i < values.size(); ++i) {
      text.append(i == 0 ? "" : ", ").append(std::to_string(values[i]));
    }
    return text + "]";
  };
  if (!std::equal(t.dims.begin(), t.dims.end(), dims.begin(), dims.end())) {
    file.fail(t.source_offset, "tensor " + t.name + " with dims " + show(dims), show(t.dims));
  }
  if (!is_supported(t.type)) {
    file.fail(t.source_offset, "tensor " + t.name + " of type " + std::string(supported_types),
              std::string(type_name(t.type)));
  }
}

struct layer_weights {
  tensor attn_norm;  // [dim]
  tensor wq;         // [dim, n_heads * head_dim]   (ggml order: input length first)
  tensor wk;         // [dim, n_kv_heads * head_dim]
  tensor wv;         // [dim, n_kv_heads * head_dim]
  tensor wo;         // [dim, dim]
  tensor ffn_norm;   // [dim]
  tensor w_gate;     // [dim, hidden_dim]   llama2.c's w1
  tensor w_up;       // [dim, hidden_dim]   llama2.c's w3
  tensor w_down;     // [hidden_dim, dim]   llama2.c's w2
};

struct checkpoint {
  file_bytes file;  // owns the bytes that the tensors view
  model_config config;
  tensor token_embedding;  // [dim, vocab_size]
  std::vector<layer_weights> layers;
  tensor output_norm;  // [dim]
  tensor output;       // [dim, vocab_size]; the embedding itself when tied_output
  bool tied_output = false;
  rope_pairing pairing = rope_pairing::interleaved;  // how wq and wk rows are ordered
  vocabulary vocab;  // empty when the file has none (llama2.c without tokenizer.bin)
  std::vector<std::shared_ptr<const std::vector<std::byte>>> reordered;  // owns reordered wq/wk
};

// Reorders wq and wk of every layer to `pairing` (the runner uses rope_pairing::rotate_half).
inline void use_rope_pairing(checkpoint& model, rope_pairing pairing) {
  if (model.pairing == pairing) return;
  for (auto& layer : model.layers) {
    for (auto* weight : {&layer.wq, &layer.wk}) {
      const std::uint64_t heads =
          weight == &layer.wq ? model.config.n_heads : model.config.n_kv_heads;
      auto bytes = std::make_shared<const std::vector<std::byte>>(
          reorder_rope_rows(*weight, heads, model.pairing, pairing));
      weight->bytes = std::span<const std::byte>(*bytes);
      model.reordered.push_back(std::move(bytes));
    }
  }
  model.pairing = pairing;
}

}  // namespace infuse::llama
