// llama2.c checkpoints (Karpathy's legacy ".bin", export version 0) and its tokenizer.bin.
//   model: int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative: the
//          classifier is not shared with the embedding), seq_len; then float32 weights:
//          token_embedding [vocab, dim], rms_att [layers, dim], wq [layers, dim, dim],
//          wk and wv [layers, kv_dim, dim], wo [layers, dim, dim], rms_ffn [layers, dim],
//          w1 [layers, hidden, dim], w2 [layers, dim, hidden], w3 [layers, hidden, dim],
//          rms_final [dim], freq_cis_real and freq_cis_imag [seq_len, head_dim / 2] (unused:
//          RoPE angles are computed), and wcls [vocab, dim] when unshared. Shapes are row-major,
//          output rows first, i.e. ggml dims reversed.
//   tokenizer.bin: int32 max_token_length, then per token: float32 score, int32 length, bytes.
// Q/K rows are in the interleaved RoPE order (pairs (2m, 2m+1)), as run.c rotates them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "file_reader.hpp"
#include "tokenizer.hpp"

namespace infuse::llama {

inline constexpr std::uint64_t llama2c_header_bytes = 7 * sizeof(std::int32_t);

// The vocabulary of a tokenizer.bin for a model of `vocab_size` tokens.
inline vocabulary parse_llama2c_tokenizer(file_bytes file, int vocab_size) {
  require(vocab_size > 0, "infuse::llama::parse_llama2c_tokenizer", "vocab_size", vocab_size,
          "a positive token count");
  byte_reader in(std::move(file));
  const auto max_length = in.read<std::int32_t>("max_token_length");
  if (max_length <= 0) in.fail(0, "a positive max_token_length", std::to_string(max_length));
  // Each token holds at least a score and a length.
  in.require_fits(0, static_cast<std::uint64_t>(vocab_size), 8, "a vocabulary of vocab_size");
  vocabulary vocab;
  for (int id = 0; id < vocab_size; ++id) {
    const std::string token = "token " + std::to_string(id);
    vocab.scores.push_back(in.read<float>("the score of " + token));
    const std::uint64_t length_at = in.offset();
    const auto length = in.read<std::int32_t>("the length of " + token);
    if (length < 0 || length > max_length) {
      in.fail(length_at,
              "a length of " + token + " in 0..max_token_length " + std::to_string(max_length),
              std::to_string(length));
    }
    vocab.pieces.push_back(in.read_string(static_cast<std::uint64_t>(length), token));
  }
  if (in.remaining() != 0) {
    in.fail(in.offset(), "the end of the file after " + std::to_string(vocab_size) + " tokens",
            std::to_string(in.remaining()) + " more bytes");
  }
  return vocab;  // llama2.c's bos 1 and eos 2 are vocabulary's defaults
}

inline vocabulary read_llama2c_tokenizer(const std::filesystem::path& path, int vocab_size) {
  return parse_llama2c_tokenizer(read_file(path), vocab_size);
}

inline checkpoint load_llama2c(file_bytes file) {
  byte_reader in(std::move(file));
  constexpr std::uint32_t version_1_magic = 0x616b3432;  // "ak42": llama2.c's newer export format
  std::int32_t header[7];
  for (auto& field : header) field = in.read<std::int32_t>("the 7 int32 fields of the header");
  if (static_cast<std::uint32_t>(header[0]) == version_1_magic) {
    in.fail(0, "a llama2.c legacy (version 0) checkpoint", "the magic of export version 1");
  }
  if (header[5] == std::numeric_limits<std::int32_t>::min()) {
    in.fail(20, "a vocab_size above -2^31", std::to_string(header[5]));
  }
  checkpoint model;
  auto& c = model.config;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.n_layers = header[2];
  c.n_heads = header[3];
  c.n_kv_heads = header[4];
  c.vocab_size = header[5] < 0 ? -header[5] : header[5];
  c.context_length = header[6];
  model.tied_output = header[5] > 0;
  validate_config(in, 0, c);

  // The weights follow each other; each kind holds all layers. Shapes in ggml order.
  const std::uint64_t dim = c.dim, hidden = c.hidden_dim, kv_dim = c.kv_dim(), vocab = c.vocab_size,
                      layers = c.n_layers;
  std::uint64_t cursor = llama2c_header_bytes;
  // `copies` consecutive tensors `name` of `dims`, checked to lie in the file.
  auto next = [&](const std::string& name, std::initializer_list<std::uint64_t> dims,
                  std::uint64_t copies) {
    const std::vector<std::uint64_t> shape(dims);
    const std::uint64_t bytes = checked_tensor_bytes(in, cursor, name, 0, shape);
    std::uint64_t total = 0;
    if (!checked_multiply(bytes, copies, total)) in.fail(0, "a model whose size fits in 64 bits");
    const auto all = in.range(cursor, total, "the " + name + " weights");
    std::vector<tensor> result;
    for (std::uint64_t i = 0; i < copies; ++i) {
      result.push_back({copies == 1 ? name : "layers." + std::to_string(i) + "." + name,
                        ggml_type::f32, shape, all.subspan(i * bytes, bytes), cursor + i * bytes});
    }
    cursor += total;
    return result;
  };
  model.token_embedding = next("token_embedding", {dim, vocab}, 1)[0];
  const auto attn_norm = next("rms_att", {dim}, layers);
  const auto wq = next("wq", {dim, dim}, layers);
  const auto wk = next("wk", {dim, kv_dim}, layers);
  const auto wv = next("wv", {dim, kv_dim}, layers);
  const auto wo = next("wo", {dim, dim}, layers);
  const auto ffn_norm = next("rms_ffn", {dim}, layers);
  const auto w1 = next("w1", {dim, hidden}, layers);
  const auto w2 = next("w2", {hidden, dim}, layers);
  const auto w3 = next("w3", {dim, hidden}, layers);
  model.output_norm = next("rms_final", {dim}, 1)[0];
  next("freq_cis", {dim / c.n_heads, std::uint64_t(c.context_length)}, 1);  // real and imag
  model.output = model.tied_output ? model.token_embedding : next("wcls", {dim, vocab}, 1)[0];
  if (cursor != in.size()) {
    in.fail(cursor, "the end of the file after the weights",
            std::to_string(in.size() - cursor) + " more bytes");
  }
  for (std::uint64_t l = 0; l < layers; ++l) {
    model.layers.push_back(
        {attn_norm[l], wq[l], wk[l], wv[l], wo[l], ffn_norm[l], w1[l], w3[l], w2[l]});
  }
  model.file = in.file();
  return model;
}

// A checkpoint, with its vocabulary when a tokenizer.bin is given.
inline checkpoint load_llama2c(const std::filesystem::path& model_path,
                               const std::filesystem::path& tokenizer_path = {}) {
  checkpoint model = load_llama2c(read_file(model_path));
  if (!tokenizer_path.empty()) {
    model.vocab = read_llama2c_tokenizer(tokenizer_path, model.config.vocab_size);
  }
  return model;
}

}  // namespace infuse::llama
