#include "llama/llama2c.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "files.hpp"

namespace {

using infuse::test::as_file;
using infuse::test::patch;

// The tensor holds `values[first, first + count)` exactly.
void check_values(const infuse::llama::tensor& t, const std::vector<float>& values,
                  std::size_t first) {
  INFO("tensor " << t.name);
  CHECK(t.type == infuse::llama::ggml_type::f32);
  const auto loaded = infuse::llama::to_float(t);
  REQUIRE(first + loaded.size() <= values.size());
  CHECK(std::equal(loaded.begin(), loaded.end(),
                   values.begin() + static_cast<std::ptrdiff_t>(first)));
}

void write(const std::filesystem::path& path, const std::vector<std::byte>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

template <class Load>
void check_rejected(Load load, std::vector<std::byte> bytes,
                    const std::string& expected_text = "") {
  try {
    (void)load(as_file("bad.bin", std::move(bytes)));
    FAIL_CHECK("the malformed file loaded");
  } catch (const infuse::error& failure) {
    const std::string message = failure.what();
    INFO(message);
    CHECK(message.find("bad.bin at byte ") != std::string::npos);
    if (!expected_text.empty()) CHECK(message.find(expected_text) != std::string::npos);
  }
}

const auto load_model = [](infuse::llama::file_bytes file) {
  return infuse::llama::load_llama2c(std::move(file));
};

}  // namespace

TEST_CASE("load_llama2c reads the header, every weight and tokenizer.bin") {
  INFUSE_RANDOM(rng);
  const infuse::test::tiny_shape s{
      .dim = 24, .hidden = 40, .layers = 3, .heads = 6, .kv_heads = 2, .context = 16};
  const auto vocab = infuse::test::test_vocabulary(" ", true, true);
  for (const bool shared : {true, false}) {
    CAPTURE(shared);
    const auto file = infuse::test::tiny_llama2c(rng, s, vocab.size(), shared);
    const auto dir = std::filesystem::temp_directory_path();
    const auto tag = std::to_string(rng.bits32());
    const auto model_path = dir / ("infuse_model_" + tag + ".bin");
    const auto tokenizer_path = dir / ("infuse_tokenizer_" + tag + ".bin");
    write(model_path, file.bytes);
    write(tokenizer_path, infuse::test::tokenizer_bin(vocab));
    const auto model = infuse::llama::load_llama2c(model_path, tokenizer_path);
    std::filesystem::remove(model_path);
    std::filesystem::remove(tokenizer_path);

    const auto& c = model.config;
    CHECK(c.dim == s.dim);
    CHECK(c.hidden_dim == s.hidden);
    CHECK(c.n_layers == s.layers);
    CHECK(c.n_heads == s.heads);
    CHECK(c.n_kv_heads == s.kv_heads);
    CHECK(c.vocab_size == vocab.size());
    CHECK(c.context_length == s.context);
    CHECK(c.rope_base == 10000.0f);
    CHECK(c.rms_eps == 1e-5f);
    CHECK(model.tied_output == shared);
    CHECK(model.pairing == infuse::llama::rope_pairing::interleaved);

    const std::size_t dim = s.dim, hidden = s.hidden, kv_dim = c.kv_dim();
    const auto& w = file.weights;
    check_values(model.token_embedding, w.at("token_embedding"), 0);
    CHECK(model.token_embedding.dims ==
          std::vector<std::uint64_t>{dim, std::uint64_t(vocab.size())});
    REQUIRE(model.layers.size() == 3);
    for (std::size_t l = 0; l < 3; ++l) {
      CAPTURE(l);
      const auto& layer = model.layers[l];
      check_values(layer.attn_norm, w.at("rms_att"), l * dim);
      check_values(layer.wq, w.at("wq"), l * dim * dim);
      check_values(layer.wk, w.at("wk"), l * kv_dim * dim);
      check_values(layer.wv, w.at("wv"), l * kv_dim * dim);
      check_values(layer.wo, w.at("wo"), l * dim * dim);
      check_values(layer.ffn_norm, w.at("rms_ffn"), l * dim);
      check_values(layer.w_gate, w.at("w1"), l * hidden * dim);
      check_values(layer.w_down, w.at("w2"), l * dim * hidden);
      check_values(layer.w_up, w.at("w3"), l * hidden * dim);
      CHECK(layer.wk.dims == std::vector<std::uint64_t>{dim, kv_dim});
      CHECK(layer.w_down.dims == std::vector<std::uint64_t>{hidden, dim});
    }
    check_values(model.output_norm, w.at("rms_final"), 0);
    check_values(model.output, w.at(shared ? "token_embedding" : "wcls"), 0);

    CHECK(model.vocab.pieces == vocab.pieces);
    CHECK(model.vocab.scores == vocab.scores);
    CHECK(model.vocab.kinds.empty());
  }
}

TEST_CASE("load_llama2c rejects a missing file, truncation at every byte and corrupt headers") {
  CHECK_THROWS_WITH_AS(infuse::llama::load_llama2c("/nonexistent/model.bin"),
                       doctest::Contains("/nonexistent/model.bin at byte 0"), infuse::error);
  INFUSE_RANDOM(rng);
  const infuse::test::tiny_shape s{
      .dim = 8, .hidden = 16, .layers = 2, .heads = 2, .kv_heads = 1, .context = 4};
  const auto file = infuse::test::tiny_llama2c(rng, s, 10, false);
  CHECK_NOTHROW((void)load_model(as_file("bad.bin", file.bytes)));
  for (std::size_t size = 0; size < file.bytes.size(); ++size) {
    CAPTURE(size);
    check_rejected(load_model,
                   {file.bytes.begin(), file.bytes.begin() + static_cast<std::ptrdiff_t>(size)},
                   size < 28 ? "the 7 int32 fields of the header" : "inside the file");
  }
  auto longer = file.bytes;
  longer.push_back(std::byte{0});
  check_rejected(load_model, longer, "the end of the file");

  // Header field i (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) = value.
  auto corrupt = [&](int field, std::int32_t value, const std::string& text) {
    CAPTURE(field);
    CAPTURE(value);
    auto copy = file.bytes;
    patch(copy, 4 * static_cast<std::size_t>(field), value);
    check_rejected(load_model, std::move(copy), text);
  };
  constexpr auto int_min = std::numeric_limits<std::int32_t>::min();
  constexpr auto int_max = std::numeric_limits<std::int32_t>::max();
  corrupt(0, 0, "positive dim");
  corrupt(0, -8, "positive dim");
  corrupt(0, 0x616b3432, "legacy (version 0)");
  corrupt(1, -1, "positive hidden_dim");
  corrupt(2, 0, "positive n_layers");
  corrupt(3, 3, "multiple of n_heads");
  corrupt(4, 0, "positive n_kv_heads");
  corrupt(4, 3, "multiple of n_kv_heads");
  corrupt(4, 4, "multiple of n_kv_heads");
  corrupt(3, 8, "even head dim");
  corrupt(5, int_min, "vocab_size");
  corrupt(5, 0, "positive vocab_size");
  corrupt(5, 10, "the end of the file");  // unshared classifier read as shared: bytes left over
  corrupt(5, -11, "inside the file");
  corrupt(6, 0, "positive context_length");
  corrupt(0, int_max - 1, "");  // huge sizes, odd head dims and the like: some error
  corrupt(1, int_max, "inside the file");
  corrupt(2, int_max, "inside the file");
  corrupt(6, int_max, "inside the file");
  for (const int field : {0, 1, 2, 5, 6}) corrupt(field, 1 << 30, "");
}

TEST_CASE("parse_llama2c_tokenizer rejects truncation at every byte and corrupt lengths") {
  const auto vocab = infuse::test::test_vocabulary(" ", false, false);
  const auto bytes = infuse::test::tokenizer_bin(vocab);
  const auto load = [&](infuse::llama::file_bytes file) {
    return infuse::llama::parse_llama2c_tokenizer(std::move(file), vocab.size());
  };
  CHECK(load(as_file("bad.bin", bytes)).pieces == vocab.pieces);
  for (std::size_t size = 0; size < bytes.size(); ++size) {
    CAPTURE(size);
    check_rejected(load, {bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(size)});
  }
  auto longer = bytes;
  longer.push_back(std::byte{0});
  check_rejected(load, longer, "the end of the file after");
  CHECK_THROWS_AS((void)infuse::llama::parse_llama2c_tokenizer(as_file("bad.bin", bytes), 0),
                  infuse::error);
  CHECK_THROWS_AS((void)infuse::llama::read_llama2c_tokenizer("/nonexistent/tokenizer.bin", 10),
                  infuse::error);

  for (const std::int32_t max_length : {0, -1}) {
    auto copy = bytes;
    patch(copy, 0, max_length);
    check_rejected(load, copy, "positive max_token_length");
  }
  // Token 0's length: right after max_token_length and its score.
  for (const std::int32_t length : {-1, 1000, std::numeric_limits<std::int32_t>::max()}) {
    CAPTURE(length);
    auto copy = bytes;
    patch(copy, 8, length);
    check_rejected(load, copy, "a length of token 0");
  }
  auto wider = bytes;
  patch(wider, 0,
        std::numeric_limits<std::int32_t>::max());  // a generous maximum, then a huge length
  patch(wider, 8, std::numeric_limits<std::int32_t>::max());
  check_rejected(load, wider, "inside the file");
}
