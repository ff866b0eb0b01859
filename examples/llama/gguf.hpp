// GGUF files (versions 2 and 3, little-endian), the format of llama.cpp; layout as in the ggml
// project's docs/gguf.md:
//   "GGUF", uint32 version, uint64 tensor count, uint64 metadata count,
//   metadata: (string key, uint32 value type, value)...; a string is uint64 length + bytes, an
//             array is uint32 element type + uint64 count + elements,
//   tensor infos: (string name, uint32 n_dims, uint64 dims[n_dims], uint32 ggml type,
//                  uint64 offset into the data section)...,
//   padding to general.alignment (default 32), the data section (each offset aligned as well).
// parse_gguf reads every metadata value and tensor info and checks every tensor's bytes lie in the
// file; load_gguf maps a llama-architecture file onto a checkpoint.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "checkpoint.hpp"
#include "file_reader.hpp"
#include "tokenizer.hpp"

namespace infuse::llama {

enum class gguf_type : std::uint32_t {
  uint8,
  int8,
  uint16,
  int16,
  uint32,
  int32,
  float32,
  boolean,
  string,
  array,
  uint64,
  int64,
  float64
};

struct gguf_value {
  using array = std::vector<gguf_value>;
  // The alternative's index is the gguf_type.
  std::variant<std::uint8_t, std::int8_t, std::uint16_t, std::int16_t, std::uint32_t, std::int32_t,
               float, bool, std::string, array, std::uint64_t, std::int64_t, double>
      data;
  gguf_type element_type = gguf_type::uint8;  // of an array

  [[nodiscard]] gguf_type type() const { return static_cast<gguf_type>(data.index()); }
};

struct gguf_metadata {
  std::string key;
  gguf_value value;
  std::uint64_t offset = 0;  // of the value in the file
};

struct gguf_file {
  file_bytes file;
  std::uint32_t version = 0;
  std::uint64_t alignment = 32;
  std::uint64_t tensor_info_offset = 0;  // where the tensor infos start
  std::uint64_t data_offset = 0;         // where the data section starts
  std::vector<gguf_metadata> metadata;   // in file order
  std::vector<tensor> tensors;           // in file order; bytes checked to lie in the file

  [[nodiscard]] const gguf_metadata* find(std::string_view key) const {
    const auto found = metadata_index_.find(std::string(key));
    return found == metadata_index_.end() ? nullptr : &metadata[found->second];
  }
  [[nodiscard]] const tensor* find_tensor(std::string_view name) const {
    const auto found = tensor_index_.find(std::string(name));
    return found == tensor_index_.end() ? nullptr : &tensors[found->second];
  }

 private:
  friend gguf_file parse_gguf(file_bytes file);
  std::unordered_map<std::string, std::size_t> metadata_index_;
  std::unordered_map<std::string, std::size_t> tensor_index_;
};

namespace detail {

inline constexpr int gguf_max_dims = 4;         // GGML_MAX_DIMS
inline constexpr int gguf_max_array_depth = 8;  // arrays of arrays: bounds the recursion

// The fewest bytes a value of `type` takes, which bounds element counts by the bytes left.
inline std::uint64_t gguf_min_bytes(gguf_type type) {
  constexpr std::uint64_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 8, 12, 8, 8, 8};
  return sizes[static_cast<std::uint32_t>(type)];
}

inline gguf_type read_gguf_type(byte_reader& in, std::string_view what) {
  const std::uint64_t at = in.offset();
  const auto id = in.read<std::uint32_t>(what);
  if (id > static_cast<std::uint32_t>(gguf_type::float64)) {
    in.fail(at, std::string(what) + " (0..12)", std::to_string(id));
  }
  return static_cast<gguf_type>(id);
}

// `what` names the value in errors; it is not extended per element or field, as building names
// for every token of a vocabulary would cost more than the parse.
inline std::string read_gguf_string(byte_reader& in, std::string_view what) {
  const auto length = in.read<std::uint64_t>(what);
  return in.read_string(length, what);
}

inline gguf_value read_gguf_value(byte_reader& in, gguf_type type, int depth,
                                  const std::string& what);

// Reads the value of the variant alternative `Index` (the gguf_type of the same number).
template <std::size_t Index>
void read_gguf_alternative(byte_reader& in, gguf_value& value, int depth, const std::string& what) {
  using T = std::variant_alternative_t<Index, decltype(gguf_value::data)>;
  if constexpr (std::is_same_v<T, std::string>) {
    value.data.emplace<Index>(read_gguf_string(in, what));
  } else if constexpr (std::is_same_v<T, gguf_value::array>) {
    if (depth >= gguf_max_array_depth) {
      in.fail(in.offset(),
              what + " nested at most " + std::to_string(gguf_max_array_depth) + " arrays deep");
    }
    value.element_type = read_gguf_type(in, what + " element type");
    const std::uint64_t at = in.offset();
    const auto count = in.read<std::uint64_t>(what + " element count");
    in.require_fits(at, count, gguf_min_bytes(value.element_type), what + " element count");
    auto& elements = value.data.emplace<Index>();
    elements.reserve(count);
    for (std::uint64_t i = 0; i < count; ++i) {
      elements.push_back(read_gguf_value(in, value.element_type, depth + 1, what));
    }
  } else if constexpr (std::is_same_v<T, bool>) {
    const std::uint64_t at = in.offset();
    const auto byte = in.read<std::uint8_t>(what);
    if (byte > 1) in.fail(at, what + ", a bool (0 or 1)", std::to_string(byte));
    value.data.emplace<Index>(byte == 1);
  } else {
    value.data.emplace<Index>(in.read<T>(what));
  }
}

// Reads the alternative whose index is `type`, one branch per alternative.
template <std::size_t... Index>
void read_gguf_alternatives(byte_reader& in, gguf_type type, gguf_value& value, int depth,
                            const std::string& what, std::index_sequence<Index...>) {
  const auto index = static_cast<std::size_t>(type);
  ((index == Index ? read_gguf_alternative<Index>(in, value, depth, what) : void()), ...);
}

inline gguf_value read_gguf_value(byte_reader& in, gguf_type type, int depth,
                                  const std::string& what) {
  gguf_value value;
  read_gguf_alternatives(in, type, value, depth, what,
                         std::make_index_sequence<std::variant_size_v<decltype(value.data)>>());
  return value;
}

inline std::uint64_t align_up(const byte_reader& in, std::uint64_t offset,
                              std::uint64_t alignment) {
  std::uint64_t padded = 0;
  if (!checked_add(offset, alignment - 1, padded)) in.fail(offset, "an offset below 2^64");
  return padded / alignment * alignment;
}

}  // namespace detail

inline gguf_file parse_gguf(file_bytes file) {
  byte_reader in(file);
  gguf_file result;
  result.file = std::move(file);

  const auto magic = in.read_string(4, "the magic \"GGUF\"");
  if (magic != "GGUF") in.fail(0, "the magic \"GGUF\"", "\"" + magic + "\"");
  result.version = in.read<std::uint32_t>("the GGUF version");
  if (result.version != 2 && result.version != 3) {
    in.fail(4, "GGUF version 2 or 3 (little-endian)", std::to_string(result.version));
  }
  const std::uint64_t tensor_count_at = in.offset();
  const auto tensor_count = in.read<std::uint64_t>("the tensor count");
  const std::uint64_t metadata_count_at = in.offset();
  const auto metadata_count = in.read<std::uint64_t>("the metadata count");

  // Each entry holds at least a key length, a value type and one byte of value.
  in.require_fits(metadata_count_at, metadata_count, 8 + 4 + 1, "a metadata count");
  result.metadata.reserve(metadata_count);
  for (std::uint64_t i = 0; i < metadata_count; ++i) {
    const std::uint64_t key_at = in.offset();
    auto key = detail::read_gguf_string(in, "metadata key " + std::to_string(i));
    if (result.metadata_index_.contains(key)) in.fail(key_at, "a new metadata key", key);
    const auto type = detail::read_gguf_type(in, "the value type of " + key);
    const std::uint64_t value_at = in.offset();
    auto value = detail::read_gguf_value(in, type, 0, "the value of " + key);
    result.metadata_index_.emplace(key, result.metadata.size());
    result.metadata.push_back({std::move(key), std::move(value), value_at});
  }

  if (const auto* alignment = result.find("general.alignment")) {
    const auto* value = std::get_if<std::uint32_t>(&alignment->value.data);
    if (value == nullptr || *value == 0 || (*value & (*value - 1)) != 0) {
      in.fail(alignment->offset, "general.alignment, a uint32 power of two");
    }
    result.alignment = *value;
  }

  // Each tensor info holds at least a name length, n_dims, a type and an offset.
  result.tensor_info_offset = in.offset();
  in.require_fits(tensor_count_at, tensor_count, 8 + 4 + 4 + 8, "a tensor count");
  result.tensors.reserve(tensor_count);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> data_ranges;  // (offset, bytes) per tensor
  for (std::uint64_t i = 0; i < tensor_count; ++i) {
    tensor info;
    info.source_offset = in.offset();
    info.name = detail::read_gguf_string(in, "tensor name " + std::to_string(i));
    if (result.tensor_index_.contains(info.name)) {
      in.fail(info.source_offset, "a new tensor name", info.name);
    }
    const std::uint64_t dims_at = in.offset();
    const auto n_dims = in.read<std::uint32_t>("n_dims of tensor " + info.name);
    if (n_dims < 1 || n_dims > detail::gguf_max_dims) {
      in.fail(dims_at, "n_dims of tensor " + info.name + " in 1..4", std::to_string(n_dims));
    }
    for (std::uint32_t d = 0; d < n_dims; ++d) {
      const std::uint64_t dim_at = in.offset();
      const auto dim = in.read<std::uint64_t>("a dim of tensor " + info.name);
      if (dim == 0 || dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        in.fail(dim_at, "a dim of tensor " + info.name + " in 1..2^63-1", std::to_string(dim));
      }
      info.dims.push_back(dim);
    }
    const std::uint64_t type_at = in.offset();
    const auto type_id = in.read<std::uint32_t>("the type of tensor " + info.name);
    // Sized here, so that the data range check below covers every tensor, used or not.
    const std::uint64_t bytes = checked_tensor_bytes(in, type_at, info.name, type_id, info.dims);
    info.type = static_cast<ggml_type>(type_id);
    const std::uint64_t offset_at = in.offset();
    const auto offset = in.read<std::uint64_t>("the data offset of tensor " + info.name);
    if (offset % result.alignment != 0) {
      in.fail(offset_at,
              "a data offset of tensor " + info.name + " that is a multiple of " +
                  std::to_string(result.alignment),
              std::to_string(offset));
    }
    data_ranges.emplace_back(offset, bytes);  // placed once the data section is known
    result.tensor_index_.emplace(info.name, result.tensors.size());
    result.tensors.push_back(std::move(info));
  }

  result.data_offset = detail::align_up(in, in.offset(), result.alignment);
  for (std::size_t i = 0; i < result.tensors.size(); ++i) {
    auto& info = result.tensors[i];
    std::uint64_t begin = 0;
    const auto [offset, bytes] = data_ranges[i];
    if (!checked_add(result.data_offset, offset, begin)) {
      in.fail(info.source_offset, "a data offset of tensor " + info.name + " below 2^64");
    }
    info.bytes = in.range(begin, bytes, "the data of tensor " + info.name);
  }
  return result;
}

inline gguf_file read_gguf(const std::filesystem::path& path) {
  return parse_gguf(read_file(path));
}

namespace detail {

// Typed metadata lookups that name the file, the offset and the key on failure.
class gguf_metadata_reader {
 public:
  explicit gguf_metadata_reader(const gguf_file& file) : file_(file), in_(file.file) {}

  [[nodiscard]] const byte_reader& reader() const { return in_; }

  const gguf_metadata& required(std::string_view key) const {
    const auto* entry = file_.find(key);
    if (entry == nullptr) in_.fail(24, "a metadata key " + std::string(key));  // after the header
    return *entry;
  }

  // An integer value in [low, high]; `fallback` when absent and not required.
  std::int64_t integer(std::string_view key, std::int64_t low, std::int64_t high,
                       const std::int64_t* fallback = nullptr) const {
    const auto* entry = fallback != nullptr ? file_.find(key) : &required(key);
    if (entry == nullptr) return *fallback;
    std::int64_t result = 0;
    const bool is_integer = std::visit(
        [&](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
            if (std::is_unsigned_v<T> &&
                static_cast<std::uint64_t>(v) >
                    static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
              return false;
            }
            result = static_cast<std::int64_t>(v);
            return true;
          }
          return false;
        },
        entry->value.data);
    if (!is_integer || result < low || result > high) {
      in_.fail(entry->offset, std::string(key) + ", an integer in " + std::to_string(low) + ".." +
                                  std::to_string(high));
    }
    return result;
  }

  float real(std::string_view key, float fallback) const {
    const auto* entry = file_.find(key);
    if (entry == nullptr) return fallback;
    if (const auto* value = std::get_if<float>(&entry->value.data)) return *value;
    if (const auto* value = std::get_if<double>(&entry->value.data)) {
      return static_cast<float>(*value);
    }
    in_.fail(entry->offset, std::string(key) + ", a float32 or float64");
  }

  std::string string(std::string_view key, std::string_view fallback) const {
    const auto* entry = file_.find(key);
    if (entry == nullptr) return std::string(fallback);
    const auto* value = std::get_if<std::string>(&entry->value.data);
    if (value == nullptr) in_.fail(entry->offset, std::string(key) + ", a string");
    return *value;
  }

  // The elements of an array of `element_type` holding `count` elements (any count when -1);
  // nullptr when absent.
  const gguf_value::array* array(std::string_view key, gguf_type element_type,
                                 std::int64_t count) const {
    const auto* entry = file_.find(key);
    if (entry == nullptr) return nullptr;
    const auto* value = std::get_if<gguf_value::array>(&entry->value.data);
    if (value == nullptr || entry->value.element_type != element_type ||
        (count >= 0 && value->size() != static_cast<std::uint64_t>(count))) {
      in_.fail(entry->offset,
               std::string(key) + ", an array of GGUF type " +
                   std::to_string(static_cast<std::uint32_t>(element_type)) +
                   (count >= 0 ? " with " + std::to_string(count) + " elements" : ""));
    }
    return value;
  }

 private:
  const gguf_file& file_;
  byte_reader in_;
};

inline vocabulary read_gguf_vocabulary(const gguf_metadata_reader& meta) {
  vocabulary vocab;
  const auto* tokens = meta.array("tokenizer.ggml.tokens", gguf_type::string, -1);
  if (tokens == nullptr) return vocab;
  const auto count = static_cast<std::int64_t>(tokens->size());
  if (count > std::numeric_limits<int>::max()) {
    meta.reader().fail(meta.required("tokenizer.ggml.tokens").offset, "at most 2^31-1 tokens");
  }
  vocab.model = meta.string("tokenizer.ggml.model", "llama");
  for (const auto& token : *tokens) vocab.pieces.push_back(std::get<std::string>(token.data));
  vocab.scores.assign(tokens->size(), 0.0f);
  if (const auto* scores = meta.array("tokenizer.ggml.scores", gguf_type::float32, count)) {
    for (std::size_t i = 0; i < scores->size(); ++i) {
      vocab.scores[i] = std::get<float>((*scores)[i].data);
    }
  }
  if (const auto* kinds = meta.array("tokenizer.ggml.token_type", gguf_type::int32, count)) {
    for (const auto& kind : *kinds) {
      vocab.kinds.push_back(static_cast<token_kind>(std::get<std::int32_t>(kind.data)));
    }
  }
  const std::int64_t default_bos = 1;
  const std::int64_t default_eos = 2;
  vocab.bos =
      static_cast<int>(meta.integer("tokenizer.ggml.bos_token_id", 0, count - 1, &default_bos));
  vocab.eos =
      static_cast<int>(meta.integer("tokenizer.ggml.eos_token_id", 0, count - 1, &default_eos));
  return vocab;
}

}  // namespace detail

// A llama-architecture GGUF file as a checkpoint; Q/K rows as stored (rope_pairing::interleaved).
inline checkpoint load_gguf(file_bytes file) {
  const gguf_file gguf = parse_gguf(std::move(file));
  const detail::gguf_metadata_reader meta(gguf);
  const auto& in = meta.reader();

  const auto& architecture = meta.required("general.architecture");
  if (meta.string("general.architecture", "") != "llama") {
    in.fail(architecture.offset, "general.architecture \"llama\"");
  }
  constexpr std::int64_t int_max = std::numeric_limits<int>::max();
  checkpoint model;
  auto& c = model.config;
  c.dim = static_cast<int>(meta.integer("llama.embedding_length", 1, int_max));
  c.hidden_dim = static_cast<int>(meta.integer("llama.feed_forward_length", 1, int_max));
  c.n_layers = static_cast<int>(meta.integer("llama.block_count", 1, int_max));
  c.n_heads = static_cast<int>(meta.integer("llama.attention.head_count", 1, int_max));
  const std::int64_t heads = c.n_heads;
  c.n_kv_heads =
      static_cast<int>(meta.integer("llama.attention.head_count_kv", 1, int_max, &heads));
  c.context_length = static_cast<int>(meta.integer("llama.context_length", 1, int_max));
  c.rope_base = meta.real("llama.rope.freq_base", 10000.0f);
  c.rms_eps = meta.real("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  model.vocab = detail::read_gguf_vocabulary(meta);

  auto find = [&](const std::string& name) -> const tensor* { return gguf.find_tensor(name); };
  auto get = [&](const std::string& name) -> const tensor& {
    const tensor* found = find(name);
    if (found == nullptr) in.fail(gguf.tensor_info_offset, "a tensor named " + name);
    return *found;
  };
  const tensor& embedding = get("token_embd.weight");
  if (embedding.dims.size() != 2 || embedding.dims[1] > static_cast<std::uint64_t>(int_max)) {
    in.fail(embedding.source_offset, "token_embd.weight with dims [dim, vocab size < 2^31]");
  }
  c.vocab_size = static_cast<int>(embedding.dims[1]);
  if (!model.vocab.pieces.empty() && model.vocab.size() != c.vocab_size) {
    in.fail(meta.required("tokenizer.ggml.tokens").offset,
            "as many tokens as token_embd.weight has rows, " + std::to_string(c.vocab_size),
            std::to_string(model.vocab.size()));
  }
  validate_config(in, meta.required("llama.attention.head_count").offset, c);  // heads, mostly
  const std::int64_t head_dim = c.head_dim();
  meta.integer("llama.rope.dimension_count", head_dim, head_dim, &head_dim);  // no partial RoPE

  const std::uint64_t dim = c.dim, hidden = c.hidden_dim, kv_dim = c.kv_dim(), vocab = c.vocab_size;
  auto bind = [&](const std::string& name, std::initializer_list<std::uint64_t> dims) {
    const tensor& t = get(name);
    require_tensor(in, t, dims);
    return t;
  };
  model.token_embedding = bind("token_embd.weight", {dim, vocab});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string prefix = "blk." + std::to_string(l) + ".";
    model.layers.push_back({
        .attn_norm = bind(prefix + "attn_norm.weight", {dim}),
        .wq = bind(prefix + "attn_q.weight", {dim, dim}),
        .wk = bind(prefix + "attn_k.weight", {dim, kv_dim}),
        .wv = bind(prefix + "attn_v.weight", {dim, kv_dim}),
        .wo = bind(prefix + "attn_output.weight", {dim, dim}),
        .ffn_norm = bind(prefix + "ffn_norm.weight", {dim}),
        .w_gate = bind(prefix + "ffn_gate.weight", {dim, hidden}),
        .w_up = bind(prefix + "ffn_up.weight", {dim, hidden}),
        .w_down = bind(prefix + "ffn_down.weight", {hidden, dim}),
    });
  }
  model.output_norm = bind("output_norm.weight", {dim});
  model.tied_output = find("output.weight") == nullptr;
  model.output = model.tied_output ? model.token_embedding : bind("output.weight", {dim, vocab});
  model.file = gguf.file;
  return model;
}

inline checkpoint load_gguf(const std::filesystem::path& path) {
  return load_gguf(read_file(path));
}

}  // namespace infuse::llama
