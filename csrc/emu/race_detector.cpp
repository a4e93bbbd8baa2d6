// The checked flavour's shared-memory race detector (and the entry of its profiler, profiler.cpp). Its translation units are compiled with
// -fsanitize=thread, which makes every memory access call a __tsan_* hook; this file implements
// those hooks itself (libtsan is not linked). Per byte of the running block's shared memory it
// keeps the barrier interval and thread of the last write and of the last read(s), and reports:
// two threads writing the same byte in one interval (write-write), a write after another
// thread's read in the interval (read-write), a read after another thread's write in the
// interval (write-read), a read of a byte no thread of the block has written, and any
// misaligned access of a kernel thread. The hooks touch plain arrays only: anything they called
// that was compiled with the sanitizer would call them again.
#include <sys/mman.h>

#include <cstdint>
#include <string>

#include "emu/runtime.h"

#define LINFUSION_EMU_HOOK extern "C" __attribute__((no_sanitize("thread"), visibility("hidden")))
#define LINFUSION_EMU_NO_TSAN __attribute__((no_sanitize("thread")))

namespace linfusion_ops {
namespace emu {
namespace {

struct Cell {
  uint32_t write_interval;
  uint32_t read_interval;
  uint16_t writer;
  uint16_t reader;  // kManyReaders: more than one thread read in read_interval
};
constexpr uint16_t kManyReaders = 0xFFFF;

struct Shadow {
  uintptr_t begin;
  size_t capacity;  // cells
  Cell* cells;
};

constexpr int kMaxShadows = 4096;
constexpr int kMaxActive = 64;
Shadow g_shadows[kMaxShadows];
int g_shadow_count = 0;
struct Active {
  uintptr_t begin;
  size_t size;
  Cell* cells;
};
Active g_active[kMaxActive];
int g_active_count = 0;

Cell* allocate_cells(size_t count) {
  void* p = mmap(nullptr, count * sizeof(Cell), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "linfusion_ops emulator: cannot map the race detector's shadow");
  return static_cast<Cell*>(p);  // zero: never written (intervals start at 1)
}

Cell* shadow_for(const SmemRange& r) {
  for (int i = 0; i < g_shadow_count; ++i) {
    Shadow& s = g_shadows[i];
    if (s.begin != r.begin) continue;
    if (s.capacity < r.size) {
      munmap(s.cells, s.capacity * sizeof(Cell));
      s.cells = allocate_cells(r.size);
      s.capacity = r.size;
    }
    return s.cells;
  }
  TORCH_CHECK(g_shadow_count < kMaxShadows, "linfusion_ops emulator: too many shared arrays");
  g_shadows[g_shadow_count] = {r.begin, r.size, allocate_cells(r.size)};
  return g_shadows[g_shadow_count++].cells;
}

std::string thread_name(int linear) {
  return "thread (" + std::to_string(linear % blockDim.x) + ", " +
         std::to_string(linear / blockDim.x % blockDim.y) + ", " +
         std::to_string(linear / (blockDim.x * blockDim.y)) + ")";
}

[[noreturn]] void report(const char* check, const std::string& detail, const void* pc) {
  const std::string where = source_line(pc);
  const size_t colon = where.rfind(':');
  const std::string file = where.substr(0, colon);
  const int line = colon == std::string::npos ? 0 : std::atoi(where.c_str() + colon + 1);
  fail(check, detail, file.c_str(), line);
}

std::string byte_name(uintptr_t address, const Active& a) {
  return "shared byte " + std::to_string(address - a.begin) + " of a " + std::to_string(a.size) +
         "-byte array";
}

LINFUSION_EMU_NO_TSAN inline void access(uintptr_t address, size_t bytes, bool write,
                                         bool aligned, const void* pc) {
  const int thread = block_state.thread;
  if (thread < 0 || profiler_flags.busy) return;
  if (aligned && (address & (bytes - 1)) != 0) {
    report("misaligned access",
           std::to_string(bytes) + "-byte " + (write ? "write" : "read") + " at an address " +
               std::to_string(address % bytes) + " bytes past a multiple of " +
               std::to_string(bytes),
           pc);
  }
  bool shared = false;
  for (int i = 0; i < g_active_count && !shared; ++i) {
    const Active& a = g_active[i];
    if (address - a.begin >= a.size) continue;
    shared = true;
    const uint32_t now = block_state.interval;
    const size_t end = address - a.begin + bytes < a.size ? address - a.begin + bytes : a.size;
    for (size_t off = address - a.begin; off < end; ++off) {
      Cell& c = a.cells[off];
      if (write) {
        if (c.write_interval == now && c.writer != thread) {
          report("shared-memory race (write-write)",
                 byte_name(a.begin + off, a) + " was written by " + thread_name(c.writer) +
                     " in the same barrier interval",
                 pc);
        }
        if (c.read_interval == now && c.reader != thread) {
          report("shared-memory race (read-write)",
                 byte_name(a.begin + off, a) + " was read by " +
                     (c.reader == kManyReaders ? std::string("other threads")
                                               : thread_name(c.reader)) +
                     " in the same barrier interval",
                 pc);
        }
        c.write_interval = now;
        c.writer = static_cast<uint16_t>(thread);
      } else {
        if (c.write_interval < block_state.block_interval) {
          report("read of uninitialized shared memory",
                 byte_name(a.begin + off, a) + " was not written by any thread of this block", pc);
        }
        if (c.write_interval == now && c.writer != thread) {
          report("shared-memory race (write-read)",
                 byte_name(a.begin + off, a) + " was written by " + thread_name(c.writer) +
                     " in the same barrier interval",
                 pc);
        }
        if (c.read_interval == now && c.reader != thread) {
          c.reader = kManyReaders;
        } else if (c.read_interval != now) {
          c.read_interval = now;
          c.reader = static_cast<uint16_t>(thread);
        }
      }
    }
  }
  if (profiler_flags.on) profile_access(address, bytes, write, shared, pc);
}

}  // namespace

void race_detector_begin_launch(const std::vector<SmemRange>& ranges) {
  TORCH_CHECK(ranges.size() <= kMaxActive, "linfusion_ops emulator: too many shared arrays");
  g_active_count = 0;
  for (const SmemRange& r : ranges) g_active[g_active_count++] = {r.begin, r.size, shadow_for(r)};
}

}  // namespace emu
}  // namespace linfusion_ops

// ---------------------------------------------------------------------------------------------
// The hooks GCC's -fsanitize=thread emits calls to. The "unaligned" accesses are ones the compiler
// cannot prove aligned: on a GPU a misaligned one faults all the same, so they are checked too.
namespace emu = linfusion_ops::emu;

LINFUSION_EMU_HOOK void __tsan_init() {}
// The profiler's shadow call stacks.
LINFUSION_EMU_HOOK void __tsan_func_entry(void* caller_pc) {
  if (emu::profiler_flags.on && !emu::profiler_flags.busy) {
    emu::profile_func_entry(caller_pc, __builtin_return_address(0));
  }
}
LINFUSION_EMU_HOOK void __tsan_func_exit() {
  if (emu::profiler_flags.on && !emu::profiler_flags.busy) emu::profile_func_exit();
}
LINFUSION_EMU_HOOK void __tsan_vptr_update(void**, void*) {}
LINFUSION_EMU_HOOK void __tsan_vptr_read(void**) {}

#define LINFUSION_EMU_ACCESS_HOOKS(N)                                                      \
  LINFUSION_EMU_HOOK void __tsan_read##N(void* p) {                                        \
    emu::access(reinterpret_cast<uintptr_t>(p), N, false, true, __builtin_return_address(0)); \
  }                                                                                        \
  LINFUSION_EMU_HOOK void __tsan_write##N(void* p) {                                       \
    emu::access(reinterpret_cast<uintptr_t>(p), N, true, true, __builtin_return_address(0)); \
  }                                                                                        \
  LINFUSION_EMU_HOOK void __tsan_unaligned_read##N(void* p) {                              \
    emu::access(reinterpret_cast<uintptr_t>(p), N, false, true, __builtin_return_address(0)); \
  }                                                                                        \
  LINFUSION_EMU_HOOK void __tsan_unaligned_write##N(void* p) {                             \
    emu::access(reinterpret_cast<uintptr_t>(p), N, true, true, __builtin_return_address(0)); \
  }                                                                                        \
  LINFUSION_EMU_HOOK void __tsan_volatile_read##N(void* p) {                               \
    emu::access(reinterpret_cast<uintptr_t>(p), N, false, true, __builtin_return_address(0)); \
  }                                                                                        \
  LINFUSION_EMU_HOOK void __tsan_volatile_write##N(void* p) {                              \
    emu::access(reinterpret_cast<uintptr_t>(p), N, true, true, __builtin_return_address(0)); \
  }
LINFUSION_EMU_ACCESS_HOOKS(1)
LINFUSION_EMU_ACCESS_HOOKS(2)
LINFUSION_EMU_ACCESS_HOOKS(4)
LINFUSION_EMU_ACCESS_HOOKS(8)
LINFUSION_EMU_ACCESS_HOOKS(16)

// GCC also reports a scalar access it knows to be misaligned as a range: a power-of-two size up
// to 16 bytes must then be aligned to it.
LINFUSION_EMU_NO_TSAN inline bool scalar_size(unsigned long size) {
  return size <= 16 && (size & (size - 1)) == 0;
}
LINFUSION_EMU_HOOK void __tsan_read_range(void* p, unsigned long size) {
  emu::access(reinterpret_cast<uintptr_t>(p), size, false, scalar_size(size),
              __builtin_return_address(0));
}
LINFUSION_EMU_HOOK void __tsan_write_range(void* p, unsigned long size) {
  emu::access(reinterpret_cast<uintptr_t>(p), size, true, scalar_size(size),
              __builtin_return_address(0));
}

// Atomics (c10's reference counts, std::atomic in torch's headers): performed sequentially
// consistent, and not shared-memory accesses of a kernel.
#define LINFUSION_EMU_ATOMIC_HOOKS(BITS, T)                                                   \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_load(const volatile T* a, int) {                 \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                              \
  }                                                                                           \
  LINFUSION_EMU_HOOK void __tsan_atomic##BITS##_store(volatile T* a, T v, int) {              \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                 \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) {              \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) {             \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) {             \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) {             \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) {              \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int) {             \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int) {            \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                           \
  LINFUSION_EMU_HOOK int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c,   \
                                                                       T v, int, int) {       \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);   \
  }                                                                                           \
  LINFUSION_EMU_HOOK int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, \
                                                                     int, int) {              \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);   \
  }                                                                                           \
  LINFUSION_EMU_HOOK T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v,    \
                                                                  int, int) {                 \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);         \
    return c;                                                                                 \
  }
LINFUSION_EMU_ATOMIC_HOOKS(8, char)
LINFUSION_EMU_ATOMIC_HOOKS(16, short)
LINFUSION_EMU_ATOMIC_HOOKS(32, int)
LINFUSION_EMU_ATOMIC_HOOKS(64, long)

LINFUSION_EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
LINFUSION_EMU_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
