// The host machine as a benchmark's JSON context names it: CPU model, cores, memory, last-level
// cache, compiler, infuse version and commit. Linux sources (/proc, sysfs, sysconf); "unknown"
// elsewhere.
#pragma once

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <fstream>
#include <string>

#include "infuse/core/config.hpp"
#include "infuse_bench_build.hpp"  // generated at build time: INFUSE_BENCH_COMMIT

namespace infuse::bench {

namespace detail {

inline std::string read_first_line(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

// Number of CPUs in a sysfs CPU list such as "0-7,16-23".
inline long count_cpu_list(const std::string& list) {
  long count = 0;
  std::size_t position = 0;
  while (position < list.size()) {
    std::size_t end = list.find(',', position);
    if (end == std::string::npos) end = list.size();
    const std::string range = list.substr(position, end - position);
    const std::size_t dash = range.find('-');
    count +=
        dash == std::string::npos ? 1 : std::stol(range.substr(dash + 1)) - std::stol(range) + 1;
    position = end + 1;
  }
  return count;
}

// "32768K" or "2M" in sysfs.
inline std::size_t parse_cache_size(const std::string& text) {
  if (text.empty()) return 0;
  std::size_t bytes = std::stoul(text);
  if (text.back() == 'K') bytes <<= 10;
  if (text.back() == 'M') bytes <<= 20;
  return bytes;
}

inline std::string format_gib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f GiB", bytes / (1u << 30));
  return text;
}

inline std::string compiler_name() {
  std::string name;
#if defined(__CUDACC_VER_MAJOR__)
  name = "nvcc " + std::to_string(__CUDACC_VER_MAJOR__) + "." +
         std::to_string(__CUDACC_VER_MINOR__) + " with host compiler ";
#endif
#if defined(__clang__)
  name += "clang " __clang_version__;
#elif defined(__GNUC__)
  name += "g++ " __VERSION__;
#else
  name += "unknown";
#endif
  return name;
}

}  // namespace detail

// Bytes of last-level cache on the whole machine (every instance of it: one per socket or per
// core complex), 0 when sysfs does not say.
inline std::size_t last_level_cache_bytes() {
  const std::string cpu0 = "/sys/devices/system/cpu/cpu0/cache/index";
  std::size_t bytes = 0;
  long sharing = 1;
  int level = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string entry = cpu0 + std::to_string(index) + "/";
    const std::string level_text = detail::read_first_line(entry + "level");
    if (level_text.empty()) break;
    if (detail::read_first_line(entry + "type") == "Instruction" || std::stoi(level_text) < level) {
      continue;
    }
    level = std::stoi(level_text);
    bytes = detail::parse_cache_size(detail::read_first_line(entry + "size"));
    sharing = detail::count_cpu_list(detail::read_first_line(entry + "shared_cpu_list"));
  }
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  if (bytes == 0 || sharing <= 0 || cpus <= 0) return 0;
  return bytes * static_cast<std::size_t>((cpus + sharing - 1) / sharing);
}

inline std::size_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<std::size_t>(pages) * page_size : 0;
}

inline std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.starts_with("model name")) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

// Context entries for the host: every benchmark main adds these before it runs.
inline void add_host_context() {
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("cpu_cores", std::to_string(sysconf(_SC_NPROCESSORS_ONLN)));
  benchmark::AddCustomContext("memory", detail::format_gib(double(physical_memory_bytes())));
  benchmark::AddCustomContext("last_level_cache",
                              std::to_string(last_level_cache_bytes() >> 20) + " MiB");
  benchmark::AddCustomContext("compiler", detail::compiler_name());
  benchmark::AddCustomContext("infuse_version", std::to_string(INFUSE_VERSION_MAJOR) + "." +
                                                    std::to_string(INFUSE_VERSION_MINOR) + "." +
                                                    std::to_string(INFUSE_VERSION_PATCH));
  benchmark::AddCustomContext("infuse_commit", INFUSE_BENCH_COMMIT);
  benchmark::AddCustomContext("build_type", INFUSE_BENCH_BUILD_TYPE);
}

}  // namespace infuse::bench
