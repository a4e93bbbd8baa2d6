// The CUDA emulation's device side: what the kernels of csrc/cuda use from CUDA, for the host
// compiler. Threads are fibers that run one block at a time on the calling OS thread (see
// runtime.cpp); __syncthreads and the warp collectives are rendezvous points identified by their
// call site, checked for divergence and missing lanes. Reached through the shadow headers of
// csrc/emu/include (cuda_runtime.h, mma.h, ...), which come first on the include path.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Keywords. Static __shared__ arrays become function-scope statics: blocks run one at a time, so
// one instance per kernel is the block's shared memory (captureless lambdas may name them).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// The running thread's coordinates, set by the scheduler before it switches to a fiber.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

// ---------------------------------------------------------------------------------------------
// Runtime types (cuda_runtime_api.h).
using cudaStream_t = struct CUstream_st*;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct cudaDeviceProp {
  char name[256];
  int major;
  int minor;
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int maxThreadsPerMultiProcessor;
  int warpSize;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
};

namespace linfusion_ops {
namespace emu {

// Raises the emulator's error for the running thread (from a fiber: ends the launch).
[[noreturn]] void fail(const char* check, const std::string& detail, const char* file, int line);

void syncthreads(const char* file, int line);

// The last lane of `mask` to arrive calls complete(lane_data of the 32 lanes, mask); every lane
// of the mask must reach the same op at the same site with the same mask and key (the arguments
// that must agree across lanes), else the launch fails.
using WarpComplete = void (*)(void* const* lane_data, unsigned mask);
void warp_rendezvous(const char* op, unsigned mask, uint64_t key, void* lane_data,
                     WarpComplete complete, const char* file, int line);
int lane_id();

unsigned char* dynamic_smem_base();
template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(dynamic_smem_base());
}

struct Launch {
  const void* kernel;
  dim3 grid;
  dim3 block;
  size_t smem_bytes;
  const char* file;
  int line;
  void (*run)(void* args);  // runs the kernel for the current thread
  void* args;
};
void launch(const Launch& launch);

cudaDeviceProp* device_properties();
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value,
                               const char* file, int line);
int max_active_blocks(int block_threads, size_t dynamic_smem);
const char* last_error_string();

// The launch site, captured by a default argument of the grid's conversion.
struct Grid {
  dim3 dims;
  const char* file;
  int line;
  template <typename T>
  Grid(T grid, const char* file_ = __builtin_FILE(), int line_ = __builtin_LINE())
      : dims(grid), file(file_), line(line_) {}
};

template <typename Kernel>
struct KernelParams;
template <typename... Params>
struct KernelParams<void (*)(Params...)> {
  using Tuple = std::tuple<std::decay_t<Params>...>;
};

// kernel<<<grid, block, smem_bytes, stream>>>(args...): every thread of every block runs
// kernel(args...) on its own copy of the arguments before this returns.
template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, Grid grid, dim3 block, size_t smem_bytes, cudaStream_t,
                   Args&&... args) {
  struct Bound {
    Kernel kernel;
    typename KernelParams<Kernel>::Tuple params;
  };
  Bound bound{kernel, typename KernelParams<Kernel>::Tuple(std::forward<Args>(args)...)};
  launch({reinterpret_cast<const void*>(kernel), grid.dims, block, smem_bytes, grid.file,
          grid.line,
          [](void* p) {  // the kernel takes its parameters by value: a copy per thread
            std::apply(static_cast<Bound*>(p)->kernel, static_cast<Bound*>(p)->params);
          },
          &bound});
}

// The checked flavour's profiler (linfusion_ops.emulated.profile), told by the WMMA emulation
// what one warp's matrix instruction touches: a 16 x 16 tile at ptr with ldm elements between
// its memory rows (element_bytes 2: an operand fragment, modelled as ldmatrix.x4, four phases of
// eight 16-byte rows; 4: an fp32 accumulator, modelled as four 8-byte-per-lane instructions in
// the mma.m16n8 register layout), or one m16n16k16 MMA. No-ops in the fast flavour and while
// profiling is off.
void profile_tile_access(const void* ptr, unsigned ldm, unsigned element_bytes, bool write);
void profile_mma();

inline uint64_t pointer_key(const void* ptr, unsigned ldm) {
  return reinterpret_cast<uintptr_t>(ptr) * 1000003u + ldm;
}

}  // namespace emu
}  // namespace linfusion_ops

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value,
                                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return linfusion_ops::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value,
                                                file, line);
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel*, int block_threads,
                                                          size_t dynamic_smem) {
  *blocks = linfusion_ops::emu::max_active_blocks(block_threads, dynamic_smem);
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) {
  return linfusion_ops::emu::last_error_string();
}

// ---------------------------------------------------------------------------------------------
// Device functions.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  linfusion_ops::emu::syncthreads(file, line);
}

[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  linfusion_ops::emu::fail("__trap", "the kernel trapped", file, line);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffles move plain values");
  struct Lane {
    T value;
    int source;
    T result;
  };
  // PTX shfl.bfly: a source lane in a later group of `width` lanes yields the lane's own value.
  const int lane = linfusion_ops::emu::lane_id();
  int source = lane ^ lane_mask;
  if (source >= (lane / width + 1) * width) source = lane;
  Lane me{var, source, var};
  linfusion_ops::emu::warp_rendezvous(
      "__shfl_xor_sync", mask, static_cast<uint64_t>(lane_mask) << 8 | unsigned(width), &me,
      [](void* const* lanes, unsigned m) {
        for (int l = 0; l < 32; ++l) {
          if (!(m >> l & 1u)) continue;
          Lane& dst = *static_cast<Lane*>(lanes[l]);
          if (!(m >> dst.source & 1u)) {
            linfusion_ops::emu::fail("shuffle outside the mask",
                                     "lane " + std::to_string(l) + " reads lane " +
                                         std::to_string(dst.source) + ", not in the mask",
                                     nullptr, 0);
          }
          dst.result = static_cast<Lane*>(lanes[dst.source])->value;
        }
      },
      file, line);
  return me.result;
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  struct Lane {
    bool predicate;
    unsigned result;
  };
  Lane me{predicate != 0, 0u};
  linfusion_ops::emu::warp_rendezvous(
      "__ballot_sync", mask, 0, &me,
      [](void* const* lanes, unsigned m) {
        unsigned bits = 0;
        for (int l = 0; l < 32; ++l) {
          if (m >> l & 1u && static_cast<Lane*>(lanes[l])->predicate) bits |= 1u << l;
        }
        for (int l = 0; l < 32; ++l) {
          if (m >> l & 1u) static_cast<Lane*>(lanes[l])->result = bits;
        }
      },
      file, line);
  return me.result;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

// Fibers never preempt each other: a plain read-modify-write is atomic. Not a shared-memory
// access for the race detector of the checked flavour.
__attribute__((no_sanitize("thread"))) inline unsigned atomicMax(unsigned* address, unsigned value) {
  const unsigned old = *address;
  if (value > old) *address = value;
  return old;
}

inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
using std::isinf;

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// Device-side asserts end the launch with the emulator's error (torch's host assert would abort
// the process).
#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT(cond)                                                            \
  do {                                                                                      \
    if (!(cond)) ::linfusion_ops::emu::fail("device assert", #cond, __FILE__, __LINE__);    \
  } while (false)
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)                                                   \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      ::linfusion_ops::emu::fail("device assert", std::string(#cond) + ": " + (msg),        \
                                 __FILE__, __LINE__);                                       \
    }                                                                                       \
  } while (false)

// ---------------------------------------------------------------------------------------------
// WMMA (mma.h), m16n16k16. A fragment holds its whole tile in every lane (row-major logical
// order); load / store copy exactly and mma sums exact products in fp64, rounded once to fp32.
// Every op is a warp rendezvous: all 32 lanes, identical pointers and ldm.
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has m16n16k16 only");
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[kRows * kCols];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& e : f.x) e = value;
}

namespace detail {

template <typename T>
inline void check_pointer(const T* ptr, unsigned ldm, const char* op, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    linfusion_ops::emu::fail("wmma misaligned pointer",
                             std::string(op) + " needs a 256-bit aligned pointer", file, line);
  }
  if (ldm * sizeof(T) % 16 != 0) {
    linfusion_ops::emu::fail("wmma bad ldm",
                             std::string(op) + ": ldm = " + std::to_string(ldm) +
                                 " elements is not a multiple of 16 bytes",
                             file, line);
  }
}

template <typename Frag, typename T>
struct LoadLane {
  Frag* frag;
  const T* ptr;
  unsigned ldm;
  bool col_major;
};

template <typename Frag, typename T>
inline void load(Frag& f, const T* ptr, unsigned ldm, bool col_major, const char* file, int line) {
  check_pointer(ptr, ldm, "load_matrix_sync", file, line);
  LoadLane<Frag, T> me{&f, ptr, ldm, col_major};
  linfusion_ops::emu::warp_rendezvous(
      "wmma::load_matrix_sync", 0xffffffffu, linfusion_ops::emu::pointer_key(ptr, ldm), &me,
      [](void* const* lanes, unsigned) {
        const auto& src = *static_cast<LoadLane<Frag, T>*>(lanes[0]);
        linfusion_ops::emu::profile_tile_access(src.ptr, src.ldm, sizeof(T), false);
        Frag tile;
        for (int r = 0; r < Frag::kRows; ++r) {
          for (int c = 0; c < Frag::kCols; ++c) {
            tile.x[r * Frag::kCols + c] =
                src.col_major ? src.ptr[c * src.ldm + r] : src.ptr[r * src.ldm + c];
          }
        }
        for (int l = 0; l < 32; ++l) *static_cast<LoadLane<Frag, T>*>(lanes[l])->frag = tile;
      },
      file, line);
}

}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::load(f, ptr, ldm, std::is_same_v<Layout, col_major>, file, line);
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* ptr, unsigned ldm,
                             layout_t layout, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  detail::load(f, ptr, ldm, layout == mem_col_major, file, line);
}

template <typename T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  using Frag = fragment<accumulator, 16, 16, 16, T>;
  detail::check_pointer(ptr, ldm, "store_matrix_sync", file, line);
  struct Lane {
    const Frag* frag;
    T* ptr;
    unsigned ldm;
    bool col_major;
  };
  Lane me{&f, ptr, ldm, layout == mem_col_major};
  linfusion_ops::emu::warp_rendezvous(
      "wmma::store_matrix_sync", 0xffffffffu, linfusion_ops::emu::pointer_key(ptr, ldm), &me,
      [](void* const* lanes, unsigned) {
        const Lane& src = *static_cast<Lane*>(lanes[0]);
        linfusion_ops::emu::profile_tile_access(src.ptr, src.ldm, sizeof(T), true);
        for (int r = 0; r < 16; ++r) {
          for (int c = 0; c < 16; ++c) {
            src.ptr[src.col_major ? c * src.ldm + r : r * src.ldm + c] = src.frag->x[r * 16 + c];
          }
        }
      },
      file, line);
}

template <typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using Acc = fragment<accumulator, 16, 16, 16, float>;
  struct Lane {
    Acc* d;
    const fragment<matrix_a, 16, 16, 16, TA, LA>* a;
    const fragment<matrix_b, 16, 16, 16, TA, LB>* b;
    const Acc* c;
  };
  Lane me{&d, &a, &b, &c};
  linfusion_ops::emu::warp_rendezvous(
      "wmma::mma_sync", 0xffffffffu, 0, &me,
      [](void* const* lanes, unsigned) {
        const Lane& src = *static_cast<Lane*>(lanes[0]);
        linfusion_ops::emu::profile_mma();
        Acc out;
        for (int i = 0; i < 16; ++i) {
          for (int j = 0; j < 16; ++j) {
            double sum = src.c->x[i * 16 + j];
            for (int k = 0; k < 16; ++k) {
              sum += static_cast<double>(static_cast<float>(src.a->x[i * 16 + k])) *
                     static_cast<double>(static_cast<float>(src.b->x[k * 16 + j]));
            }
            out.x[i * 16 + j] = static_cast<float>(sum);
          }
        }
        for (int l = 0; l < 32; ++l) *static_cast<Lane*>(lanes[l])->d = out;
      },
      file, line);
}

}  // namespace wmma
}  // namespace nvcuda
