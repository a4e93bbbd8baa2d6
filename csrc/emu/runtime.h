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
void set_device(const std::string& name, int multiprocessor_count);  // 0: the profile's count
void set_schedule(const std::string& order, uint64_t seed);
struct Settings {
  std::string device;
  int multiprocessor_count;
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
};
extern BlockState block_state;

// The broken test kernels of selftest.cpp (the race and alignment ones need the checked flavour).
std::vector<std::string> selftest_names();
// Runs one; the output of those that return one (schedule_dependent), else nullopt.
c10::optional<at::Tensor> run_selftest(const std::string& name);

// "file:line" of a code address in this module (addr2line on the module's debug info).
std::string source_line(const void* pc);

#ifdef LINFUSION_OPS_EMU_CHECKED
// Called by the runtime when a launch starts: the shared-memory ranges it will use.
void race_detector_begin_launch(const std::vector<SmemRange>& ranges);
#endif

}  // namespace emu
}  // namespace linfusion_ops
