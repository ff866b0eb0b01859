// The infuse demo: a Llama model with written-down weights (examples/llama/retrieval_model.hpp)
// retrieves a passkey hidden in a haystack of random tokens, run through infuse's fused kernels
// in several configurations side by side: quantized weights (GEMV/GEMM), quantized paged KV cache,
// causal prefill attention, decode attention with a sparsity policy, greedy decoding. One table
// compares their speed, memory and passkey accuracy per context length.
//
// With --model PATH it runs a real llama2.c or GGUF checkpoint instead: the same configurations
// generate text from a prompt, and the table shows their speed and memory.
//
// With --speculative it runs self-speculative decoding instead: an int2 copy of the model drafts
// tokens that the int8 model verifies (examples/llama/speculative.hpp), on the passkey task or on
// the checkpoint, against the int8 model decoding alone in the same run.
//
// With --speed it times decoding of a model of TinyLlama's 1.1B-parameter shape with random int4
// weights against the roofline: the bytes a token must read over the measured read bandwidth.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <infuse/infuse.hpp>
#include <infuse/sparse/sparse.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "llama/gguf.hpp"
#include "llama/llama2c.hpp"
#include "llama/model.hpp"
#include "llama/passkey.hpp"
#include "llama/retrieval_model.hpp"
#include "llama/speculative.hpp"
#include "llama/tokenizer.hpp"
#if defined(INFUSE_DEMO_BANDWIDTH)
#include "support/cpu_bandwidth.hpp"
#endif

namespace {

namespace llama = infuse::llama;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace kv = infuse::kv;

// ---- the configurations -------------------------------------------------------------------------

using int8_weights = quant::int_<8, quant::per_channel>;
using int8_kv = quant::int_<8, quant::per_channel>;

struct f32 {
  static constexpr const char* name = "f32";
  static constexpr const char* about = "float weights and KV cache, dense attention (baseline)";
  using weights = quant::none<float>;
  using k = quant::none<float>;
  using v = quant::none<float>;
  using layout = kv::paged<16>;
  using sparsity = sparse::dense;
  static sparsity::params params() { return {}; }
};

struct int8 {
  static constexpr const char* name = "int8";
  static constexpr const char* about = "int8 weights (per row), int8 KV (per token and head)";
  using weights = int8_weights;
  using k = int8_kv;
  using v = int8_kv;
  using layout = kv::paged<16>;
  using sparsity = sparse::dense;
  static sparsity::params params() { return {}; }
};

struct int4 {
  static constexpr const char* name = "int4";
  static constexpr const char* about = "int4 weights (groups of 128), int4 KV (groups of 32)";
  using weights = quant::int_<4, 128>;
  using k = quant::int_<4, 32>;
  using v = quant::int_<4, 32>;
  using layout = kv::paged<16>;
  using sparsity = sparse::dense;
  static sparsity::params params() { return {}; }
};

struct window {
  static constexpr const char* name = "window";
  static constexpr const char* about =
      "int8; decode sees 4 sink tokens + the last 256 (StreamingLLM)";
  using weights = int8_weights;
  using k = int8_kv;
  using v = int8_kv;
  using layout = kv::paged<16>;
  using sparsity = sparse::window;
  static sparsity::params params() { return {.sink = 4, .window = 256}; }
};

struct quest {
  static constexpr const char* name = "quest";
  static constexpr const char* about =
      "int8; decode reads the 16 pages of highest key bound (Quest)";
  using weights = int8_weights;
  using k = int8_kv;
  using v = int8_kv;
  using layout = kv::paged<16>;
  using sparsity = sparse::quest<16>;
  static sparsity::params params() { return {}; }
};

struct coverage {
  static constexpr const char* name = "coverage";
  static constexpr const char* about =
      "int8; decode reads the pages holding ~90% of the mass (ZipVL)";
  using weights = int8_weights;
  using k = int8_kv;
  using v = int8_kv;
  using layout = kv::paged<16>;
  using sparsity = sparse::coverage<90>;
  static sparsity::params params() { return {}; }
};

// The draft of self-speculative decoding: the int8 configuration's weights at 2 bits. With 4
// levels a group, a zero point keeps 0 and the group's extreme both exact where the symmetric
// int2 code has 3 levels; groups of 32 follow the weights' local range. KV at 2 bits likewise.
struct int2_draft {
  static constexpr const char* name = "int2";
  static constexpr const char* about =
      "int2 weights and KV (groups of 32, zero point): the speculative draft";
  using weights = quant::int_<2, 32, quant::zero_point>;
  using k = quant::int_<2, 32, quant::zero_point>;
  using v = quant::int_<2, 32, quant::zero_point>;
  using layout = kv::paged<16>;
  using sparsity = sparse::dense;
  static sparsity::params params() { return {}; }
};

// The speed run: int4 weights (groups of 128) with int8 activations, int8 KV per token.
struct int4_speed {
  static constexpr const char* name = "int4 speed";
  using weights = quant::int_<4, 128>;
  using activations = infuse::gemm::int8_activations;
  using k = int8_kv;
  using v = int8_kv;
  using layout = kv::paged<16>;
  using sparsity = sparse::dense;
};

// ---- options ------------------------------------------------------------------------------------

struct options {
  std::vector<std::int64_t> lengths = {1024, 4096, 16384};
  int trials = 0;                    // 0: the defaults per length (fewer at long lengths)
  std::vector<std::string> configs;  // empty: all
  int threads = 0;
  std::string model;
  std::string prompt = "Once upon a time";
  int generate = 32;
  float temperature = 0.0f;
  float top_p = 0.9f;
  std::uint64_t seed = 2026;
  int decode_tokens = 16;  // decoded after the answer, to time decode
  bool speculative = false;
  int gamma = 4;
  bool speed = false;
  std::int64_t speed_prompt = 1024;  // --speed: the first --lengths value when given
};

constexpr const char* usage = R"(usage: demo [options]

Runs a 2-layer Llama model with written-down weights on passkey retrieval (a KEY and a value
hidden at a random depth of a haystack of random tokens; the model must name the value) in
several configurations of infuse's kernels, and prints one table: prefill and decode speed,
weight and KV-cache bytes, and passkey accuracy per context length.

options:
  --lengths A,B,...  context lengths in tokens (default 1024,4096,16384)
  --trials N         passkeys per length (default 8 up to 1024 tokens, 4 up to 4096, 1 above)
  --configs A,B,...  configurations to run (default all): f32, int8, int4, window, quest, coverage
  --threads N        CPU threads (default: OpenMP's default, all cores)
  --seed N           seed of the haystacks and passkeys (default 2026)
  --model PATH       a llama2.c (.bin, tokenizer.bin beside it) or GGUF checkpoint: generate text
                     from --prompt with each configuration instead of the passkey task
  --prompt TEXT      the prompt for --model (default "Once upon a time")
  --generate N       tokens to generate with --model (default 32)
  --temperature T    sampling temperature for --model (default 0: greedy)
  --top-p P          nucleus share for --model sampling (default 0.9)
  --speculative      self-speculative decoding instead of the table: an int2 copy of the model
                     drafts --gamma tokens a step, the int8 model verifies them in one pass
                     (lossless: the int8 model's own tokens); prints passkey accuracy, the
                     acceptance rate and the speed-up over the int8 model decoding alone, over
                     --generate tokens after the prompt (with --model too; --temperature applies)
  --gamma N          draft tokens per speculative step (default 4)
  --speed            time decoding of a model of TinyLlama's 1.1B shape (22 layers, dim 2048,
                     32 query / 4 KV heads, vocab 32000) with random int4 weights and int8 KV,
                     after a prompt of the first --lengths value (default 1024 here), over
                     --generate tokens; prints tokens/s and the share of the roofline (weight
                     and KV bytes per token over the read bandwidth measured in the same run)
  --help             this text
)";

std::vector<std::string> split(std::string_view text) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    parts.emplace_back(text.substr(start, comma - start));
    start = comma + 1;
  }
  return parts;
}

std::int64_t parse_integer(std::string_view flag, const std::string& text, std::int64_t low,
                           std::int64_t high) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < low || value > high) {
    throw std::invalid_argument(std::string(flag) + " takes an integer from " +
                                std::to_string(low) + " to " + std::to_string(high) + ", not '" +
                                text + "'");
  }
  return value;
}

float parse_float(std::string_view flag, const std::string& text, float low, float high) {
  char* end = nullptr;
  const float value = std::strtof(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(value >= low && value <= high)) {
    throw std::invalid_argument(std::string(flag) + " takes a number from " + std::to_string(low) +
                                " to " + std::to_string(high) + ", not '" + text + "'");
  }
  return value;
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(usage, stdout);
      std::exit(0);
    }
    if (flag == "--speculative") {
      o.speculative = true;
      continue;
    }
    if (flag == "--speed") {
      o.speed = true;
      continue;
    }
    constexpr std::string_view with_value[] = {
        "--lengths", "--trials",   "--configs",     "--threads", "--seed", "--model",
        "--prompt",  "--generate", "--temperature", "--top-p",   "--gamma"};
    if (std::find(std::begin(with_value), std::end(with_value), flag) == std::end(with_value)) {
      throw std::invalid_argument("unknown flag: " + std::string(flag));
    }
    if (i + 1 >= argc) throw std::invalid_argument(std::string(flag) + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--lengths") {
      o.lengths.clear();
      for (const auto& part : split(value)) {
        o.lengths.push_back(parse_integer(flag, part, 3, std::int64_t{1} << 20));
      }
      o.speed_prompt = o.lengths.front();
    } else if (flag == "--trials") {
      o.trials = static_cast<int>(parse_integer(flag, value, 1, 1000));
    } else if (flag == "--configs") {
      o.configs = split(value);
    } else if (flag == "--threads") {
      o.threads = static_cast<int>(parse_integer(flag, value, 1, 1024));
    } else if (flag == "--seed") {
      o.seed = static_cast<std::uint64_t>(parse_integer(flag, value, 0, INT64_MAX));
    } else if (flag == "--model") {
      o.model = value;
    } else if (flag == "--prompt") {
      o.prompt = value;
    } else if (flag == "--temperature") {
      o.temperature = parse_float(flag, value, 0.0f, 100.0f);
    } else if (flag == "--top-p") {
      o.top_p = parse_float(flag, value, 1e-6f, 1.0f);
    } else if (flag == "--gamma") {
      o.gamma = static_cast<int>(parse_integer(flag, value, 1, 64));
    } else {  // --generate
      o.generate = static_cast<int>(parse_integer(flag, value, 1, 100000));
    }
  }
  return o;
}

// ---- progress -----------------------------------------------------------------------------------

// A progress bar on stderr, redrawn in place once a run takes more than 2 s; work is counted in
// units the caller chooses.
class progress {
 public:
  explicit progress(double total) : total_(total), start_(clock::now()) {}
  ~progress() {
    if (drawn_) std::fprintf(stderr, "\r%*s\r", 100, "");
  }
  void advance(double units, const std::string& what) {
    done_ += units;
    draw(what);
  }
  void draw(const std::string& what) {
    const double seconds = std::chrono::duration<double>(clock::now() - start_).count();
    if (seconds < 2.0) return;  // a short run needs no bar
    constexpr int width = 30;
    const double share = total_ > 0 ? std::min(1.0, done_ / total_) : 1.0;
    const int filled = static_cast<int>(share * width);
    std::fprintf(stderr, "\r[%s%s] %3d%% %5.0fs  %-50.50s", std::string(filled, '#').c_str(),
                 std::string(width - filled, ' ').c_str(), static_cast<int>(share * 100), seconds,
                 what.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }

 private:
  using clock = std::chrono::steady_clock;
  double total_;
  double done_ = 0;
  clock::time_point start_;
  bool drawn_ = false;
};

// ---- the passkey table --------------------------------------------------------------------------

struct row {
  std::string name;
  std::string about;
  double prefill_tokens = 0, prefill_seconds = 0;  // at the longest length
  double decode_tokens = 0, decode_seconds = 0;
  std::int64_t weight_bytes = 0;
  std::int64_t kv_bytes_per_token = 0;
  std::vector<int> correct;  // per length
  std::vector<int> trials;
};

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

int trials_at(const options& o, std::int64_t length) {
  return o.trials > 0 ? o.trials : length <= 1024 ? 8 : length <= 4096 ? 4 : 1;
}

// Work units of one trial: prefill attention grows as length^2, the rest as length.
double trial_cost(std::int64_t length) {
  return double(length) + double(length) * double(length) / 4096.0;
}

template <class Config>
row run_passkey(const options& o, const infuse::exec::cpu& exec,
                const llama::float_weights& weights, progress& bar) {
  const llama::model<Config> model(weights);
  row r;
  r.name = Config::name;
  r.about = Config::about;
  r.weight_bytes = model.weight_bytes();
  const std::int64_t longest = *std::max_element(o.lengths.begin(), o.lengths.end());
  for (const std::int64_t length : o.lengths) {
    const int trials = trials_at(o, length);
    int correct = 0;
    for (int trial = 0; trial < trials; ++trial) {
      bar.draw(std::string(Config::name) + ", " + std::to_string(length) + " tokens, passkey " +
               std::to_string(trial + 1) + "/" + std::to_string(trials));
      const llama::passkey_prompt prompt = llama::make_passkey_prompt(length, o.seed, trial);
      llama::session<Config> session(model, exec, length + o.decode_tokens, Config::params());
      r.kv_bytes_per_token = session.kv_bytes_per_token();
      // The haystack through prefill; the final KEY through a decode step, whose attention is
      // the configuration's sparsity policy.
      const std::span<const std::int32_t> tokens(prompt.tokens);
      auto start = clock_type::now();
      session.prefill(tokens.first(tokens.size() - 1));
      const double prefill_seconds = seconds_since(start);
      start = clock_type::now();
      session.decode(tokens.back());
      std::int32_t token = session.greedy();
      correct += token == prompt.answer ? 1 : 0;
      for (int step = 0; step < o.decode_tokens; ++step) {
        session.decode(token);
        token = session.greedy();
      }
      const double decode_seconds = seconds_since(start);
      if (length == longest) {
        r.prefill_tokens += double(length - 1);
        r.prefill_seconds += prefill_seconds;
        r.decode_tokens += double(o.decode_tokens + 1);
        r.decode_seconds += decode_seconds;
      }
      bar.advance(trial_cost(length), Config::name);
    }
    r.correct.push_back(correct);
    r.trials.push_back(trials);
  }
  return r;
}

std::string bytes_text(double bytes) {
  char text[32];
  if (bytes >= 1e6) {
    std::snprintf(text, sizeof(text), "%.2f MB", bytes / 1e6);
  } else {
    std::snprintf(text, sizeof(text), "%.0f B", bytes);
  }
  return text;
}

// The table; `lengths` are the accuracy columns (none for generation), `context` the tokens of
// context at which the speeds were measured.
void print_table(const std::vector<std::int64_t>& lengths, std::int64_t context,
                 const std::vector<row>& rows) {
  std::printf("\n%-9s %12s %12s %10s %10s", "config", "prefill t/s", "decode t/s", "weights",
              "KV/token");
  for (const std::int64_t length : lengths) {
    std::printf(" %9s", ("acc@" + std::to_string(length)).c_str());
  }
  std::printf("\n");
  for (const row& r : rows) {
    std::printf("%-9s %12.0f %12.1f %10s %10s", r.name.c_str(),
                r.prefill_tokens / r.prefill_seconds, r.decode_tokens / r.decode_seconds,
                bytes_text(double(r.weight_bytes)).c_str(),
                bytes_text(double(r.kv_bytes_per_token)).c_str());
    for (std::size_t i = 0; i < r.correct.size(); ++i) {
      std::printf(" %9s",
                  (std::to_string(r.correct[i]) + "/" + std::to_string(r.trials[i])).c_str());
    }
    std::printf("\n");
  }
  std::printf(
      "\nprefill and decode speeds at %lld tokens of context; KV/token: K and V of every "
      "layer.\n",
      static_cast<long long>(context));
  for (const row& r : rows) std::printf("  %-9s %s\n", r.name.c_str(), r.about.c_str());
}

// ---- the configurations by name -----------------------------------------------------------------

template <class... Configs>
struct config_list {
  static std::vector<std::string> names() { return {Configs::name...}; }

  // Calls run.template operator()<Config>() for each selected configuration, in list order.
  template <class Run>
  static void for_each(const std::vector<std::string>& selected, Run&& run) {
    const auto chosen = [&](const char* name) {
      return selected.empty() ||
             std::find(selected.begin(), selected.end(), name) != selected.end();
    };
    ((chosen(Configs::name) ? run.template operator()<Configs>() : void()), ...);
  }
};

using all_configs = config_list<f32, int8, int4, window, quest, coverage>;

int run_passkey_table(const options& o, const infuse::exec::cpu& exec) {
  const llama::float_weights weights = llama::retrieval::weights();
  const std::size_t count = o.configs.empty() ? all_configs::names().size() : o.configs.size();
  double total = 0;
  for (const std::int64_t length : o.lengths) total += trials_at(o, length) * trial_cost(length);
  std::printf(
      "infuse %d.%d.%d demo: passkey retrieval with a 2-layer Llama (d=512, 8 heads, "
      "RoPE 1e6) built in code,\n%zu configurations on %d CPU threads\n",
      INFUSE_VERSION_MAJOR, INFUSE_VERSION_MINOR, INFUSE_VERSION_PATCH, count, exec.threads());
  std::vector<row> rows;
  {
    progress bar(total * double(count));
    all_configs::for_each(o.configs, [&]<class Config>() {
      rows.push_back(run_passkey<Config>(o, exec, weights, bar));
    });
  }
  print_table(o.lengths, *std::max_element(o.lengths.begin(), o.lengths.end()), rows);
  return 0;
}

// ---- a real checkpoint --------------------------------------------------------------------------

llama::checkpoint load_checkpoint(const std::string& path) {
  if (path.size() >= 5 && path.ends_with(".gguf")) return llama::load_gguf(path);
  const std::filesystem::path tokenizer =
      std::filesystem::path(path).parent_path() / "tokenizer.bin";
  return std::filesystem::exists(tokenizer) ? llama::load_llama2c(path, tokenizer)
                                            : llama::load_llama2c(path);
}

// A checkpoint with what a run needs of it: float weights, its tokenizer, --prompt encoded.
struct prompted_checkpoint {
  llama::float_weights weights;
  llama::tokenizer tokenizer;
  std::vector<std::int32_t> prompt;
};

prompted_checkpoint load_prompted(const options& o) {
  llama::checkpoint file = load_checkpoint(o.model);
  infuse::require(file.vocab.size() > 0, "demo", "--model", o.model,
                  "a checkpoint with its vocabulary (tokenizer.bin beside a llama2.c file)");
  llama::tokenizer tokenizer(file.vocab);
  const std::vector<int> ids = tokenizer.encode(o.prompt, true, false);
  return {llama::load_weights(file), std::move(tokenizer), {ids.begin(), ids.end()}};
}

// Generates o.generate tokens after `prompt` with one configuration, printing the text; the row
// of the table with its speeds and bytes.
template <class Config>
row generate(const options& o, const infuse::exec::cpu& exec, const llama::float_weights& weights,
             const llama::tokenizer& tokenizer, const std::vector<std::int32_t>& prompt) {
  const llama::model<Config> model(weights);
  llama::session<Config> session(model, exec, std::int64_t(prompt.size()) + o.generate,
                                 Config::params());
  row r;
  r.name = Config::name;
  r.about = Config::about;
  r.weight_bytes = model.weight_bytes();
  r.kv_bytes_per_token = session.kv_bytes_per_token();
  auto start = clock_type::now();
  session.prefill(prompt);
  r.prefill_seconds = seconds_since(start);
  r.prefill_tokens = double(prompt.size());
  std::string text;
  int previous = prompt.back();
  start = clock_type::now();
  const auto next = [&] { return session.sample(o.temperature, o.top_p, o.seed); };
  std::int32_t token = next();
  for (int step = 0; step < o.generate; ++step) {
    text += tokenizer.decode(previous, token);
    previous = token;
    if (step + 1 == o.generate) break;
    session.decode(token);
    token = next();
  }
  r.decode_seconds = seconds_since(start);
  r.decode_tokens = double(o.generate - 1);
  std::printf("\n[%s] %s%s\n", Config::name, o.prompt.c_str(), text.c_str());
  return r;
}

int run_checkpoint(const options& o, const infuse::exec::cpu& exec) {
  const prompted_checkpoint loaded = load_prompted(o);
  const llama::float_weights& weights = loaded.weights;
  const llama::tokenizer& tokenizer = loaded.tokenizer;
  const std::vector<std::int32_t>& prompt = loaded.prompt;
  const auto& c = weights.config;
  std::printf(
      "infuse demo: %s, dim %d, %d layers, %d heads (%d KV), vocab %d; prompt of %zu "
      "tokens, %d generated, %d threads\n",
      o.model.c_str(), c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, prompt.size(),
      o.generate, exec.threads());
  std::vector<row> rows;
  all_configs::for_each(o.configs, [&]<class Config>() {
    try {
      rows.push_back(generate<Config>(o, exec, weights, tokenizer, prompt));
    } catch (const infuse::error& e) {  // a scheme that cannot hold this model's shapes
      std::printf("\n[%s] skipped: %s\n", Config::name, e.what());
    }
  });
  if (rows.empty()) return 1;
  print_table({}, std::int64_t(prompt.size()) + o.generate, rows);
  return 0;
}

// ---- self-speculative decoding
// -------------------------------------------------------------------

using speculative_pair = llama::speculative<int2_draft, int8>;

// One prompt through the int8 model alone and through the self-speculative pair: `count` tokens
// after the prompt from each, timed from the prompt's last token on (prefills excluded).
struct speculative_run {
  std::vector<std::int32_t> alone, speculated;
  double alone_seconds = 0, speculated_seconds = 0;
  llama::speculative_stats stats;
};

speculative_run compare_speculative(const options& o, const infuse::exec::cpu& exec,
                                    const llama::model<int2_draft>& draft,
                                    const llama::model<int8>& target,
                                    std::span<const std::int32_t> prompt, std::int64_t count) {
  speculative_run r;
  const std::int64_t capacity = std::ssize(prompt) + count;
  {
    llama::session<int8> session(target, exec, capacity, int8::params());
    if (prompt.size() > 1) session.prefill(prompt.first(prompt.size() - 1));
    const auto start = clock_type::now();
    session.decode(prompt.back());
    r.alone.push_back(session.sample(o.temperature, 1.0f, o.seed));
    while (std::ssize(r.alone) < count) {
      session.decode(r.alone.back());
      r.alone.push_back(session.sample(o.temperature, 1.0f, o.seed));
    }
    r.alone_seconds = seconds_since(start);
  }
  speculative_pair pair(draft, target, exec, capacity, o.gamma);
  pair.start(prompt);
  const auto start = clock_type::now();
  while (std::ssize(r.speculated) < count) {
    const auto emitted = pair.step(o.temperature, o.seed);
    r.speculated.insert(r.speculated.end(), emitted.begin(), emitted.end());
  }
  r.speculated_seconds = seconds_since(start);
  r.speculated.resize(static_cast<std::size_t>(count));
  r.stats = pair.stats();
  return r;
}

void print_speculative_note(const options& o) {
  std::printf(
      "\nint8 alone: one decode step a token; speculative: the int2 draft proposes %d tokens a "
      "step, the\nint8 model verifies them in one pass (%s). acceptance: accepted draft tokens / "
      "drafted.\nspeeds from the prompt's last token on, prefills excluded. draft: one draft "
      "pass, verify: the\nint8 model's scoring and verification of a step, both in int8 decode "
      "steps. A step with a\naccepted drafts emits a + 1 tokens for gamma * draft + verify: the "
      "speed-up is about\n(a + 1) / (gamma * draft + verify), at most 1 / draft.\n",
      o.gamma,
      o.temperature == 0.0f ? "greedy: the same tokens as int8 alone"
                            : "sampling: distributed as int8 alone");
}

int run_speculative_passkey(const options& o, const infuse::exec::cpu& exec) {
  const llama::float_weights weights = llama::retrieval::weights();
  const llama::model<int2_draft> draft(weights);
  const llama::model<int8> target(weights);
  const std::int64_t count = o.generate;
  std::printf(
      "infuse %d.%d.%d demo: self-speculative passkey retrieval with a 2-layer Llama built in "
      "code,\nint2 draft / int8 target, gamma %d, %lld tokens after each prompt, %d CPU threads\n",
      INFUSE_VERSION_MAJOR, INFUSE_VERSION_MINOR, INFUSE_VERSION_PATCH, o.gamma,
      static_cast<long long>(count), exec.threads());
  double total = 0;
  for (const std::int64_t length : o.lengths) total += trials_at(o, length) * trial_cost(length);
  progress bar(total);
  std::vector<std::string> lines;
  for (const std::int64_t length : o.lengths) {
    const int trials = trials_at(o, length);
    int alone_correct = 0, speculated_correct = 0, same = 0;
    double alone_seconds = 0, speculated_seconds = 0;
    llama::speculative_stats stats;
    for (int trial = 0; trial < trials; ++trial) {
      bar.draw("speculative, " + std::to_string(length) + " tokens, passkey " +
               std::to_string(trial + 1) + "/" + std::to_string(trials));
      const llama::passkey_prompt prompt = llama::make_passkey_prompt(length, o.seed, trial);
      const speculative_run r = compare_speculative(o, exec, draft, target, prompt.tokens, count);
      alone_correct += r.alone.front() == prompt.answer ? 1 : 0;
      speculated_correct += r.speculated.front() == prompt.answer ? 1 : 0;
      same += r.alone == r.speculated ? 1 : 0;
      alone_seconds += r.alone_seconds;
      speculated_seconds += r.speculated_seconds;
      stats.steps += r.stats.steps;
      stats.drafted += r.stats.drafted;
      stats.accepted += r.stats.accepted;
      stats.draft_seconds += r.stats.draft_seconds;
      stats.target_seconds += r.stats.target_seconds;
      bar.advance(trial_cost(length), "speculative");
    }
    const auto fraction = [&](int n) { return std::to_string(n) + "/" + std::to_string(trials); };
    // The costs of a step in int8 decode steps: a draft pass, and the target's verification.
    const double int8_step = alone_seconds / double(count * trials);
    const double draft_cost = stats.draft_seconds / double(stats.drafted) / int8_step;
    const double verify_cost = stats.target_seconds / double(stats.steps) / int8_step;
    char line[200];
    std::snprintf(line, sizeof(line), "%7lld %9s %9s %6s %10.1f%% %12.1f %12.1f %8.2fx %7.2f %7.2f",
                  static_cast<long long>(length), fraction(alone_correct).c_str(),
                  fraction(speculated_correct).c_str(), fraction(same).c_str(),
                  100.0 * stats.acceptance_rate(), double(count * trials) / alone_seconds,
                  double(count * trials) / speculated_seconds, alone_seconds / speculated_seconds,
                  draft_cost, verify_cost);
    lines.emplace_back(line);
  }
  std::printf("\n%7s %9s %9s %6s %11s %12s %12s %9s %7s %7s\n", "length", "acc int8", "acc spec",
              "same", "acceptance", "int8 t/s", "spec t/s", "speed-up", "draft", "verify");
  for (const std::string& line : lines) std::printf("%s\n", line.c_str());
  print_speculative_note(o);
  return 0;
}

int run_speculative_checkpoint(const options& o, const infuse::exec::cpu& exec) {
  const prompted_checkpoint loaded = load_prompted(o);
  const llama::float_weights& weights = loaded.weights;
  const llama::tokenizer& tokenizer = loaded.tokenizer;
  const std::vector<std::int32_t>& prompt = loaded.prompt;
  const llama::model<int2_draft> draft(weights);
  const llama::model<int8> target(weights);
  const speculative_run r = compare_speculative(o, exec, draft, target, prompt, o.generate);
  std::string text;
  int previous = prompt.back();
  for (const std::int32_t token : r.speculated) {
    text += tokenizer.decode(previous, token);
    previous = token;
  }
  std::printf("infuse demo: %s, self-speculative (int2 draft, int8 target, gamma %d), %d threads\n",
              o.model.c_str(), o.gamma, exec.threads());
  std::printf("\n[speculative] %s%s\n", o.prompt.c_str(), text.c_str());
  std::printf(
      "\n%d tokens: int8 alone %.1f t/s, speculative %.1f t/s, speed-up %.2fx; acceptance "
      "%.1f%% (%lld of %lld drafted); same tokens as int8 alone: %s\n",
      o.generate, o.generate / r.alone_seconds, o.generate / r.speculated_seconds,
      r.alone_seconds / r.speculated_seconds, 100.0 * r.stats.acceptance_rate(),
      static_cast<long long>(r.stats.accepted), static_cast<long long>(r.stats.drafted),
      r.alone == r.speculated ? "yes" : "no");
  print_speculative_note(o);
  return 0;
}

}  // namespace

// ---- the speed run ------------------------------------------------------------------------------

int run_speed(const options& o, const infuse::exec::cpu& exec) {
  const llama::model_config shape{2048, 5632, 22, 32, 4, 32000, 2048, 10000.0f, 1e-5f};
  const std::int64_t prompt_tokens = o.speed_prompt;
  infuse::require(prompt_tokens >= 1 && prompt_tokens + o.generate <= 1 << 20, "demo", "--lengths",
                  prompt_tokens, "a prompt of 1 to 2^20 tokens with --generate after it");
  std::printf("building a %d-layer model of TinyLlama's shape with random int4 weights...\n",
              shape.n_layers);
  const llama::model<int4_speed> m(shape, o.seed);
  llama::session<int4_speed> s(m, exec, prompt_tokens + o.generate);
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(prompt_tokens));
  for (std::size_t i = 0; i < prompt.size(); ++i) {
    prompt[i] = static_cast<std::int32_t>((i * 7919 + o.seed) % shape.vocab_size);
  }
  auto start = clock_type::now();
  s.prefill(prompt);
  const double prefill_seconds = seconds_since(start);
  std::int32_t token = s.greedy();
  start = clock_type::now();
  for (int i = 0; i < o.generate; ++i) {
    s.decode(token);
    token = s.greedy();
  }
  const double decode_seconds = seconds_since(start);
  // Bytes one decode step must read: every weight but the embedding table (one row of it), and
  // the KV cache of every layer at the mean context of the timed steps.
  const double weights =
      double(m.weight_bytes()) - double(m.embedding().size()) * 4.0 + double(shape.dim) * 4.0;
  const double kv_per_token = double(s.kv_bytes_per_token());
  const double mean_context = double(prompt_tokens) + double(o.generate) / 2.0;
  const double step_bytes = weights + kv_per_token * mean_context;
  const double step_seconds = decode_seconds / o.generate;
  std::printf("\n%s, %d threads: prompt %lld tokens in %.2f s (%.0f tokens/s)\n", int4_speed::name,
              exec.threads(), static_cast<long long>(prompt_tokens), prefill_seconds,
              double(prompt_tokens) / prefill_seconds);
  std::printf("decode: %d tokens, %.1f ms/token (%.2f tokens/s)\n", o.generate, step_seconds * 1e3,
              1.0 / step_seconds);
  std::printf("bytes per decode step: weights %s + KV %s (%s per token x %.0f tokens)\n",
              bytes_text(weights).c_str(), bytes_text(kv_per_token * mean_context).c_str(),
              bytes_text(kv_per_token).c_str(), mean_context);
#if defined(INFUSE_DEMO_BANDWIDTH)
  const double read_gbps = infuse::bench::cpu::measured_bandwidth().read_gbps;
  const double roofline_seconds = step_bytes / (read_gbps * 1e9);
  std::printf("read bandwidth measured now: %.1f GB/s; roofline %.1f ms/token; reached %.0f%%\n",
              read_gbps, roofline_seconds * 1e3, 100.0 * roofline_seconds / step_seconds);
#else
  std::printf(
      "(the roofline share needs the read-bandwidth probe of the benchmarks: build them)\n");
#endif
  return 0;
}

int main(int argc, char** argv) {
  options o;
  try {
    o = parse(argc, argv);
    for (const std::string& name : o.configs) {
      const auto known = all_configs::names();
      if (std::find(known.begin(), known.end(), name) == known.end()) {
        throw std::invalid_argument("unknown configuration '" + name +
                                    "' (known: f32, int8, int4, window, quest, coverage)");
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo: %s\n\n%s", e.what(), usage);
    return 2;
  }
  try {
    const infuse::exec::cpu exec(o.threads);
    if (o.speed) return run_speed(o, exec);
    if (o.speculative) {
      return o.model.empty() ? run_speculative_passkey(o, exec)
                             : run_speculative_checkpoint(o, exec);
    }
    return o.model.empty() ? run_passkey_table(o, exec) : run_checkpoint(o, exec);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\ndemo: %s\n", e.what());
    return 1;
  }
}
