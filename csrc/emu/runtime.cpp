// The emulator's scheduler: a launch runs its blocks one after another on the calling OS thread,
// each CUDA thread of a block a fiber with its own stack. A fiber runs until it reaches
// __syncthreads or a warp collective (or returns); the block's barrier opens when every live
// thread waits at the same call site. Whatever cannot proceed is reported as an error naming the
// kernel, the site, the block and the thread, and the launch is abandoned (its fibers are reset
// by the next block), so the process stays usable.
#include "emu/runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace linfusion_ops {
namespace emu {

BlockState block_state{-1, 0, 0, nullptr, 0, 0, 0};

namespace {

// ---------------------------------------------------------------------------------------------
// Device profiles.
struct Profile {
  const char* name;
  const char* device_name;
  int major, minor;
  int multiprocessor_count;
  size_t smem_optin;  // sharedMemPerBlockOptin
  int threads_per_sm;
  int blocks_per_sm;
};

constexpr Profile kProfiles[] = {
    {"H100", "NVIDIA H100 (emulated)", 9, 0, 132, 227 * 1024, 2048, 32},
    {"A100", "NVIDIA A100 (emulated)", 8, 0, 108, 163 * 1024, 2048, 32},
    {"sm86", "sm_86 device (emulated)", 8, 6, 84, 99 * 1024, 1536, 16},
    {"sm75", "sm_75 device (emulated)", 7, 5, 40, 64 * 1024, 1024, 16},
};

constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kDynamicSmemCapacity = 227 * 1024;
constexpr int kMaxThreads = 1024;
constexpr int kRegistersPerSm = 64 * 1024;
constexpr int kMaxRegistersPerThread = 255;
constexpr size_t kStackBytes = 256 * 1024;

enum class Order { kForward, kReverse, kShuffle };
constexpr const char* kOrderNames[] = {"forward", "reverse", "shuffle"};

struct Config {
  const Profile* profile = &kProfiles[0];
  int multiprocessor_count = kProfiles[0].multiprocessor_count;
  int registers_per_thread = 0;  // 0: the occupancy query ignores registers
  Order order = Order::kForward;
  uint64_t seed = 0;
};

Config g_config;
cudaDeviceProp g_props;
std::mutex g_mutex;  // launches are serialised: static shared memory has one instance
std::vector<std::string> g_log;
std::unordered_map<const void*, int> g_smem_optin;
std::string g_last_error = "no error";

void update_properties() {
  const Profile& p = *g_config.profile;
  g_props = cudaDeviceProp{};
  std::snprintf(g_props.name, sizeof(g_props.name), "%s", p.device_name);
  g_props.major = p.major;
  g_props.minor = p.minor;
  g_props.multiProcessorCount = g_config.multiprocessor_count;
  g_props.maxThreadsPerBlock = kMaxThreads;
  g_props.maxThreadsPerMultiProcessor = p.threads_per_sm;
  g_props.warpSize = 32;
  g_props.sharedMemPerBlock = kDefaultSmem;
  g_props.sharedMemPerBlockOptin = p.smem_optin;
  g_props.sharedMemPerMultiprocessor = p.smem_optin + 1024;
}

const bool g_props_ready = (update_properties(), true);

// ---------------------------------------------------------------------------------------------
// This module's symbols, from its ELF symbol table (the kernels have hidden visibility, so
// dladdr cannot name them).
struct Symbol {
  uintptr_t address;
  size_t size;
  std::string name;
  bool function;
};

class SymbolTable {
 public:
  static const SymbolTable& get() {
    static const SymbolTable table;
    return table;
  }

  const Symbol* function_at(const void* address) const {
    const uintptr_t a = reinterpret_cast<uintptr_t>(address);
    auto it = std::upper_bound(functions_.begin(), functions_.end(), a,
                               [](uintptr_t v, const Symbol& s) { return v < s.address; });
    if (it == functions_.begin()) return nullptr;
    --it;
    return a < it->address + std::max<size_t>(it->size, 1) ? &*it : nullptr;
  }

  // The function-scope statics of the function with mangled name `mangled` ("_ZZ<enc>E...").
  std::vector<SmemRange> statics_of(const std::string& mangled) const {
    std::vector<SmemRange> ranges;
    if (mangled.rfind("_Z", 0) != 0) return ranges;
    const std::string prefix = "_ZZ" + mangled.substr(2) + "E";
    for (const Symbol& s : objects_) {
      if (s.size > 0 && s.name.rfind(prefix, 0) == 0) ranges.push_back({s.address, s.size});
    }
    return ranges;
  }

  const std::string& path() const { return path_; }
  uintptr_t base() const { return base_; }

 private:
  SymbolTable() {
    Dl_info info{};
    if (!dladdr(reinterpret_cast<const void*>(&update_properties), &info) || !info.dli_fname) {
      return;
    }
    path_ = info.dli_fname;
    base_ = reinterpret_cast<uintptr_t>(info.dli_fbase);
    const int fd = open(path_.c_str(), O_RDONLY);
    if (fd < 0) return;
    const off_t bytes = lseek(fd, 0, SEEK_END);
    void* map = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return;
    const auto* data = static_cast<const char*>(map);
    const auto* ehdr = reinterpret_cast<const Elf64_Ehdr*>(data);
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(data + ehdr->e_shoff);
    for (int i = 0; i < ehdr->e_shnum; ++i) {
      if (sections[i].sh_type != SHT_SYMTAB) continue;
      const auto* syms = reinterpret_cast<const Elf64_Sym*>(data + sections[i].sh_offset);
      const char* names = data + sections[sections[i].sh_link].sh_offset;
      const size_t count = sections[i].sh_size / sizeof(Elf64_Sym);
      for (size_t j = 0; j < count; ++j) {
        const int type = ELF64_ST_TYPE(syms[j].st_info);
        if ((type != STT_FUNC && type != STT_OBJECT) || syms[j].st_value == 0) continue;
        Symbol s{base_ + syms[j].st_value, syms[j].st_size, names + syms[j].st_name,
                 type == STT_FUNC};
        (s.function ? functions_ : objects_).push_back(std::move(s));
      }
    }
    munmap(map, static_cast<size_t>(bytes));
    std::sort(functions_.begin(), functions_.end(),
              [](const Symbol& a, const Symbol& b) { return a.address < b.address; });
  }

  std::string path_;
  uintptr_t base_ = 0;
  std::vector<Symbol> functions_;
  std::vector<Symbol> objects_;
};

// "void ns::kernel<T, 64>(Args)" -> "ns::kernel<T, 64>".
std::string demangled_kernel_name(const std::string& mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> text(
      abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status), std::free);
  std::string name = status == 0 && text ? text.get() : mangled;
  if (!name.empty() && name.back() == ')') {
    int depth = 0;
    for (size_t i = name.size(); i-- > 0;) {
      if (name[i] == ')') ++depth;
      if (name[i] == '(' && --depth == 0) {
        name.resize(i);
        break;
      }
    }
  }
  if (name.rfind("void ", 0) == 0) name.erase(0, 5);
  return name;
}

struct KernelInfo {
  std::string name;
  std::vector<SmemRange> statics;
};

const KernelInfo& kernel_info(const void* kernel) {
  static std::unordered_map<const void*, KernelInfo> cache;
  auto it = cache.find(kernel);
  if (it != cache.end()) return it->second;
  const SymbolTable& table = SymbolTable::get();
  KernelInfo info;
  if (const Symbol* s = table.function_at(kernel)) {
    info.name = demangled_kernel_name(s->name);
    info.statics = table.statics_of(s->name);
  } else {
    std::ostringstream text;
    text << "kernel@" << kernel;
    info.name = text.str();
  }
  return cache.emplace(kernel, std::move(info)).first->second;
}

// ---------------------------------------------------------------------------------------------
// Fibers.
#if defined(__x86_64__)
// switch_context(save, load): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *save and resumes the stack `load`.
extern "C" void linfusion_emu_switch_context(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .type linfusion_emu_switch_context, @function
linfusion_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size linfusion_emu_switch_context, .-linfusion_emu_switch_context
)");
#endif

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone, kFailed };

struct Fiber {
  char* stack = nullptr;  // lowest usable byte; a guard page lies below
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  State state = State::kReady;
  const char* file = nullptr;  // where it waits
  int line = 0;
  uint3 idx{0, 0, 0};
  int linear = 0;
};

struct WarpOp {
  bool active = false;
  const char* op = nullptr;
  const char* file = nullptr;
  int line = 0;
  unsigned mask = 0;
  unsigned arrived = 0;
  uint64_t key = 0;
  void* lanes[32] = {};
};

#if defined(__x86_64__)
void* g_scheduler_sp = nullptr;
#else
ucontext_t g_scheduler_context;
#endif
std::vector<std::unique_ptr<Fiber>> g_fibers;
std::vector<WarpOp> g_warps;
Fiber* g_current = nullptr;
const Launch* g_launch = nullptr;
const KernelInfo* g_kernel = nullptr;
int g_block_threads = 0;
std::string g_error;  // set by a failing fiber before it hands back to the scheduler
uint32_t g_intervals = 0;
alignas(128) unsigned char g_dynamic_smem[kDynamicSmemCapacity];

void fiber_main();

#if !defined(__x86_64__)
void fiber_trampoline() { fiber_main(); }
#endif

void switch_to_scheduler(Fiber* f) {
#if defined(__x86_64__)
  linfusion_emu_switch_context(&f->sp, g_scheduler_sp);
#else
  swapcontext(&f->context, &g_scheduler_context);
#endif
}

void reset_fiber(Fiber& f) {
  if (!f.stack) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* region = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(region != MAP_FAILED, "linfusion_ops emulator: cannot map a fiber stack");
    mprotect(region, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
    f.stack = static_cast<char*>(region) + page;
  }
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15));
  uint32_t mxcsr = __builtin_ia32_stmxcsr();
  uint16_t fpcw = 0;
  asm volatile("fnstcw %0" : "=m"(fpcw));
  *--top = 0;  // fiber_main's return address slot: entered with rsp = 8 mod 16
  *--top = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 0; r < 6; ++r) *--top = 0;  // rbp, rbx, r12 .. r15
  *--top = uint64_t(mxcsr) | uint64_t(fpcw) << 32;
  f.sp = top;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_trampoline, 0);
#endif
  f.state = State::kReady;
  f.file = nullptr;
  f.line = 0;
}

void run_fiber(Fiber& f) {
  threadIdx = f.idx;
  g_current = &f;
  block_state.thread = f.linear;
  block_state.stack_begin = reinterpret_cast<uintptr_t>(f.stack);
  block_state.stack_end = block_state.stack_begin + kStackBytes;
#if defined(__x86_64__)
  linfusion_emu_switch_context(&g_scheduler_sp, f.sp);
#else
  swapcontext(&g_scheduler_context, &f.context);
#endif
  block_state.thread = -1;
  g_current = nullptr;
}

// Blocks the current fiber until the scheduler resumes it.
void wait(State state, const char* file, int line) {
  Fiber* f = g_current;
  f->state = state;
  f->file = file;
  f->line = line;
  switch_to_scheduler(f);
  threadIdx = f->idx;
}

std::string short_path(const char* file) {
  if (!file) return "?";
  const std::string path = file;
  const size_t at = path.rfind("csrc/");
  return at == std::string::npos ? path : path.substr(at);
}

std::string coords(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

std::string site(const char* file, int line) { return short_path(file) + ":" + std::to_string(line); }

std::string error_message(const char* check, const std::string& detail, const char* file,
                          int line, const uint3& block, const uint3& thread) {
  return std::string("linfusion_ops emulator: ") + check + " in kernel " +
         (g_kernel ? g_kernel->name : std::string("?")) + " at " + site(file, line) + ", block " +
         coords(block) + ", thread " + coords(thread) + ": " + detail;
}

// Where a warp collective's completion fails (file == nullptr): the collective's own site.
const char* g_op_file = nullptr;
int g_op_line = 0;

void fiber_main() {
  Fiber* f = g_current;
  try {
    g_launch->run(g_launch->args);
    f->state = State::kDone;
  } catch (const std::exception& e) {
    g_error = error_message("exception in a kernel thread", e.what(), g_launch->file,
                            g_launch->line, blockIdx, f->idx);
    f->state = State::kFailed;
  }
  switch_to_scheduler(f);
  __builtin_trap();  // a finished fiber is never resumed
}

uint3 thread_coords(int linear) {
  return {static_cast<unsigned>(linear % blockDim.x),
          static_cast<unsigned>(linear / blockDim.x % blockDim.y),
          static_cast<unsigned>(linear / (blockDim.x * blockDim.y))};
}

[[noreturn]] void fail_for(int thread, const char* check, const std::string& detail,
                           const char* file, int line) {
  throw std::runtime_error(
      error_message(check, detail, file, line, blockIdx, thread_coords(thread)));
}

std::string collective_kind(const char* op) {
  const std::string name = op;
  if (name.find("shfl") != std::string::npos) return "shuffle";
  if (name.find("ballot") != std::string::npos) return "ballot";
  return "wmma";
}

// Nothing is ready: open the barrier, or report why the block cannot go on.
void resolve_stall() {
  const int n = g_block_threads;
  for (size_t w = 0; w < g_warps.size(); ++w) {
    const WarpOp& op = g_warps[w];
    if (!op.active) continue;
    const int waiting = static_cast<int>(w) * 32 + __builtin_ctz(op.arrived);
    for (int lane = 0; lane < 32; ++lane) {
      if (!(op.mask >> lane & 1u) || op.arrived >> lane & 1u) continue;
      const int t = static_cast<int>(w) * 32 + lane;
      const std::string kind = collective_kind(op.op) + " with lanes missing";
      if (t >= n) {
        fail_for(waiting, kind.c_str(),
                 std::string(op.op) + " names lane " + std::to_string(lane) +
                     ", which does not exist (the block has " + std::to_string(n) + " threads)",
                 op.file, op.line);
      }
      const Fiber& missing = *g_fibers[t];
      if (missing.state == State::kDone) {
        fail_for(waiting, kind.c_str(),
                 std::string(op.op) + ": lane " + std::to_string(lane) + " (thread " +
                     coords(missing.idx) + ") returned without reaching it",
                 op.file, op.line);
      }
      fail_for(waiting, "deadlock",
               "warp " + std::to_string(w) + " waits at " + op.op + " while lane " +
                   std::to_string(lane) + " (thread " + coords(missing.idx) +
                   ") waits at __syncthreads (" + site(missing.file, missing.line) + ")",
               op.file, op.line);
    }
  }
  const Fiber* first = nullptr;
  const Fiber* returned = nullptr;
  for (int t = 0; t < n; ++t) {
    const Fiber& f = *g_fibers[t];
    if (f.state == State::kDone) {
      if (!returned) returned = &f;
      continue;
    }
    if (!first) {
      first = &f;
    } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
      fail_for(f.linear, "barrier reached at different sites",
               "thread " + coords(first->idx) + " waits at __syncthreads (" +
                   site(first->file, first->line) + "), this thread at another one",
               f.file, f.line);
    }
  }
  if (returned) {
    fail_for(first->linear, "barrier after some threads of the block returned",
             "thread " + coords(returned->idx) + " returned before reaching this __syncthreads",
             first->file, first->line);
  }
  for (int t = 0; t < n; ++t) {
    if (g_fibers[t]->state == State::kBarrier) g_fibers[t]->state = State::kReady;
  }
#ifdef LINFUSION_OPS_EMU_CHECKED
  profile_barrier();
#endif
  block_state.interval = ++g_intervals;
}

std::vector<int> schedule(int count, uint64_t salt) {
  std::vector<int> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  if (g_config.order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_config.order == Order::kShuffle) {
    std::mt19937_64 rng(g_config.seed * 0x9E3779B97F4A7C15ull + salt);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

void run_block(uint64_t block_linear) {
  const int n = g_block_threads;
  for (int t = 0; t < n; ++t) {
    Fiber& f = *g_fibers[t];
    reset_fiber(f);
    f.linear = t;
    f.idx = thread_coords(t);
  }
  for (WarpOp& w : g_warps) w.active = false;
  std::memset(g_dynamic_smem, 0xFF, g_launch->smem_bytes);  // unwritten reads show up
  for (const SmemRange& r : g_kernel->statics) {
    std::memset(reinterpret_cast<void*>(r.begin), 0xFF, r.size);
  }
  block_state.interval = block_state.block_interval = ++g_intervals;
  const std::vector<int> order = schedule(n, block_linear + 1);
  while (true) {
    bool ready = false;
    int done = 0;
    for (int t : order) {
      Fiber& f = *g_fibers[t];
      if (f.state == State::kReady) run_fiber(f);
      if (f.state == State::kFailed) throw std::runtime_error(g_error);
    }
    for (int t = 0; t < n; ++t) {
      const State s = g_fibers[t]->state;
      ready = ready || s == State::kReady;
      done += s == State::kDone;
    }
    if (done == n) {
#ifdef LINFUSION_OPS_EMU_CHECKED
      profile_end_block();
#endif
      return;
    }
    if (!ready) resolve_stall();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Device-side entry points (emu.h).
[[noreturn]] void fail(const char* check, const std::string& detail, const char* file, int line) {
  if (!file) {
    file = g_op_file;
    line = g_op_line;
  }
  const uint3 thread = g_current ? g_current->idx : uint3{0, 0, 0};
  std::string message = error_message(check, detail, file, line, blockIdx, thread);
  if (g_current) {
    g_error = std::move(message);
    Fiber* f = g_current;
    f->state = State::kFailed;
    switch_to_scheduler(f);
    __builtin_trap();
  }
  throw std::runtime_error(message);
}

void syncthreads(const char* file, int line) {
  TORCH_CHECK(g_current, "linfusion_ops emulator: __syncthreads outside a kernel");
  wait(State::kBarrier, file, line);
}

int lane_id() { return g_current ? g_current->linear % 32 : 0; }

void warp_rendezvous(const char* op, unsigned mask, uint64_t key, void* lane_data,
                     WarpComplete complete, const char* file, int line) {
  Fiber* f = g_current;
  TORCH_CHECK(f, "linfusion_ops emulator: ", op, " outside a kernel");
  const int lane = f->linear % 32;
  WarpOp& w = g_warps[static_cast<size_t>(f->linear / 32)];
  const std::string kind = collective_kind(op);
  if (!(mask >> lane & 1u)) {
    fail((kind + " with lanes missing").c_str(),
         std::string(op) + " called by lane " + std::to_string(lane) +
             " with a mask that does not name it",
         file, line);
  }
  if (!w.active) {
    w.active = true;
    w.op = op;
    w.file = file;
    w.line = line;
    w.mask = mask;
    w.arrived = 0;
    w.key = key;
  } else if (w.line != line || std::strcmp(w.file, file) != 0 || std::strcmp(w.op, op) != 0) {
    fail("warp collective reached at different sites",
         "other lanes of the warp wait at " + std::string(w.op) + " (" + site(w.file, w.line) +
             ")",
         file, line);
  } else if (w.mask != mask) {
    fail((kind + " with lanes missing").c_str(),
         std::string(op) + ": the lanes pass different masks", file, line);
  } else if (w.key != key) {
    fail("warp collective arguments differ",
         std::string(op) + ": the lanes pass different arguments (pointer, ldm, lane mask)", file,
         line);
  }
  w.lanes[lane] = lane_data;
  w.arrived |= 1u << lane;
  if (w.arrived != w.mask) {
    wait(State::kWarp, file, line);
    return;
  }
  g_op_file = file;
  g_op_line = line;
  complete(w.lanes, mask);
  w.active = false;
  const int first = f->linear / 32 * 32;
  for (int l = 0; l < 32; ++l) {
    if (l != lane && mask >> l & 1u) g_fibers[static_cast<size_t>(first + l)]->state = State::kReady;
  }
}

unsigned char* dynamic_smem_base() { return g_dynamic_smem; }

#ifdef LINFUSION_OPS_EMU_CHECKED
void collective_site(const char** file, int* line) {
  *file = g_op_file;
  *line = g_op_line;
}
#endif

cudaDeviceProp* device_properties() { return &g_props; }

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value,
                               const char* file, int line) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > g_config.profile->smem_optin) {
    const KernelInfo& info = kernel_info(kernel);
    g_kernel = &info;
    const std::string message = error_message(
        "dynamic shared memory above the opt-in limit",
        "cudaFuncSetAttribute asks for " + std::to_string(value) + " bytes, the " +
            g_config.profile->name + " profile allows " +
            std::to_string(g_config.profile->smem_optin),
        file, line, uint3{0, 0, 0}, uint3{0, 0, 0});
    g_kernel = nullptr;
    throw std::runtime_error(message);
  }
  g_smem_optin[kernel] = value;
  return cudaSuccess;
}

int max_active_blocks(int block_threads, size_t dynamic_smem) {
  const Profile& p = *g_config.profile;
  int blocks = std::min(p.blocks_per_sm, p.threads_per_sm / std::max(block_threads, 1));
  if (dynamic_smem > 0) {
    blocks = std::min<int>(blocks, static_cast<int>((p.smem_optin + 1024) / dynamic_smem));
  }
  if (g_config.registers_per_thread > 0) {
    // Registers are allocated per warp in units of 256 (every profile: 64K per SM).
    const int warps = (std::max(block_threads, 1) + 31) / 32;
    const int per_warp = (g_config.registers_per_thread * 32 + 255) / 256 * 256;
    blocks = std::min(blocks, kRegistersPerSm / (per_warp * warps));
  }
  return std::max(blocks, 0);
}

const char* last_error_string() { return g_last_error.c_str(); }

void launch(const Launch& l) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const KernelInfo& info = kernel_info(l.kernel);
  g_kernel = &info;
  g_log.push_back(info.name);
  struct Reset {
    ~Reset() {
      g_kernel = nullptr;
      g_launch = nullptr;
      g_current = nullptr;
      g_error.clear();
      block_state = BlockState{-1, 0, 0, nullptr, 0, 0, 0};
    }
  } reset;
  blockIdx = {0, 0, 0};
  blockDim = l.block;
  gridDim = l.grid;
  const uint64_t threads = uint64_t(l.block.x) * l.block.y * l.block.z;
  if (threads > kMaxThreads || l.block.z > 64) {
    fail_for(kMaxThreads, "too many threads per block",
             "block " + coords({l.block.x, l.block.y, l.block.z}) + " has " +
                 std::to_string(threads) + " threads, at most 1024 (z at most 64)",
             l.file, l.line);
  }
  const uint64_t blocks = uint64_t(l.grid.x) * l.grid.y * l.grid.z;
  if (threads == 0 || blocks == 0 || l.grid.y > 65535 || l.grid.z > 65535) {
    fail_for(0, "invalid launch configuration",
             "grid " + coords({l.grid.x, l.grid.y, l.grid.z}) + ", block " +
                 coords({l.block.x, l.block.y, l.block.z}),
             l.file, l.line);
  }
  if (l.smem_bytes > g_config.profile->smem_optin) {
    fail_for(0, "dynamic shared memory above the opt-in limit",
             std::to_string(l.smem_bytes) + " bytes, the " + g_config.profile->name +
                 " profile allows " + std::to_string(g_config.profile->smem_optin),
             l.file, l.line);
  }
  if (l.smem_bytes > kDefaultSmem) {
    auto it = g_smem_optin.find(l.kernel);
    if (it == g_smem_optin.end() || static_cast<size_t>(it->second) < l.smem_bytes) {
      fail_for(0, "dynamic shared memory above 48 KB without opt-in",
               std::to_string(l.smem_bytes) +
                   " bytes need cudaFuncSetAttribute(kernel, "
                   "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first",
               l.file, l.line);
    }
  }
  g_launch = &l;
  g_block_threads = static_cast<int>(threads);
  while (g_fibers.size() < threads) g_fibers.push_back(std::make_unique<Fiber>());
  g_warps.assign((threads + 31) / 32, WarpOp{});
  std::vector<SmemRange> ranges = info.statics;
  if (l.smem_bytes > 0) {
    ranges.push_back({reinterpret_cast<uintptr_t>(g_dynamic_smem), l.smem_bytes});
  }
#ifdef LINFUSION_OPS_EMU_CHECKED
  race_detector_begin_launch(ranges);
  size_t static_smem = 0;
  for (const SmemRange& r : info.statics) static_smem += r.size;
  profile_begin_launch(info.name, l.grid, l.block, l.smem_bytes, static_smem);
#endif
  block_state.ranges = ranges.data();
  block_state.range_count = static_cast<int>(ranges.size());
  for (int b : schedule(static_cast<int>(blocks), 0)) {
    blockIdx = {static_cast<unsigned>(b % l.grid.x),
                static_cast<unsigned>(b / l.grid.x % l.grid.y),
                static_cast<unsigned>(b / (uint64_t(l.grid.x) * l.grid.y))};
    run_block(static_cast<uint64_t>(b));
  }
#ifdef LINFUSION_OPS_EMU_CHECKED
  profile_end_launch();
#endif
}

// ---------------------------------------------------------------------------------------------
// Knobs.
void set_device(const std::string& name, int multiprocessor_count, int registers_per_thread) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (const Profile& p : kProfiles) {
    if (name == p.name) {
      TORCH_CHECK(multiprocessor_count >= 0,
                  "linfusion_ops emulator: multiprocessor_count must be positive, got ",
                  multiprocessor_count);
      TORCH_CHECK(registers_per_thread >= 0 && registers_per_thread <= kMaxRegistersPerThread,
                  "linfusion_ops emulator: registers_per_thread must be in [0, ",
                  kMaxRegistersPerThread, "], got ", registers_per_thread);
      g_config.profile = &p;
      g_config.registers_per_thread = registers_per_thread;
      g_config.multiprocessor_count =
          multiprocessor_count > 0 ? multiprocessor_count : p.multiprocessor_count;
      update_properties();
      return;
    }
  }
  TORCH_CHECK(false, "linfusion_ops emulator: unknown device profile '", name,
              "', expected one of H100, A100, sm86, sm75");
}

void set_schedule(const std::string& order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (int i = 0; i < 3; ++i) {
    if (order == kOrderNames[i]) {
      g_config.order = static_cast<Order>(i);
      g_config.seed = seed;
      return;
    }
  }
  TORCH_CHECK(false, "linfusion_ops emulator: schedule must be 'forward', 'reverse' or "
              "'shuffle', got '", order, "'");
}

Settings current_settings() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return {g_config.profile->name, g_config.multiprocessor_count, g_config.registers_per_thread,
          kOrderNames[static_cast<int>(g_config.order)], g_config.seed};
}

std::vector<std::string> device_names() {
  std::vector<std::string> names;
  for (const Profile& p : kProfiles) names.emplace_back(p.name);
  return names;
}

std::vector<std::string> launch_log() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_log;
}

void clear_launch_log() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_log.clear();
}

std::string function_name_at(const void* pc) {
  const Symbol* s = SymbolTable::get().function_at(pc);
  return s ? s->name : std::string();
}

#ifndef LINFUSION_OPS_EMU_CHECKED
// The fast flavour has no profiler (its accesses are not instrumented).
void profile_tile_access(const void*, unsigned, unsigned, bool) {}
void profile_mma() {}
void set_profiling(bool on) {
  TORCH_CHECK(!on, "linfusion_ops emulator: the profiler needs the checked flavour "
              "(build with LINFUSION_OPS_CUDA_EMU=checked)");
}
std::vector<ProfileRecord> take_profile() { return {}; }
#endif

std::string source_line(const void* pc) {
  const SymbolTable& table = SymbolTable::get();
  char command[4096];
  std::snprintf(command, sizeof(command), "addr2line -i -e '%s' 0x%lx 2>/dev/null",
                table.path().c_str(),
                static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) - table.base() - 1));
  std::string line;
  if (FILE* pipe = popen(command, "r")) {
    char buffer[4096];
    if (std::fgets(buffer, sizeof(buffer), pipe)) line = buffer;  // innermost inlined frame
    pclose(pipe);
  }
  while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
  const size_t discriminator = line.find(" (discriminator");
  if (discriminator != std::string::npos) line.resize(discriminator);
  return line.empty() || line[0] == '?' ? "?:0" : line;
}

}  // namespace emu
}  // namespace linfusion_ops
