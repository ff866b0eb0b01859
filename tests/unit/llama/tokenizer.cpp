#include "llama/tokenizer.hpp"

#include <doctest/doctest.h>

#include <map>
#include <string>
#include <vector>

#include "files.hpp"
#include "llama/gguf.hpp"
#include "llama/llama2c.hpp"

namespace {

constexpr const char* sentencepiece_space = "\xE2\x96\x81";

int id_of(const infuse::llama::vocabulary& vocab, const std::string& piece) {
  const auto found = std::find(vocab.pieces.begin(), vocab.pieces.end(), piece);
  REQUIRE(found != vocab.pieces.end());
  return static_cast<int>(found - vocab.pieces.begin());
}

// Random text of letters the vocabulary has, spaces, and characters it lacks (byte fallback).
std::string random_text(infuse::test::seeded_rng& rng) {
  static const std::vector<std::string> parts = {"the",
                                                 "and",
                                                 "hello",
                                                 "world",
                                                 "tree",
                                                 "a",
                                                 " ",
                                                 " ",
                                                 "  ",
                                                 "l",
                                                 "w",
                                                 ".",
                                                 "th",
                                                 "\n",
                                                 "\t",
                                                 "\xC3\xA9" /* é */,
                                                 "\xE6\x97\xA5" /* 日 */,
                                                 "\xF0\x9F\x99\x82" /* 🙂 */,
                                                 "Z",
                                                 "0",
                                                 "<s>",
                                                 "\x80" /* a stray continuation byte */,
                                                 "\xE6\x97" /* cut short */};
  std::string text;
  const auto count = rng.integer(0, 12);
  for (std::int64_t i = 0; i < count; ++i) {
    text += parts[static_cast<std::size_t>(rng.integer(0, std::int64_t(parts.size()) - 1))];
  }
  return text;
}

}  // namespace

TEST_CASE("tokenizer encodes by best-scoring merges and decodes pieces, spaces and bytes") {
  for (const std::string& space : {std::string(sentencepiece_space), std::string(" ")}) {
    CAPTURE(space);
    const auto vocab = infuse::test::test_vocabulary(space);
    const infuse::llama::tokenizer tok(vocab);
    CHECK(tok.size() == vocab.size());

    const int the = id_of(vocab, space + "the");
    const int and_ = id_of(vocab, space + "and");
    const int hello = id_of(vocab, space + "hello");
    CHECK(tok.encode("the and", true, false) == std::vector<int>{1, the, and_});
    CHECK(tok.encode("the and", false, true) == std::vector<int>{the, and_, 2});
    CHECK(tok.encode("", true, true) == std::vector<int>{1, 2});
    CHECK(tok.encode("hello", false, false) == std::vector<int>{hello});
    // "é" has no piece: its two bytes through their <0xNN> tokens (ids 3 + byte).
    CHECK(tok.encode("the\xC3\xA9", false, false) == std::vector<int>{the, 3 + 0xC3, 3 + 0xA9});

    const std::vector<int> ids = {1, the, and_, 3 + '\n', hello, 3 + 0xE6, 3 + 0x97, 3 + 0xA5, 2};
    CHECK(tok.decode(ids) == "the and\n hello\xE6\x97\xA5");
    CHECK(tok.decode(-1, the) == "the");  // the dummy prefix goes at the start
    CHECK(tok.decode(1, the) == "the");   // and after BOS
    CHECK(tok.decode(the, the) == " the");
    CHECK(tok.decode(the, 0).empty());  // <unk>, <s>, </s> print nothing
    CHECK_THROWS_AS((void)tok.decode(the, tok.size()), infuse::error);
    CHECK_THROWS_AS((void)tok.decode(the, -1), infuse::error);
  }
}

TEST_CASE("tokenizer merges the pair with the highest score first, the leftmost among equals") {
  // " abc": " a" or "ab" or "bc" could merge first; the scores decide which and so the result.
  infuse::llama::vocabulary vocab;
  vocab.pieces = {"<unk>", "<s>", "</s>", " ", "a", "b", "c", " a", "ab", "bc", " ab"};
  struct merge_case {
    float bc, ab, space_a;  // the scores of "bc", "ab" and " a"
    std::vector<std::string> expected;
  };
  for (const auto& test : {merge_case{5, 1, 0, {" a", "bc"}}, merge_case{1, 5, 0, {" ab", "c"}},
                           merge_case{1, 2, 3, {" a", "bc"}},  // then bc over " ab"
                           merge_case{2, 2, 0, {" ab", "c"}}}) {
    CAPTURE(test.bc);
    CAPTURE(test.ab);
    vocab.scores = {0, 0, 0, 0, 0, 0, 0, test.space_a, test.ab, test.bc, 0};
    const infuse::llama::tokenizer tok(vocab);
    std::vector<int> expected_ids;
    for (const auto& piece : test.expected) expected_ids.push_back(id_of(vocab, piece));
    CHECK(tok.encode("abc", false, false) == expected_ids);
  }
}

TEST_CASE("tokenizer round trip: decode(encode(text)) == text for random text") {
  INFUSE_RANDOM(rng);
  for (const std::string& space : {std::string(sentencepiece_space), std::string(" ")}) {
    const infuse::llama::tokenizer tok(infuse::test::test_vocabulary(space));
    for (int trial = 0; trial < 300; ++trial) {
      const auto text = random_text(rng);
      CAPTURE(text);
      const auto ids = tok.encode(text, true, true);
      CHECK(tok.decode(ids) == text);
      CHECK(ids.size() <= text.size() + 3);  // at most one token per byte, the prefix, BOS, EOS
    }
  }
}

TEST_CASE("tokenizer rejects bad vocabularies and text it cannot encode") {
  auto vocab = infuse::test::test_vocabulary(" ", false, true);
  const infuse::llama::tokenizer no_bytes(vocab);
  CHECK_THROWS_WITH_AS((void)no_bytes.encode("the \xC3\xA9", false, false),
                       doctest::Contains("a byte token"), infuse::error);
  CHECK(no_bytes.decode(no_bytes.encode("the tree", false, false)) == "the tree");

  auto bad = vocab;
  bad.scores.pop_back();
  CHECK_THROWS_AS(infuse::llama::tokenizer{bad}, infuse::error);
  bad = vocab;
  bad.bos = vocab.size();
  CHECK_THROWS_AS(infuse::llama::tokenizer{bad}, infuse::error);
  bad = vocab;
  bad.model = "gpt2";
  CHECK_THROWS_WITH_AS(infuse::llama::tokenizer{bad}, doctest::Contains("gpt2"), infuse::error);
  CHECK_THROWS_AS(infuse::llama::tokenizer{infuse::llama::vocabulary{}}, infuse::error);
}

TEST_CASE("tokenizers from a GGUF file and from tokenizer.bin agree") {
  INFUSE_RANDOM(rng);
  const auto gguf_vocab = infuse::test::test_vocabulary(sentencepiece_space);
  std::map<std::string, infuse::test::gguf_tensor_spec> specs;
  infuse::test::gguf_builder::field_map fields;
  const auto bytes =
      infuse::test::tiny_gguf(rng, {32, 32, 1, 2, 1, 8}, true, gguf_vocab, specs).build(fields);
  const auto model = infuse::llama::load_gguf(infuse::test::as_file("tiny.gguf", bytes));
  const infuse::llama::tokenizer from_gguf(model.vocab);

  const auto bin_vocab = infuse::test::test_vocabulary(" ");
  const infuse::llama::tokenizer from_bin(infuse::llama::parse_llama2c_tokenizer(
      infuse::test::as_file("tokenizer.bin", infuse::test::tokenizer_bin(bin_vocab)),
      bin_vocab.size()));
  for (int trial = 0; trial < 100; ++trial) {
    const auto text = random_text(rng);
    CAPTURE(text);
    const auto ids = from_gguf.encode(text, true, false);
    CHECK(ids == from_bin.encode(text, true, false));
    CHECK(from_gguf.decode(ids) == text);
  }
}
