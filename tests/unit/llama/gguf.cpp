#include "llama/gguf.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "files.hpp"
#include "reference/compare.hpp"

namespace {

using infuse::test::as_file;
using infuse::test::gguf_builder;
using infuse::test::gguf_tensor_spec;
using infuse::test::patch;

constexpr infuse::test::tiny_shape shape{
    .dim = 64, .hidden = 96, .layers = 2, .heads = 4, .kv_heads = 2, .context = 128};

// The tensor's values against the float64 decoding of its spec's bytes: the formats' products of
// a half scale and a small integer are exact in float, so the match is exact.
void check_values(const infuse::llama::tensor& t, const gguf_tensor_spec& spec) {
  INFO("tensor " << t.name);
  CHECK(static_cast<std::uint32_t>(t.type) == spec.type);
  CHECK(t.dims == spec.dims);
  REQUIRE(t.bytes.size() == spec.data.size());
  const auto values = infuse::llama::to_float(t);
  const auto reference = infuse::test::reference_decode(spec.type, spec.data);
  REQUIRE(values.size() == reference.size());
  CHECK(infuse::reference::relative_error(values, reference) == 0.0);
  std::vector<float> row(t.row_length());
  const std::uint64_t last = t.rows() - 1;
  infuse::llama::to_float_row(t, last, row);
  CHECK(std::equal(row.begin(), row.end(), values.end() - static_cast<std::ptrdiff_t>(row.size())));
}

// Loading `bytes` throws infuse::error whose message names the file and a byte offset (and
// `expected_text` when given).
void check_rejected(std::vector<std::byte> bytes, const std::string& expected_text = "") {
  try {
    (void)infuse::llama::load_gguf(as_file("bad.gguf", std::move(bytes)));
    FAIL_CHECK("the malformed file loaded");
  } catch (const infuse::error& failure) {
    const std::string message = failure.what();
    INFO(message);
    CHECK(message.find("bad.gguf at byte ") != std::string::npos);
    CHECK(message.find("expected") != std::string::npos);
    if (!expected_text.empty()) CHECK(message.find(expected_text) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("load_gguf reads the config, the vocabulary and every tensor of a tiny GGUF v3 file") {
  INFUSE_RANDOM(rng);
  for (const bool tied : {false, true}) {
    CAPTURE(tied);
    const auto vocab = infuse::test::test_vocabulary("\xE2\x96\x81");
    std::map<std::string, gguf_tensor_spec> specs;
    gguf_builder::field_map fields;
    const auto bytes = infuse::test::tiny_gguf(rng, shape, tied, vocab, specs).build(fields);

    // Through a real file, too.
    const auto path = std::filesystem::temp_directory_path() /
                      ("infuse_tiny_" + std::to_string(rng.bits32()) + ".gguf");
    {
      std::ofstream out(path, std::ios::binary);
      out.write(reinterpret_cast<const char*>(bytes.data()),
                static_cast<std::streamsize>(bytes.size()));
    }
    const auto model = infuse::llama::load_gguf(path);
    std::filesystem::remove(path);

    const auto& c = model.config;
    CHECK(c.dim == shape.dim);
    CHECK(c.hidden_dim == shape.hidden);
    CHECK(c.n_layers == shape.layers);
    CHECK(c.n_heads == shape.heads);
    CHECK(c.n_kv_heads == shape.kv_heads);
    CHECK(c.context_length == shape.context);
    CHECK(c.vocab_size == vocab.size());
    CHECK(c.rope_base == 500000.0f);
    CHECK(c.rms_eps == 1e-6f);
    CHECK(c.head_dim() == shape.dim / shape.heads);
    CHECK(model.pairing == infuse::llama::rope_pairing::interleaved);
    CHECK(model.vocab.pieces == vocab.pieces);
    CHECK(model.vocab.scores == vocab.scores);
    CHECK(model.vocab.kinds == vocab.kinds);
    CHECK(model.vocab.bos == 1);
    CHECK(model.vocab.eos == 2);

    check_values(model.token_embedding, specs.at("token_embd.weight"));
    REQUIRE(model.layers.size() == static_cast<std::size_t>(shape.layers));
    for (int l = 0; l < shape.layers; ++l) {
      const std::string prefix = "blk." + std::to_string(l) + ".";
      const auto& layer = model.layers[l];
      check_values(layer.attn_norm, specs.at(prefix + "attn_norm.weight"));
      check_values(layer.wq, specs.at(prefix + "attn_q.weight"));
      check_values(layer.wk, specs.at(prefix + "attn_k.weight"));
      check_values(layer.wv, specs.at(prefix + "attn_v.weight"));
      check_values(layer.wo, specs.at(prefix + "attn_output.weight"));
      check_values(layer.ffn_norm, specs.at(prefix + "ffn_norm.weight"));
      check_values(layer.w_gate, specs.at(prefix + "ffn_gate.weight"));
      check_values(layer.w_up, specs.at(prefix + "ffn_up.weight"));
      check_values(layer.w_down, specs.at(prefix + "ffn_down.weight"));
    }
    check_values(model.output_norm, specs.at("output_norm.weight"));
    CHECK(model.tied_output == tied);
    check_values(model.output, specs.at(tied ? "token_embd.weight" : "output.weight"));

    // The raw view: every metadata value, typed.
    const auto gguf = infuse::llama::parse_gguf(as_file("tiny.gguf", bytes));
    CHECK(gguf.version == 3);
    CHECK(gguf.alignment == 32);
    CHECK(gguf.data_offset % 32 == 0);
    CHECK(gguf.tensors.size() == specs.size());
    const auto* flag = gguf.find("tokenizer.ggml.add_bos_token");
    REQUIRE(flag != nullptr);
    CHECK(flag->value.type() == infuse::llama::gguf_type::boolean);
    CHECK(std::get<bool>(flag->value.data));
    const auto* tokens = gguf.find("tokenizer.ggml.tokens");
    REQUIRE(tokens != nullptr);
    CHECK(tokens->value.element_type == infuse::llama::gguf_type::string);
    CHECK(std::get<std::uint32_t>(gguf.find("llama.block_count")->value.data) == 2u);
    CHECK(gguf.find("no.such.key") == nullptr);
    CHECK(gguf.find_tensor("no.such.tensor") == nullptr);
  }
}

TEST_CASE("parse_gguf honours general.alignment and reports unsupported tensor types by name") {
  INFUSE_RANDOM(rng);
  gguf_builder gguf;
  gguf.add_u32("general.alignment", 64);
  gguf.add_tensor({"a", 0, {3}, infuse::test::random_tensor_bytes(rng, 0, 3)});
  gguf.add_tensor({"b", 12, {256, 2}, std::vector<std::byte>(2 * 144)});  // Q4_K
  gguf_builder::field_map fields;
  const auto bytes = gguf.build(fields, 64);
  const auto file = infuse::llama::parse_gguf(as_file("aligned.gguf", bytes));
  CHECK(file.alignment == 64);
  CHECK(file.data_offset == fields.at("data:a"));
  CHECK(file.find_tensor("b")->bytes.data() == file.file.bytes().data() + fields.at("data:b"));
  CHECK(file.find_tensor("b")->bytes.size() == 2 * 144);
  CHECK(infuse::llama::type_name(file.find_tensor("b")->type) == "Q4_K");
  CHECK_THROWS_WITH_AS(infuse::llama::to_float(*file.find_tensor("b")), doctest::Contains("Q4_K"),
                       infuse::error);
  CHECK(infuse::llama::to_float(*file.find_tensor("a")).size() == 3);

  for (const std::uint32_t alignment : {0u, 3u, 48u}) {
    auto copy = bytes;
    patch(copy, fields.at("value:general.alignment"), alignment);
    CHECK_THROWS_WITH_AS((void)infuse::llama::parse_gguf(as_file("aligned.gguf", copy)),
                         doctest::Contains("general.alignment, a uint32 power of two"),
                         infuse::error);
  }
  auto retyped = bytes;
  patch(retyped, fields.at("type:general.alignment"), 5u);  // int32
  CHECK_THROWS_AS((void)infuse::llama::parse_gguf(as_file("aligned.gguf", retyped)), infuse::error);
}

TEST_CASE("load_gguf rejects a missing file and a GGUF truncated at every byte") {
  CHECK_THROWS_WITH_AS(infuse::llama::load_gguf("/nonexistent/model.gguf"),
                       doctest::Contains("/nonexistent/model.gguf at byte 0: expected a readable"),
                       infuse::error);
  INFUSE_RANDOM(rng);
  const infuse::test::tiny_shape small{
      .dim = 32, .hidden = 32, .layers = 1, .heads = 2, .kv_heads = 1, .context = 8};
  const auto vocab = infuse::test::test_vocabulary("\xE2\x96\x81", false, false);
  std::map<std::string, gguf_tensor_spec> specs;
  gguf_builder::field_map fields;
  const auto bytes = infuse::test::tiny_gguf(rng, small, false, vocab, specs, true).build(fields);
  CHECK_NOTHROW((void)infuse::llama::load_gguf(as_file("bad.gguf", bytes)));
  for (std::size_t size = 0; size < bytes.size(); ++size) {
    CAPTURE(size);
    check_rejected({bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(size)});
  }
}

TEST_CASE("load_gguf rejects corrupt counts, lengths, types, dims, offsets and configs") {
  INFUSE_RANDOM(rng);
  const auto vocab = infuse::test::test_vocabulary("\xE2\x96\x81", false, true);
  std::map<std::string, gguf_tensor_spec> specs;
  gguf_builder::field_map fields;
  const auto bytes = infuse::test::tiny_gguf(rng, shape, false, vocab, specs).build(fields);
  const auto huge = std::numeric_limits<std::uint64_t>::max();

  // Applies `change` to a copy of the file and checks that loading it fails.
  auto corrupt = [&](const std::string& case_name, auto change, const std::string& text = "") {
    CAPTURE(case_name);
    auto copy = bytes;
    change(copy);
    check_rejected(std::move(copy), text);
  };
  auto at = [&](const std::string& field) { return fields.at(field); };
  using bytes_t = std::vector<std::byte>;

  corrupt(
      "magic", [&](bytes_t& b) { b[0] = std::byte{'X'}; }, "magic");
  for (const std::uint32_t version : {0u, 1u, 4u, 0x03000000u}) {
    corrupt(
        "version", [&](bytes_t& b) { patch(b, at("version"), version); }, "version 2 or 3");
  }
  for (const std::uint64_t count : {huge, std::uint64_t{1} << 40, specs.size() + 1}) {
    corrupt("tensor count", [&](bytes_t& b) { patch(b, at("tensor_count"), count); });
  }
  for (const std::uint64_t count : {huge, std::uint64_t{1} << 40, std::uint64_t{100}}) {
    corrupt("metadata count", [&](bytes_t& b) { patch(b, at("metadata_count"), count); });
  }
  for (const std::uint64_t length : {huge, std::uint64_t{1} << 40, std::uint64_t{100000}}) {
    corrupt("key length", [&](bytes_t& b) { patch(b, at("key:general.name"), length); });
    corrupt("string length", [&](bytes_t& b) { patch(b, at("value:general.name"), length); });
    corrupt("token length",
            [&](bytes_t& b) { patch(b, at("count:tokenizer.ggml.tokens") + 8, length); });
    corrupt("array count",
            [&](bytes_t& b) { patch(b, at("count:tokenizer.ggml.scores"), length); });
    corrupt("tensor name length", [&](bytes_t& b) { patch(b, at("name:output.weight"), length); });
  }
  corrupt(
      "value type", [&](bytes_t& b) { patch(b, at("type:general.name"), 13u); }, "0..12");
  corrupt(
      "array element type", [&](bytes_t& b) { patch(b, at("value:tokenizer.ggml.tokens"), 99u); },
      "0..12");
  corrupt(
      "bool", [&](bytes_t& b) { patch(b, at("value:tokenizer.ggml.add_bos_token"), '\2'); },
      "bool");
  corrupt(
      "duplicate key",
      [&](bytes_t& b) {
        b[at("key:tokenizer.ggml.bos_token_id") + 8 + 15] = std::byte{'e'};  // eos_token_id twice
      },
      "new metadata key");
  corrupt(
      "missing key",
      [&](bytes_t& b) { b[at("key:llama.context_length") + 8 + 6] = std::byte{'X'}; },
      "a metadata key llama.context_length");
  corrupt(
      "n_dims 0", [&](bytes_t& b) { patch(b, at("n_dims:blk.0.attn_q.weight"), 0u); }, "n_dims");
  corrupt(
      "n_dims 5", [&](bytes_t& b) { patch(b, at("n_dims:blk.0.attn_q.weight"), 5u); }, "n_dims");
  corrupt("n_dims 3", [&](bytes_t& b) { patch(b, at("n_dims:blk.0.attn_q.weight"), 3u); });
  corrupt(
      "dim 0", [&](bytes_t& b) { patch(b, at("dims:blk.0.attn_q.weight"), std::uint64_t{0}); },
      "dim");
  corrupt(
      "dim 2^63",
      [&](bytes_t& b) { patch(b, at("dims:blk.0.attn_q.weight"), std::uint64_t{1} << 63); }, "dim");
  corrupt(
      "dims overflow",
      [&](bytes_t& b) {
        patch(b, at("dims:blk.0.attn_q.weight"), std::uint64_t{1} << 40);
        patch(b, at("dims:blk.0.attn_q.weight") + 8, std::uint64_t{1} << 40);
      },
      "64 bits");
  corrupt(
      "dims too large",
      [&](bytes_t& b) { patch(b, at("dims:blk.0.attn_q.weight") + 8, std::uint64_t{1} << 20); },
      "inside the file");
  corrupt(
      "dims mismatch",
      [&](bytes_t& b) { patch(b, at("dims:blk.0.attn_q.weight") + 8, std::uint64_t{32}); },
      "blk.0.attn_q.weight with dims [64, 64]");
  corrupt(
      "row not whole blocks",
      [&](bytes_t& b) { patch(b, at("dims:blk.0.attn_q.weight"), std::uint64_t{48}); },
      "multiple of 32");
  for (const std::uint32_t type : {4u, 31u, 36u, 1000u}) {
    corrupt(
        "unknown ggml type",
        [&](bytes_t& b) { patch(b, at("ggml_type:blk.0.attn_v.weight"), type); }, "ggml type id");
  }
  corrupt(
      "unsupported type",
      [&](bytes_t& b) {
        patch(b, at("ggml_type:blk.0.attn_v.weight"), 30u);  // BF16: the same size as F16
      },
      "found BF16");
  corrupt(
      "data offset unaligned",
      [&](bytes_t& b) { patch(b, at("offset:blk.0.attn_q.weight"), std::uint64_t{1}); },
      "multiple of 32");
  for (const std::uint64_t offset :
       {huge - 31, std::uint64_t{1} << 62, std::uint64_t{bytes.size()}}) {
    corrupt("data offset",
            [&](bytes_t& b) { patch(b, at("offset:output.weight"), offset & ~31ull); });
  }
  corrupt(
      "missing tensor",
      [&](bytes_t& b) {
        b[at("name:blk.0.ffn_up.weight") + 8 + 10] = std::byte{'X'};  // blk.0.ffn_Xp.weight
      },
      "a tensor named blk.0.ffn_up.weight");
  corrupt(
      "duplicate tensor",
      [&](bytes_t& b) {
        b[at("name:blk.0.attn_q.weight") + 8 + 11] = std::byte{'k'};  // blk.0.attn_k.weight twice
      },
      "new tensor name");
  corrupt(
      "architecture", [&](bytes_t& b) { b[at("value:general.architecture") + 8] = std::byte{'L'}; },
      "\"llama\"");
  corrupt(
      "heads divide dim", [&](bytes_t& b) { patch(b, at("value:llama.attention.head_count"), 3u); },
      "multiple of n_heads");
  corrupt(
      "kv heads divide heads",
      [&](bytes_t& b) { patch(b, at("value:llama.attention.head_count_kv"), 3u); },
      "multiple of n_kv_heads");
  corrupt(
      "layers", [&](bytes_t& b) { patch(b, at("value:llama.block_count"), 0u); }, "block_count");
  corrupt(
      "more layers", [&](bytes_t& b) { patch(b, at("value:llama.block_count"), 3u); },
      "blk.2.attn_norm.weight");
  corrupt(
      "rope dims", [&](bytes_t& b) { patch(b, at("value:llama.rope.dimension_count"), 8u); },
      "rope.dimension_count");
  corrupt(
      "rope base type", [&](bytes_t& b) { patch(b, at("type:llama.rope.freq_base"), 4u); },
      "freq_base");
  corrupt(
      "bos id", [&](bytes_t& b) { patch(b, at("value:tokenizer.ggml.bos_token_id"), 100000u); },
      "bos_token_id");
  corrupt(
      "scores type", [&](bytes_t& b) { patch(b, at("value:tokenizer.ggml.scores"), 4u); },
      "tokenizer.ggml.scores");
}
