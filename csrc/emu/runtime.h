// The emulator's host side, shared by its module (module.cpp), the broken test kernels
// (selftest.cpp) and the checked flavour's race detector (race_detector.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "emu/emu.h"

namespace linfusion_ops {
namespace emu {

// Knobs, applied to the launches that follow.
// multiprocessor_count 0: the profile's count. registers_per_thread: the registers every kernel is
// taken to use in cudaOccupancyMaxActiveBlocksPerMultiprocessor (0: registers do not limit it).
void set_device(const std::string& name, int multiprocessor_count, int registers_per_thread = 0);
void set_schedule(const std::string& order, uint64_t seed);
struct Settings {
  std::string device;
  int multiprocessor_count;
  int registers_per_thread;
  std::string schedule;
  uint64_t seed;
};
Settings current_settings();
std::vector<std::string> device_names();

// Demangled names (with template arguments) of the kernels launched since the last clear.
std::vector<std::string> launch_log();
void clear_launch_log();

// A byte range of the running block's shared memory: the dynamic buffer, or a static
// __shared__ array of the running kernel.
struct SmemRange {
  uintptr_t begin;
  size_t size;
};

// What the race detector reads on every access. thread is the running thread's linear index
// in its block, or -1 outside a kernel thread; interval counts barrier intervals over all
// launches (a new one at every block start and every released __syncthreads), block_interval
// is the first one of the running block.
struct BlockState {
  int thread;
  uint32_t interval;
  uint32_t block_interval;
  const SmemRange* ranges;
  int range_count;
  uintptr_t stack_begin;  // the running fiber's stack (the profiler's "local" memory)
  uintptr_t stack_end;
};
extern BlockState block_state;

// The broken test kernels of selftest.cpp (the race and alignment ones need the checked flavour).
std::vector<std::string> selftest_names();
// Runs one; the output of those that return one (schedule_dependent), else nullopt.
c10::optional<at::Tensor> run_selftest(const std::string& name);

// "file:line" of a code address in this module (addr2line on the module's debug info).
std::string source_line(const void* pc);
// The mangled name of the function of this module that holds code address pc ("" if none).
std::string function_name_at(const void* pc);

// The checked flavour's profiler: per-launch counters of the kernels' memory traffic, filled
// from the same __tsan_* hooks as the race detector (linfusion_ops.emulated.profile).
struct ProfileCounters {
  uint64_t requests = 0;  // warp-level instructions (the k-th execution of one site by a warp)
  uint64_t bytes = 0;     // bytes the lanes asked for
  uint64_t units = 0;     // global: 32-byte sectors per request, summed; shared: wavefronts
  uint64_t ideal = 0;     // shared: wavefronts without bank conflicts; global: distinct bytes
};
struct ProfileSite {
  std::string where;  // file:line of the access
  bool shared;
  bool write;
  ProfileCounters counters;
};
struct ProfileRecord {
  std::string kernel;
  dim3 grid, block;
  size_t dynamic_smem = 0, static_smem = 0;
  uint64_t blocks = 0, barriers = 0, mma = 0;
  ProfileCounters global_load, global_store, shared_load, shared_store;
  uint64_t load_sectors = 0, store_sectors = 0;                // distinct over the launch
  uint64_t block_load_sectors = 0, block_store_sectors = 0;    // distinct per block, summed
  std::vector<ProfileSite> sites;
};
void set_profiling(bool on);
std::vector<ProfileRecord> take_profile();  // the records since the last call

#ifdef LINFUSION_OPS_EMU_CHECKED
// Called by the runtime around a launch and its blocks (the profiler's bookkeeping).
void profile_begin_launch(const std::string& kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                          size_t static_smem);
void profile_end_block();
void profile_barrier();
void profile_end_launch();

// The profiler's side of the __tsan_* hooks (race_detector.cpp). While `busy`, the profiler's
// own code runs and every hook returns at once.
struct ProfilerFlags {
  bool on;
  bool busy;
};
extern ProfilerFlags profiler_flags;
void profile_access(uintptr_t address, size_t bytes, bool write, bool shared, const void* pc);
void profile_func_entry(const void* caller_pc, const void* callee_pc);
void profile_func_exit();
// The file and line of the warp collective being completed (for the profiler's WMMA sites).
void collective_site(const char** file, int* line);
#endif

#ifdef LINFUSION_OPS_EMU_CHECKED
// Called by the runtime when a launch starts: the shared-memory ranges it will use.
void race_detector_begin_launch(const std::vector<SmemRange>& ranges);
#endif

}  // namespace emu
}  // namespace linfusion_ops
