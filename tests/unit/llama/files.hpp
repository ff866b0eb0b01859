// Writers of tiny GGUF (v3), llama2.c and tokenizer.bin files for the loader tests, with random
// contents, plus an independent float64 decoder of the ggml block formats to check against.
// Each writer records where it put each field so that tests can corrupt exactly that field.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "infuse/core/float_types.hpp"
#include "llama/file_reader.hpp"
#include "llama/tokenizer.hpp"
#include "support/random.hpp"

namespace infuse::test {

class byte_writer {
 public:
  template <class T>
  std::size_t put(T value) {
    const std::size_t at = bytes.size();
    bytes.resize(at + sizeof(T));
    std::memcpy(bytes.data() + at, &value, sizeof(T));
    return at;
  }
  std::size_t put_bytes(std::string_view text) {
    const std::size_t at = bytes.size();
    for (const char c : text) bytes.push_back(static_cast<std::byte>(c));
    return at;
  }
  std::size_t put_gguf_string(std::string_view text) {
    const std::size_t at = put<std::uint64_t>(text.size());
    put_bytes(text);
    return at;
  }
  void pad_to(std::size_t alignment) {
    bytes.resize((bytes.size() + alignment - 1) / alignment * alignment);
  }
  std::vector<std::byte> bytes;
};

// The bytes as a file_bytes named `name`, as if read from disk.
inline llama::file_bytes as_file(std::string name, std::vector<std::byte> bytes) {
  return {std::move(name), std::make_shared<const std::vector<std::byte>>(std::move(bytes))};
}

template <class T>
void patch(std::vector<std::byte>& bytes, std::size_t at, T value) {
  REQUIRE(at + sizeof(T) <= bytes.size());
  std::memcpy(bytes.data() + at, &value, sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Float64 reference decoding of ggml's formats (F32, F16, Q8_0, Q4_0), written from the format
// descriptions independently of the loader.

inline double half_bits_to_double(std::uint16_t bits) {
  const double sign = (bits & 0x8000u) != 0u ? -1.0 : 1.0;
  const int exponent = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  if (exponent == 31) return mantissa == 0 ? sign * INFINITY : NAN;
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

inline std::vector<double> reference_decode(std::uint32_t type,
                                            const std::vector<std::byte>& data) {
  auto u8 = [&](std::size_t at) { return static_cast<unsigned>(data[at]); };
  auto u16 = [&](std::size_t at) { return static_cast<std::uint16_t>(u8(at) | (u8(at + 1) << 8)); };
  std::vector<double> values;
  if (type == 0) {
    for (std::size_t at = 0; at < data.size(); at += 4) {
      float value;
      std::memcpy(&value, data.data() + at, 4);
      values.push_back(value);
    }
  } else if (type == 1) {
    for (std::size_t at = 0; at < data.size(); at += 2)
      values.push_back(half_bits_to_double(u16(at)));
  } else if (type == 8) {  // Q8_0: d, then 32 int8
    for (std::size_t at = 0; at < data.size(); at += 34) {
      const double d = half_bits_to_double(u16(at));
      for (int i = 0; i < 32; ++i) values.push_back(d * static_cast<std::int8_t>(u8(at + 2 + i)));
    }
  } else if (type == 2) {  // Q4_0: d, then byte j = value j (low nibble) | value j+16 (high)
    for (std::size_t at = 0; at < data.size(); at += 18) {
      const double d = half_bits_to_double(u16(at));
      std::vector<double> block(32);
      for (int j = 0; j < 16; ++j) {
        block[j] = d * (static_cast<int>(u8(at + 2 + j) & 0xF) - 8);
        block[j + 16] = d * (static_cast<int>(u8(at + 2 + j) >> 4) - 8);
      }
      values.insert(values.end(), block.begin(), block.end());
    }
  }
  return values;
}

// Random contents of `count` values of `type` (count a multiple of 32 for the block types).
inline std::vector<std::byte> random_tensor_bytes(seeded_rng& rng, std::uint32_t type,
                                                  std::size_t count) {
  byte_writer out;
  auto random_half = [&](double stddev) {
    return half(static_cast<float>(rng.normal(0, stddev))).bits();
  };
  if (type == 0) {
    for (std::size_t i = 0; i < count; ++i) out.put(static_cast<float>(rng.normal()));
  } else if (type == 1) {
    for (std::size_t i = 0; i < count; ++i) out.put(random_half(1.0));
  } else {  // Q8_0 or Q4_0: a scale, then random quants
    for (std::size_t block = 0; block < count / 32; ++block) {
      out.put(random_half(0.05));
      for (int i = 0; i < (type == 8 ? 32 : 16); ++i)
        out.put(static_cast<std::uint8_t>(rng.bits32()));
    }
  }
  return out.bytes;
}

// ---------------------------------------------------------------------------------------------
// Vocabularies: <unk>, <s>, </s>, the 256 byte tokens, the space and some letters, and words
// with every prefix as a piece (so that BPE merges reach them), longer pieces scoring higher.

inline llama::vocabulary test_vocabulary(std::string_view space, bool with_byte_tokens = true,
                                         bool with_words = true) {
  llama::vocabulary vocab;
  auto add = [&](std::string piece, llama::token_kind kind) {
    vocab.scores.push_back(static_cast<float>(piece.size()) - 0.001f * vocab.size());
    vocab.pieces.push_back(std::move(piece));
    vocab.kinds.push_back(kind);
  };
  add("<unk>", llama::token_kind::unknown);
  add("<s>", llama::token_kind::control);
  add("</s>", llama::token_kind::control);
  if (with_byte_tokens) {
    for (int byte = 0; byte < 256; ++byte) {
      constexpr char hex[] = "0123456789ABCDEF";
      add(std::string("<0x") + hex[byte / 16] + hex[byte % 16] + ">", llama::token_kind::byte);
    }
  }
  add(std::string(space), llama::token_kind::normal);
  for (const char c : std::string_view("abcdehlnorstw."))
    add(std::string(1, c), llama::token_kind::normal);
  if (with_words) {
    for (const std::string_view word : {"the", "and", "hello", "world", "tree", "a"}) {
      std::string piece(space);
      for (const char c : word) add(piece += c, llama::token_kind::normal);
    }
    add("th", llama::token_kind::normal);
    add("ll", llama::token_kind::normal);
  }
  return vocab;
}

// ---------------------------------------------------------------------------------------------
// GGUF v3.

struct gguf_tensor_spec {
  std::string name;
  std::uint32_t type = 0;
  std::vector<std::uint64_t> dims;
  std::vector<std::byte> data;
};

class gguf_builder {
 public:
  using field_map = std::map<std::string, std::size_t>;

  void add_u32(std::string key, std::uint32_t value) { add_scalar(std::move(key), 4, value); }
  void add_f32(std::string key, float value) { add_scalar(std::move(key), 6, value); }
  void add_bool(std::string key, bool value) { add_scalar(std::move(key), 7, std::uint8_t{value}); }
  void add_string(std::string key, std::string value) {
    kvs_.push_back({std::move(key), 8, [value](byte_writer& out, field_map&, const std::string&) {
                      out.put_gguf_string(value);
                    }});
  }
  template <class T>
  void add_array(std::string key, std::uint32_t element_type, std::vector<T> values) {
    kvs_.push_back(
        {std::move(key), 9,
         [element_type, values](byte_writer& out, field_map& fields, const std::string& key) {
           out.put(element_type);
           fields["count:" + key] = out.put<std::uint64_t>(values.size());
           for (const auto& value : values) {
             if constexpr (std::is_same_v<T, std::string>) {
               out.put_gguf_string(value);
             } else {
               out.put(value);
             }
           }
         }});
  }
  void add_tensor(gguf_tensor_spec spec) { tensors_.push_back(std::move(spec)); }

  [[nodiscard]] std::vector<std::byte> build(field_map& fields,
                                             std::uint64_t alignment = 32) const {
    byte_writer out;
    out.put_bytes("GGUF");
    fields["version"] = out.put<std::uint32_t>(3);
    fields["tensor_count"] = out.put<std::uint64_t>(tensors_.size());
    fields["metadata_count"] = out.put<std::uint64_t>(kvs_.size());
    for (const auto& kv : kvs_) {
      fields["key:" + kv.key] = out.put_gguf_string(kv.key);
      fields["type:" + kv.key] = out.put(kv.type);
      fields["value:" + kv.key] = out.bytes.size();
      kv.write(out, fields, kv.key);
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      fields["name:" + t.name] = out.put_gguf_string(t.name);
      fields["n_dims:" + t.name] =
          out.put<std::uint32_t>(static_cast<std::uint32_t>(t.dims.size()));
      fields["dims:" + t.name] = out.bytes.size();
      for (const auto dim : t.dims) out.put(dim);
      fields["ggml_type:" + t.name] = out.put(t.type);
      fields["offset:" + t.name] = out.put(offset);
      offset += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    out.pad_to(alignment);
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      if (i > 0) out.pad_to(alignment);
      fields["data:" + tensors_[i].name] = out.bytes.size();
      out.bytes.insert(out.bytes.end(), tensors_[i].data.begin(), tensors_[i].data.end());
    }
    return out.bytes;
  }

 private:
  template <class T>
  void add_scalar(std::string key, std::uint32_t type, T value) {
    kvs_.push_back({std::move(key), type,
                    [value](byte_writer& out, field_map&, const std::string&) { out.put(value); }});
  }
  struct kv {
    std::string key;
    std::uint32_t type;
    std::function<void(byte_writer&, field_map&, const std::string&)> write;
  };
  std::vector<kv> kvs_;
  std::vector<gguf_tensor_spec> tensors_;
};

struct tiny_shape {
  int dim, hidden, layers, heads, kv_heads, context;
};

// A llama GGUF of `shape` with the test vocabulary and random tensors of mixed types (matrices
// all Q4_0 when `all_q4_0`, for a smaller file); `specs` receives every tensor by name.
inline gguf_builder tiny_gguf(seeded_rng& rng, const tiny_shape& s, bool tied,
                              const llama::vocabulary& vocab,
                              std::map<std::string, gguf_tensor_spec>& specs,
                              bool all_q4_0 = false) {
  gguf_builder gguf;
  gguf.add_string("general.architecture", "llama");
  gguf.add_string("general.name", "tiny");
  gguf.add_u32("llama.context_length", static_cast<std::uint32_t>(s.context));
  gguf.add_u32("llama.embedding_length", static_cast<std::uint32_t>(s.dim));
  gguf.add_u32("llama.block_count", static_cast<std::uint32_t>(s.layers));
  gguf.add_u32("llama.feed_forward_length", static_cast<std::uint32_t>(s.hidden));
  gguf.add_u32("llama.attention.head_count", static_cast<std::uint32_t>(s.heads));
  gguf.add_u32("llama.attention.head_count_kv", static_cast<std::uint32_t>(s.kv_heads));
  gguf.add_u32("llama.rope.dimension_count", static_cast<std::uint32_t>(s.dim / s.heads));
  gguf.add_f32("llama.rope.freq_base", 500000.0f);
  gguf.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
  gguf.add_string("tokenizer.ggml.model", "llama");
  gguf.add_array("tokenizer.ggml.tokens", 8, vocab.pieces);
  gguf.add_array("tokenizer.ggml.scores", 6, vocab.scores);
  std::vector<std::int32_t> kinds;
  for (const auto kind : vocab.kinds) kinds.push_back(static_cast<std::int32_t>(kind));
  gguf.add_array("tokenizer.ggml.token_type", 5, kinds);
  gguf.add_u32("tokenizer.ggml.bos_token_id", 1);
  gguf.add_u32("tokenizer.ggml.eos_token_id", 2);
  gguf.add_bool("tokenizer.ggml.add_bos_token", true);

  const std::uint64_t dim = s.dim, hidden = s.hidden, kv_dim = s.dim / s.heads * s.kv_heads,
                      vocab_size = vocab.pieces.size();
  auto tensor = [&](std::string name, std::uint32_t type, std::vector<std::uint64_t> dims) {
    if (all_q4_0 && dims.size() == 2) type = 2;
    std::uint64_t count = 1;
    for (const auto d : dims) count *= d;
    gguf_tensor_spec spec{name, type, std::move(dims), random_tensor_bytes(rng, type, count)};
    specs[name] = spec;
    gguf.add_tensor(std::move(spec));
  };
  // Types: F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8; each matrix kind gets another one.
  tensor("token_embd.weight", 2, {dim, vocab_size});
  for (int l = 0; l < s.layers; ++l) {
    const std::string prefix = "blk." + std::to_string(l) + ".";
    tensor(prefix + "attn_norm.weight", 0, {dim});
    tensor(prefix + "attn_q.weight", 8, {dim, dim});
    tensor(prefix + "attn_k.weight", 2, {dim, kv_dim});
    tensor(prefix + "attn_v.weight", 1, {dim, kv_dim});
    tensor(prefix + "attn_output.weight", 0, {dim, dim});
    tensor(prefix + "ffn_norm.weight", 0, {dim});
    tensor(prefix + "ffn_gate.weight", 2, {dim, hidden});
    tensor(prefix + "ffn_up.weight", 1, {dim, hidden});
    tensor(prefix + "ffn_down.weight", 8, {hidden, dim});
  }
  tensor("output_norm.weight", 0, {dim});
  if (!tied) tensor("output.weight", 8, {dim, vocab_size});
  return gguf;
}

// ---------------------------------------------------------------------------------------------
// llama2.c.

struct llama2c_file {
  std::vector<std::byte> bytes;
  std::map<std::string, std::vector<float>> weights;  // by llama2.c's names, all layers together
};

inline llama2c_file tiny_llama2c(seeded_rng& rng, const tiny_shape& s, int vocab_size,
                                 bool shared) {
  llama2c_file file;
  byte_writer out;
  for (const int field : {s.dim, s.hidden, s.layers, s.heads, s.kv_heads,
                          shared ? vocab_size : -vocab_size, s.context}) {
    out.put<std::int32_t>(field);
  }
  const std::size_t dim = s.dim, hidden = s.hidden, layers = s.layers,
                    kv_dim = s.dim / s.heads * s.kv_heads, head_dim = s.dim / s.heads;
  auto weights = [&](const std::string& name, std::size_t count) {
    auto& values = file.weights[name];
    for (std::size_t i = 0; i < count; ++i) {
      values.push_back(static_cast<float>(rng.normal()));
      out.put(values.back());
    }
  };
  weights("token_embedding", vocab_size * dim);
  weights("rms_att", layers * dim);
  weights("wq", layers * dim * dim);
  weights("wk", layers * kv_dim * dim);
  weights("wv", layers * kv_dim * dim);
  weights("wo", layers * dim * dim);
  weights("rms_ffn", layers * dim);
  weights("w1", layers * hidden * dim);
  weights("w2", layers * dim * hidden);
  weights("w3", layers * hidden * dim);
  weights("rms_final", dim);
  weights("freq_cis", s.context * head_dim);  // real then imaginary halves
  if (!shared) weights("wcls", vocab_size * dim);
  file.bytes = std::move(out.bytes);
  return file;
}

inline std::vector<std::byte> tokenizer_bin(const llama::vocabulary& vocab) {
  byte_writer out;
  std::size_t longest = 1;
  for (const auto& piece : vocab.pieces) longest = std::max(longest, piece.size());
  out.put<std::int32_t>(static_cast<std::int32_t>(longest));
  for (int id = 0; id < vocab.size(); ++id) {
    out.put(vocab.scores[id]);
    out.put<std::int32_t>(static_cast<std::int32_t>(vocab.pieces[id].size()));
    out.put_bytes(vocab.pieces[id]);
  }
  return out.bytes;
}

}  // namespace infuse::test
