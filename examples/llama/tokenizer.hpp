// The SentencePiece-BPE tokenizer of Llama models, from the vocabulary of a GGUF file or of
// llama2.c's tokenizer.bin: decoding ids to text and a simple encoder for prompts.
//
// Pieces mark a word start with SentencePiece's "▁" (U+2581) in GGUF and with a plain space in
// tokenizer.bin; both become a space here. Byte tokens "<0xNN>" decode to the byte NN and encode
// the bytes of characters that no piece covers (SentencePiece's byte fallback). Encoding follows
// llama2.c's encoder: a space in front (SentencePiece's dummy prefix), one piece per character,
// then repeatedly merge the adjacent pair whose merged piece has the highest score.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "infuse/core/error.hpp"

namespace infuse::llama {

// GGUF's tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class token_kind : std::int32_t {
  undefined = 0,
  normal = 1,
  unknown = 2,
  control = 3,
  user_defined = 4,
  unused = 5,
  byte = 6
};

struct vocabulary {
  std::string model = "llama";      // tokenizer.ggml.model: "llama" is SentencePiece
  std::vector<std::string> pieces;  // as the file stores them
  std::vector<float> scores;        // merge priority, higher first; one per piece
  std::vector<token_kind> kinds;    // one per piece, or empty when the file has none
  int bos = 1;
  int eos = 2;

  [[nodiscard]] int size() const { return static_cast<int>(pieces.size()); }
};

namespace detail {

inline constexpr std::string_view sentencepiece_space = "\xE2\x96\x81";  // U+2581 "▁"

inline std::string normalize_piece(std::string_view piece) {
  std::string text;
  text.reserve(piece.size());
  for (std::size_t i = 0; i < piece.size();) {
    if (piece.substr(i, sentencepiece_space.size()) == sentencepiece_space) {
      text.push_back(' ');
      i += sentencepiece_space.size();
    } else {
      text.push_back(piece[i++]);
    }
  }
  return text;
}

// The byte of a "<0xNN>" piece, or -1.
inline int byte_token_value(std::string_view piece) {
  auto hex = [](char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                  : -1;
  };
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  const int high = hex(piece[3]);
  const int low = hex(piece[4]);
  return high < 0 || low < 0 ? -1 : high * 16 + low;
}

// The length of the UTF-8 character that starts with `lead`; 1 for a stray or invalid byte.
inline std::size_t utf8_length(unsigned char lead) {
  return lead >= 0xF0 && lead < 0xF8 ? 4
         : lead >= 0xE0              ? (lead < 0xF0 ? 3 : 1)
         : lead >= 0xC0              ? 2
                                     : 1;
}

}  // namespace detail

class tokenizer {
 public:
  explicit tokenizer(const vocabulary& vocab) {
    const int size = vocab.size();
    require(size > 0, "infuse::llama::tokenizer", "vocab.pieces.size()", size, "at least 1");
    require(vocab.model == "llama", "infuse::llama::tokenizer", "vocab.model", vocab.model,
            "\"llama\" (SentencePiece); other tokenizers are not supported");
    require(vocab.scores.size() == vocab.pieces.size(), "infuse::llama::tokenizer",
            "vocab.scores.size()", vocab.scores.size(), "one score per piece");
    require(vocab.kinds.empty() || vocab.kinds.size() == vocab.pieces.size(),
            "infuse::llama::tokenizer", "vocab.kinds.size()", vocab.kinds.size(),
            "0 or one kind per piece");
    require(vocab.bos >= 0 && vocab.bos < size, "infuse::llama::tokenizer", "vocab.bos", vocab.bos,
            "a token id below the vocabulary size");
    require(vocab.eos >= 0 && vocab.eos < size, "infuse::llama::tokenizer", "vocab.eos", vocab.eos,
            "a token id below the vocabulary size");
    bos_ = vocab.bos;
    eos_ = vocab.eos;
    scores_ = vocab.scores;
    byte_ids_.fill(-1);
    texts_.reserve(vocab.pieces.size());
    for (int id = 0; id < size; ++id) {
      const auto kind = vocab.kinds.empty() ? token_kind::normal : vocab.kinds[id];
      const int byte = detail::byte_token_value(vocab.pieces[id]);
      if (byte >= 0) {
        texts_.emplace_back(1, static_cast<char>(byte));
        if (byte_ids_[byte] < 0) byte_ids_[byte] = id;
      } else if (id == vocab.bos || id == vocab.eos || kind == token_kind::control ||
                 kind == token_kind::unknown || kind == token_kind::unused) {
        texts_.emplace_back();  // never produced by encode; decodes to nothing
      } else {
        texts_.push_back(detail::normalize_piece(vocab.pieces[id]));
        ids_.emplace(texts_.back(), id);  // a duplicate piece keeps its first id
      }
    }
  }

  [[nodiscard]] int size() const { return static_cast<int>(texts_.size()); }
  [[nodiscard]] int bos() const { return bos_; }
  [[nodiscard]] int eos() const { return eos_; }

  // The text of `id` when it follows `previous` (-1 at the start): SentencePiece's dummy-prefix
  // space is dropped from the first piece of a text.
  [[nodiscard]] std::string_view decode(int previous, int id) const {
    require(id >= 0 && id < size(), "infuse::llama::tokenizer::decode", "id", id,
            "a token id below the vocabulary size " + std::to_string(size()));
    std::string_view text = texts_[id];
    if ((previous < 0 || previous == bos_) && !text.empty() && text.front() == ' ') {
      text.remove_prefix(1);
    }
    return text;
  }

  [[nodiscard]] std::string decode(std::span<const int> ids) const {
    std::string text;
    int previous = -1;
    for (const int id : ids) {
      text.append(decode(previous, id));
      previous = id;
    }
    return text;
  }

  [[nodiscard]] std::vector<int> encode(std::string_view text, bool add_bos, bool add_eos) const {
    std::vector<int> ids;
    if (add_bos) ids.push_back(bos_);
    const std::size_t first = ids.size();
    if (!text.empty()) {
      const std::string prefixed = " " + std::string(text);
      for (std::size_t i = 0; i < prefixed.size();) {
        const std::size_t length = std::min(
            detail::utf8_length(static_cast<unsigned char>(prefixed[i])), prefixed.size() - i);
        if (const auto found = ids_.find(prefixed.substr(i, length)); found != ids_.end()) {
          ids.push_back(found->second);
        } else {
          for (std::size_t b = i; b < i + length; ++b) ids.push_back(byte_id(prefixed, b));
        }
        i += length;
      }
      merge_pairs(ids, first);
    }
    if (add_eos) ids.push_back(eos_);
    return ids;
  }

 private:
  int byte_id(std::string_view text, std::size_t at) const {
    const int id = byte_ids_[static_cast<unsigned char>(text[at])];
    require(id >= 0, "infuse::llama::tokenizer::encode", "text[" + std::to_string(at) + "]",
            static_cast<int>(static_cast<unsigned char>(text[at])),
            "a character with a piece or a byte token in the vocabulary");
    return id;
  }

  // Merges the best-scoring adjacent pair of ids[first..] until no pair forms a piece.
  void merge_pairs(std::vector<int>& ids, std::size_t first) const {
    std::string merged;
    while (true) {
      float best_score = 0.0f;
      int best_id = -1;
      std::size_t best_at = 0;
      for (std::size_t i = first; i + 1 < ids.size(); ++i) {
        merged.assign(texts_[ids[i]]).append(texts_[ids[i + 1]]);
        const auto found = ids_.find(merged);
        if (found != ids_.end() && (best_id < 0 || scores_[found->second] > best_score)) {
          best_score = scores_[found->second];
          best_id = found->second;
          best_at = i;
        }
      }
      if (best_id < 0) return;
      ids[best_at] = best_id;
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
  }

  std::vector<std::string> texts_;  // per id: the text it decodes to
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;  // text -> id, for normal and user-defined pieces
  std::array<int, 256> byte_ids_{};           // byte -> id of its "<0xNN>" token, or -1
  int bos_ = 1;
  int eos_ = 2;
};

}  // namespace infuse::llama
