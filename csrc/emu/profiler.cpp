// The checked flavour's profiler: the memory counters Nsight Compute would report, from the
// __tsan_* hooks that already see every access of the kernels (race_detector.cpp forwards them
// here while profiling is on).
//
// An access belongs to the kernel when the innermost frame of kernel code (namespace
// linfusion_ops, not linfusion_ops::emu) is nearer than any frame of the emulator
// (linfusion_ops::emu, nvcuda::wmma); other code (std::, c10::) takes the category of its
// caller. A shadow call stack per thread, kept by __tsan_func_entry / exit, gives that category
// and a hash of the call sites, so that an access site is "this instruction reached through
// these calls" whatever the host compiler inlined. A warp-level *request* is the k-th execution
// of one site by the lanes of a warp within a barrier interval. Addresses are classified as
// shared (the static and dynamic shared-memory ranges of the launch), local (the fiber's stack,
// the launching thread's stack that holds the kernel parameters, the emulator's threadIdx /
// blockIdx / blockDim / gridDim: ignored) or global (everything else). WMMA instructions are
// counted by the WMMA emulation itself (profile_tile_access, profile_mma).
//
// Models (benchmarks/README.md, "Emulator profile"): a global request costs the distinct 32-byte sectors its lanes
// touch; a shared request is served in phases (accesses up to 4 bytes: the 32 lanes at once;
// 8 bytes: two halves of 16 lanes; 16 bytes: four quarters of 8 lanes) and each phase costs as
// many wavefronts as the largest number of distinct 4-byte words one of the 32 banks holds.
//
// The hooks call in with profiler_flags.busy false; every entry point below is not instrumented
// and sets busy while it runs, so that the instrumented library code it calls (containers,
// strings) returns from the hooks at once.
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "emu/runtime.h"

#define LINFUSION_EMU_NO_TSAN __attribute__((no_sanitize("thread")))

namespace linfusion_ops {
namespace emu {

ProfilerFlags profiler_flags{false, false};

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxDepth = 64;

enum Category : uint8_t { kNeutral = 0, kKernel = 1, kEmulator = 2 };

struct Busy {
  LINFUSION_EMU_NO_TSAN Busy() { profiler_flags.busy = true; }
  LINFUSION_EMU_NO_TSAN ~Busy() { profiler_flags.busy = false; }
};

LINFUSION_EMU_NO_TSAN inline uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  return h * 0xFF51AFD7ED558CCDull;
}

// Per thread: the shadow call stack (frame 0 is the fiber's entry).
uint64_t g_hash[kMaxThreads][kMaxDepth + 1];
uint8_t g_effective[kMaxThreads][kMaxDepth + 1];  // innermost non-neutral category so far
int g_depth[kMaxThreads];

// Function category cache, direct-mapped by the callee's code address.
constexpr int kCacheSize = 1 << 13;
uintptr_t g_cache_pc[kCacheSize];
uint8_t g_cache_category[kCacheSize];

Category category_of_mangled(const std::string& m) {
  if (m.rfind("_Z", 0) != 0) return kNeutral;
  size_t i = 2;
  if (i < m.size() && m[i] == 'Z') ++i;  // a local entity: classified by its enclosing function
  if (i < m.size() && m[i] == 'N') {
    ++i;
    while (i < m.size() && (m[i] == 'K' || m[i] == 'V' || m[i] == 'r' || m[i] == 'R' || m[i] == 'O')) ++i;
  }
  const std::string rest = m.substr(i);
  if (rest.rfind("13linfusion_ops3emu", 0) == 0 || rest.rfind("6nvcuda", 0) == 0) return kEmulator;
  if (rest.rfind("13linfusion_ops", 0) == 0) return kKernel;
  return kNeutral;
}

struct Access {
  uint64_t key;
  uint32_t warp;
  uint32_t k;
  uintptr_t address;
  uint32_t bytes;
  uint16_t lane;
  bool write;
  bool shared;
  const void* pc;
};

struct Site {
  const void* pc = nullptr;  // the access, or nullptr for a WMMA site (then file / line)
  const char* file = nullptr;
  int line = 0;
  bool shared = false;
  bool write = false;
  ProfileCounters counters;
};

struct LaunchState {
  bool active = false;
  ProfileRecord record;
  std::unordered_map<uint64_t, Site> sites;
  std::unordered_set<uint64_t> load_sectors, store_sectors, block_load, block_store;
  std::vector<Access> accesses;                // this barrier interval's
  std::unordered_map<uint64_t, uint32_t> executions;  // (thread, site) -> count this interval
  uint32_t interval = 0;
  uintptr_t os_stack_begin = 0, os_stack_end = 0;
};
LaunchState g_launch;
std::vector<ProfileRecord> g_records;
std::unordered_map<const void*, std::string> g_where;  // pc -> file:line

// One lane's access as the hardware would split it.
struct LaneAccess {
  int lane;
  uintptr_t address;
  uint32_t bytes;
};

void count_global(const std::vector<LaneAccess>& lanes, bool write, Site& site) {
  std::vector<uint64_t> sectors, bytes_touched;
  uint64_t bytes = 0;
  for (const LaneAccess& a : lanes) {
    bytes += a.bytes;
    for (uint64_t s = a.address >> 5; s <= (a.address + a.bytes - 1) >> 5; ++s) sectors.push_back(s);
    for (uint64_t b = a.address; b < a.address + a.bytes; ++b) bytes_touched.push_back(b);
  }
  std::sort(sectors.begin(), sectors.end());
  sectors.erase(std::unique(sectors.begin(), sectors.end()), sectors.end());
  std::sort(bytes_touched.begin(), bytes_touched.end());  // lanes reading one address: a broadcast
  bytes_touched.erase(std::unique(bytes_touched.begin(), bytes_touched.end()), bytes_touched.end());
  ProfileCounters& c = write ? g_launch.record.global_store : g_launch.record.global_load;
  for (ProfileCounters* t : {&c, &site.counters}) {
    t->requests += 1;
    t->bytes += bytes;
    t->units += sectors.size();
    t->ideal += bytes_touched.size();
  }
  auto& launch_set = write ? g_launch.store_sectors : g_launch.load_sectors;
  auto& block_set = write ? g_launch.block_store : g_launch.block_load;
  for (uint64_t s : sectors) {
    launch_set.insert(s);
    block_set.insert(s);
  }
}

// Wavefronts of one shared-memory request: phases of 32 / phases lanes, each costing the
// largest count of distinct words in one bank.
void count_shared(const std::vector<LaneAccess>& lanes, int phases, bool write, Site& site) {
  uint64_t bytes = 0, wavefronts = 0, ideal = 0;
  const int per_phase = 32 / phases;
  for (int p = 0; p < phases; ++p) {
    std::vector<uint64_t> words;
    for (const LaneAccess& a : lanes) {
      if (a.lane / per_phase != p) continue;
      for (uint64_t w = a.address >> 2; w <= (a.address + a.bytes - 1) >> 2; ++w) words.push_back(w);
    }
    if (words.empty()) continue;
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    int per_bank[32] = {};
    int most = 0;
    for (uint64_t w : words) most = std::max(most, ++per_bank[w % 32]);
    wavefronts += static_cast<uint64_t>(most);
    ideal += (words.size() + 31) / 32;
  }
  for (const LaneAccess& a : lanes) bytes += a.bytes;
  ProfileCounters& c = write ? g_launch.record.shared_store : g_launch.record.shared_load;
  for (ProfileCounters* t : {&c, &site.counters}) {
    t->requests += 1;
    t->bytes += bytes;
    t->units += wavefronts;
    t->ideal += ideal;
  }
}

int phases_for(uint32_t bytes) { return bytes >= 16 ? 4 : bytes == 8 ? 2 : 1; }

Site& site_for(uint64_t key, const void* pc, const char* file, int line, bool shared, bool write) {
  auto [it, inserted] = g_launch.sites.try_emplace(key);
  if (inserted) {
    it->second.pc = pc;
    it->second.file = file;
    it->second.line = line;
    it->second.shared = shared;
    it->second.write = write;
  }
  return it->second;
}

void flush_interval() {
  std::vector<Access>& acc = g_launch.accesses;
  std::sort(acc.begin(), acc.end(), [](const Access& a, const Access& b) {
    if (a.warp != b.warp) return a.warp < b.warp;
    if (a.key != b.key) return a.key < b.key;
    return a.k < b.k;
  });
  std::vector<LaneAccess> lanes;
  for (size_t i = 0; i < acc.size();) {
    size_t j = i;
    lanes.clear();
    uint32_t widest = 0;
    while (j < acc.size() && acc[j].warp == acc[i].warp && acc[j].key == acc[i].key &&
           acc[j].k == acc[i].k) {
      lanes.push_back({acc[j].lane, acc[j].address, acc[j].bytes});
      widest = std::max(widest, acc[j].bytes);
      ++j;
    }
    Site& site = site_for(acc[i].key, acc[i].pc, nullptr, 0, acc[i].shared, acc[i].write);
    if (acc[i].shared) {
      count_shared(lanes, phases_for(widest), acc[i].write, site);
    } else {
      count_global(lanes, acc[i].write, site);
    }
    i = j;
  }
  acc.clear();
  g_launch.executions.clear();
}

LINFUSION_EMU_NO_TSAN bool in_shared(uintptr_t address) {
  for (int i = 0; i < block_state.range_count; ++i) {
    const SmemRange& r = block_state.ranges[i];
    if (address - r.begin < r.size) return true;
  }
  return false;
}

LINFUSION_EMU_NO_TSAN bool is_local(uintptr_t address) {
  if (address - block_state.stack_begin < block_state.stack_end - block_state.stack_begin) return true;
  if (address - g_launch.os_stack_begin < g_launch.os_stack_end - g_launch.os_stack_begin) return true;
  const uintptr_t specials[] = {reinterpret_cast<uintptr_t>(&threadIdx),
                                reinterpret_cast<uintptr_t>(&blockIdx),
                                reinterpret_cast<uintptr_t>(&blockDim),
                                reinterpret_cast<uintptr_t>(&gridDim)};
  for (uintptr_t s : specials) {
    if (address - s < sizeof(dim3)) return true;
  }
  return false;
}

LINFUSION_EMU_NO_TSAN void reset_stacks() {
  for (int t = 0; t < kMaxThreads; ++t) {
    g_depth[t] = 0;
    g_hash[t][0] = 0;
    g_effective[t][0] = kNeutral;
  }
}

void add(ProfileCounters& a, const ProfileCounters& b) {
  a.requests += b.requests;
  a.bytes += b.bytes;
  a.units += b.units;
  a.ideal += b.ideal;
}

}  // namespace

LINFUSION_EMU_NO_TSAN void profile_func_entry(const void* caller_pc, const void* callee_pc) {
  const int t = block_state.thread;
  if (t < 0 || t >= kMaxThreads) return;
  const uintptr_t pc = reinterpret_cast<uintptr_t>(callee_pc);
  const int slot = static_cast<int>((pc >> 4) & (kCacheSize - 1));
  uint8_t category;
  if (g_cache_pc[slot] == pc) {
    category = g_cache_category[slot];
  } else {
    Busy busy;
    category = category_of_mangled(function_name_at(callee_pc));
    g_cache_pc[slot] = pc;
    g_cache_category[slot] = category;
  }
  const int d = g_depth[t]++;
  if (d >= kMaxDepth) return;
  g_hash[t][d + 1] = mix(g_hash[t][d], reinterpret_cast<uintptr_t>(caller_pc));
  g_effective[t][d + 1] = category == kNeutral ? g_effective[t][d] : category;
}

LINFUSION_EMU_NO_TSAN void profile_func_exit() {
  const int t = block_state.thread;
  if (t < 0 || t >= kMaxThreads || g_depth[t] == 0) return;
  --g_depth[t];
}

LINFUSION_EMU_NO_TSAN void profile_access(uintptr_t address, size_t bytes, bool write, bool shared,
                                          const void* pc) {
  const int t = block_state.thread;
  if (t < 0 || t >= kMaxThreads || !g_launch.active) return;
  const int d = g_depth[t] < kMaxDepth ? g_depth[t] : kMaxDepth;
  if (g_effective[t][d] != kKernel) return;
  if (!shared && is_local(address)) return;
  Busy busy;
  if (block_state.interval != g_launch.interval) {
    flush_interval();
    g_launch.interval = block_state.interval;
  }
  const uint64_t key = mix(g_hash[t][d], reinterpret_cast<uintptr_t>(pc));
  const uint32_t k = g_launch.executions[mix(key, static_cast<uint64_t>(t))]++;
  g_launch.accesses.push_back({key, static_cast<uint32_t>(t / 32), k, address,
                               static_cast<uint32_t>(bytes), static_cast<uint16_t>(t % 32), write,
                               shared, pc});
}

LINFUSION_EMU_NO_TSAN void profile_tile_access(const void* ptr, unsigned ldm,
                                               unsigned element_bytes, bool write) {
  if (!profiler_flags.on || !g_launch.active || block_state.thread < 0) return;
  Busy busy;
  const char* file = nullptr;
  int line = 0;
  collective_site(&file, &line);
  const uintptr_t base = reinterpret_cast<uintptr_t>(ptr);
  const bool shared = in_shared(base);
  const uint64_t key = mix(mix(reinterpret_cast<uintptr_t>(file), static_cast<uint64_t>(line)),
                           element_bytes * 2 + write);
  Site& site = site_for(key, nullptr, file, line, shared, write);
  std::vector<LaneAccess> lanes;
  if (element_bytes == 2) {
    // ldmatrix.x4: lane l gives the address of memory row l % 16, half l / 16 of the tile.
    for (int l = 0; l < 32; ++l) {
      lanes.push_back({l, base + uintptr_t(l % 16) * ldm * 2 + uintptr_t(l / 16) * 16, 16});
    }
    if (shared) {
      count_shared(lanes, 4, write, site);
    } else {
      count_global(lanes, write, site);
    }
    return;
  }
  // fp32 accumulator: four instructions of 8 bytes per lane, lane l at row l / 4 (+ 8),
  // columns 2 (l % 4) (+ 8).
  for (int j = 0; j < 4; ++j) {
    lanes.clear();
    for (int l = 0; l < 32; ++l) {
      const uintptr_t row = uintptr_t(l / 4 + 8 * (j & 1)), col = uintptr_t((l % 4) * 2 + 8 * (j >> 1));
      lanes.push_back({l, base + (row * ldm + col) * element_bytes, 2 * element_bytes});
    }
    if (shared) {
      count_shared(lanes, 2, write, site);
    } else {
      count_global(lanes, write, site);
    }
  }
}

LINFUSION_EMU_NO_TSAN void profile_mma() {
  if (!profiler_flags.on || !g_launch.active) return;
  g_launch.record.mma += 1;
}

LINFUSION_EMU_NO_TSAN void profile_begin_launch(const std::string& kernel, dim3 grid, dim3 block,
                                                size_t dynamic_smem, size_t static_smem) {
  if (!profiler_flags.on) return;
  Busy busy;
  g_launch = LaunchState{};
  g_launch.active = true;
  g_launch.record.kernel = kernel;
  g_launch.record.grid = grid;
  g_launch.record.block = block;
  g_launch.record.dynamic_smem = dynamic_smem;
  g_launch.record.static_smem = static_smem;
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* stack = nullptr;
    size_t size = 0;
    pthread_attr_getstack(&attr, &stack, &size);
    g_launch.os_stack_begin = reinterpret_cast<uintptr_t>(stack);
    g_launch.os_stack_end = g_launch.os_stack_begin + size;
    pthread_attr_destroy(&attr);
  }
  reset_stacks();
}

LINFUSION_EMU_NO_TSAN void profile_barrier() {
  if (!g_launch.active) return;
  Busy busy;
  flush_interval();
  g_launch.record.barriers += 1;
}

LINFUSION_EMU_NO_TSAN void profile_end_block() {
  if (!g_launch.active) return;
  Busy busy;
  flush_interval();
  g_launch.record.blocks += 1;
  g_launch.record.block_load_sectors += g_launch.block_load.size();
  g_launch.record.block_store_sectors += g_launch.block_store.size();
  g_launch.block_load.clear();
  g_launch.block_store.clear();
  reset_stacks();
}

LINFUSION_EMU_NO_TSAN void profile_end_launch() {
  if (!g_launch.active) return;
  Busy busy;
  ProfileRecord& r = g_launch.record;
  r.load_sectors = g_launch.load_sectors.size();
  r.store_sectors = g_launch.store_sectors.size();
  std::unordered_map<std::string, ProfileSite> by_where;  // sites of one line merged
  for (auto& [key, site] : g_launch.sites) {
    std::string where;
    if (site.pc) {
      auto it = g_where.find(site.pc);
      if (it == g_where.end()) it = g_where.emplace(site.pc, source_line(site.pc)).first;
      where = it->second;
    } else {
      where = std::string(site.file ? site.file : "?") + ":" + std::to_string(site.line);
    }
    const size_t at = where.rfind("csrc/");
    if (at != std::string::npos) where = where.substr(at);
    const std::string id = where + (site.shared ? " shared " : " global ") + (site.write ? "st" : "ld");
    ProfileSite& merged = by_where[id];
    merged.where = where;
    merged.shared = site.shared;
    merged.write = site.write;
    add(merged.counters, site.counters);
  }
  for (auto& [id, site] : by_where) r.sites.push_back(std::move(site));
  std::sort(r.sites.begin(), r.sites.end(), [](const ProfileSite& a, const ProfileSite& b) {
    return a.counters.units > b.counters.units;
  });
  g_records.push_back(std::move(r));
  g_launch = LaunchState{};
}

LINFUSION_EMU_NO_TSAN void set_profiling(bool on) {
  Busy busy;
  profiler_flags.on = on;
  g_launch = LaunchState{};
}

LINFUSION_EMU_NO_TSAN std::vector<ProfileRecord> take_profile() {
  Busy busy;
  std::vector<ProfileRecord> out;
  out.swap(g_records);
  return out;
}

}  // namespace emu
}  // namespace linfusion_ops
