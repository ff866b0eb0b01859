// The bounded reader that every checkpoint and tokenizer parse goes through. A file is read into
// memory once; every read names what it expects, checks that it lies inside the file before
// touching a byte, and on failure throws infuse::error naming the file, the byte offset and what
// was expected, so that a truncated or malformed file can never cause an out-of-bounds read.
#pragma once

#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "infuse/core/error.hpp"

namespace infuse::llama {

// Every supported format is little-endian; reading values with memcpy assumes the host is too.
static_assert(std::endian::native == std::endian::little,
              "infuse::llama: the checkpoint readers need a little-endian host");

// A whole file in memory, shared by everything that holds spans into it (tensors of a checkpoint).
struct file_bytes {
  std::string name;  // the path, for error messages
  std::shared_ptr<const std::vector<std::byte>> data;

  [[nodiscard]] std::span<const std::byte> bytes() const {
    return data ? std::span<const std::byte>(*data) : std::span<const std::byte>();
  }
};

// The message of every format error: "infuse::llama: FILE at byte OFFSET: expected WHAT[, found
// X]".
[[noreturn]] inline void format_error(std::string_view file, std::uint64_t offset,
                                      std::string_view expected, std::string_view found = {}) {
  std::string message = "infuse::llama: ";
  message.append(file).append(" at byte ").append(std::to_string(offset));
  message.append(": expected ").append(expected);
  if (!found.empty()) message.append(", found ").append(found);
  throw error(message);
}

inline file_bytes read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) format_error(path.string(), 0, "a readable file", std::strerror(errno));
  std::vector<std::byte> data;
  std::error_code size_error;
  const auto size = std::filesystem::file_size(path, size_error);
  if (size_error) format_error(path.string(), 0, "a regular file", size_error.message());
  data.resize(size);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(size));
  if (static_cast<std::uint64_t>(in.gcount()) != size) {
    format_error(path.string(), static_cast<std::uint64_t>(in.gcount()),
                 std::to_string(size) + " bytes, the size of the file", "a read error");
  }
  return {path.string(), std::make_shared<const std::vector<std::byte>>(std::move(data))};
}

// a * b and a + b into the last argument, false on overflow: sizes read from a file may overflow.
inline bool checked_multiply(std::uint64_t a, std::uint64_t b, std::uint64_t& product) {
  return !__builtin_mul_overflow(a, b, &product);
}
inline bool checked_add(std::uint64_t a, std::uint64_t b, std::uint64_t& sum) {
  return !__builtin_add_overflow(a, b, &sum);
}

class byte_reader {
 public:
  explicit byte_reader(file_bytes file) : file_(std::move(file)), bytes_(file_.bytes()) {}

  [[nodiscard]] const file_bytes& file() const { return file_; }
  [[nodiscard]] std::uint64_t offset() const { return offset_; }
  [[nodiscard]] std::uint64_t size() const { return bytes_.size(); }
  [[nodiscard]] std::uint64_t remaining() const { return bytes_.size() - offset_; }

  [[noreturn]] void fail(std::uint64_t at, std::string_view expected,
                         std::string_view found = {}) const {
    format_error(file_.name, at, expected, found);
  }

  // `count` bytes starting at absolute offset `at`, checked against the end of the file.
  [[nodiscard]] std::span<const std::byte> range(std::uint64_t at, std::uint64_t count,
                                                 std::string_view what) const {
    if (at > size() || count > size() - at) {
      fail(at, std::string(what) + " (" + std::to_string(count) + " bytes) inside the file",
           "the file ends at byte " + std::to_string(size()));
    }
    return bytes_.subspan(at, count);
  }

  // The next `count` bytes, advancing past them.
  std::span<const std::byte> take(std::uint64_t count, std::string_view what) {
    const auto result = range(offset_, count, what);
    offset_ += count;
    return result;
  }

  // The next little-endian integer or float.
  template <class T>
  requires std::is_arithmetic_v<T> T read(std::string_view what) {
    const auto source = take(sizeof(T), what);
    T value;
    std::memcpy(&value, source.data(), sizeof(T));
    return value;
  }

  std::string read_string(std::uint64_t length, std::string_view what) {
    const auto source = take(length, what);
    return {reinterpret_cast<const char*>(source.data()), source.size()};
  }

  // Moves to absolute offset `at` (the end of the file at most).
  void seek(std::uint64_t at, std::string_view what) {
    if (at > size()) fail(at, what, "the file ends at byte " + std::to_string(size()));
    offset_ = at;
  }

  // Checks that a count of items, each at least `min_item_bytes` long, fits in what is left: it
  // bounds every allocation sized from the file by the file's own size.
  void require_fits(std::uint64_t at, std::uint64_t count, std::uint64_t min_item_bytes,
                    std::string_view what) const {
    if (count > remaining() / min_item_bytes) {
      fail(at,
           std::string(what) + " that fits in the " + std::to_string(remaining()) +
               " bytes left in the file",
           std::to_string(count));
    }
  }

 private:
  file_bytes file_;
  std::span<const std::byte> bytes_;
  std::uint64_t offset_ = 0;
};

}  // namespace infuse::llama
