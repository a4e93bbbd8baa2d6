// Deliberately broken kernels, one per emulator check, and a correct control ("ok"): the tests
// run them through run_selftest to prove that every check fires; and, in the checked flavour,
// microkernels whose profiler counters are known ("profile_*"). Compiled into the emulation
// modules only, never into linfusion_ops._C.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <functional>

#include "cuda/launch.cuh"
#include "emu/runtime.h"

namespace linfusion_ops {
namespace emu {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 64;

// The control: a block sum through shared memory, shuffles, a ballot and one WMMA tile.
__global__ void ok_kernel(float* out) {
  __shared__ float partial[kThreads / 32];
  __shared__ __align__(128) __half a[16 * 16];
  __shared__ __align__(128) float c[16 * 16];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float v = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  const unsigned odd = __ballot_sync(kFull, threadIdx.x % 2);
  if (lane == 0) partial[warp] = v + static_cast<float>(__popc(odd));
  for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) a[i] = __float2half_rn(1.f);
  __syncthreads();
  if (warp == 0) {
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, a, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
  }
  __syncthreads();
  if (threadIdx.x == 0) out[0] = partial[0] + partial[1] + c[0];
}

__global__ void barrier_divergent_sites_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void barrier_after_return_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void deadlock_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x < 16) v = __shfl_xor_sync(kFull, v, 1);  // lanes 16-31 wait at the barrier
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void shuffle_missing_lanes_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

__global__ void ballot_missing_lanes_kernel(float* out) {
  unsigned bits = 0;
  if (threadIdx.x % 32 != 7) bits = __ballot_sync(kFull, 1);
  out[threadIdx.x] = static_cast<float>(bits);
}

template <int kOffset, int kLdm, int kLanes>
__global__ void wmma_load_kernel(float* out) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) __half tile[16 * 32 + 64];
  for (int i = threadIdx.x; i < 16 * 32 + 64; i += blockDim.x) tile[i] = __float2half_rn(0.f);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  if (static_cast<int>(threadIdx.x % 32) < kLanes) wmma::load_matrix_sync(fa, tile + kOffset, kLdm);
  out[threadIdx.x] = 1.f;
}

__global__ void plain_kernel(float* out) { out[threadIdx.x] = 1.f; }

__global__ void dynamic_smem_kernel(float* out) {
  LINFUSION_OPS_DYNAMIC_SMEM(float, smem);
  smem[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x];
}

__global__ void device_assert_kernel(float* out) {
  CUDA_KERNEL_ASSERT_MSG(threadIdx.x != 5, "thread 5 must not get here");
  out[threadIdx.x] = 1.f;
}

__global__ void race_write_write_kernel(float* out) {
  __shared__ float word[1];
  word[0] = static_cast<float>(threadIdx.x);  // every thread, no barrier between the writes
  __syncthreads();
  out[threadIdx.x] = word[0];
}

// The shuffle orders the two accesses (whatever the schedule) without ending the barrier
// interval: on a GPU it is no memory fence, so the accesses still race.
__global__ void race_read_write_kernel(float* out) {
  __shared__ float s[kThreads];
  s[threadIdx.x] = 1.f;
  __syncthreads();
  float v = 0.f;
  if (threadIdx.x == 0) v = s[1];
  v = __shfl_xor_sync(kFull, v, 1);
  if (threadIdx.x == 1) s[1] = 2.f;
  out[threadIdx.x] = v;
}

__global__ void race_write_read_kernel(float* out) {
  __shared__ float s[kThreads];
  s[threadIdx.x] = 1.f;
  __syncthreads();
  if (threadIdx.x == 1) s[1] = 2.f;
  float v = __shfl_xor_sync(kFull, 0.f, 1);
  if (threadIdx.x == 0) v = s[1];
  out[threadIdx.x] = v;
}

__global__ void uninitialized_smem_read_kernel(float* out) {
  __shared__ float s[kThreads];
  if (threadIdx.x != 3) s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

__global__ void misaligned_access_kernel(float* out) {
  __shared__ __align__(16) unsigned char bytes[64];
  float* word = reinterpret_cast<float*>(bytes + 2);
  if (threadIdx.x == 0) *word = 1.f;
  __syncthreads();
  out[threadIdx.x] = *word;
}

// A missing barrier between the write and the neighbour's read: the result depends on the
// order in which the threads run.
__global__ void schedule_dependent_kernel(int* out) {
  __shared__ int s[kThreads];
  s[threadIdx.x] = static_cast<int>(threadIdx.x) + 1;
  out[threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

at::Tensor output(at::ScalarType dtype = at::kFloat) { return at::zeros({kThreads}, dtype); }

}  // namespace
}  // namespace emu

// Microkernels with known profiler counters (test_emulator_profiler.py). Outside
// linfusion_ops::emu, whose code the profiler leaves out as the emulator's own.
namespace emu_profile {
namespace {

constexpr int kCopyThreads = 256;
constexpr int kCopyBlocks = 4;
constexpr int kCopyElements = kCopyThreads * kCopyBlocks;

// One float per thread, consecutive threads consecutive words: 4 sectors per request.
__global__ void coalesced_copy_kernel(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];
}

// Reads every other float: each load request touches twice the sectors it needs.
__global__ void strided_copy_kernel(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[2 * i];
}

// Lane l reads word 32 l of shared memory: all 32 lanes in bank 0, 32 wavefronts.
__global__ void bank_conflict_kernel(float* out) {
  __shared__ float s[32 * 32];
  for (int i = threadIdx.x; i < 32 * 32; i += blockDim.x) s[i] = static_cast<float>(i);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x * 32];
}

// A 32 x 32 transpose through shared memory, rows padded to LD words: LD = 33 puts the 32
// words of a column in 32 different banks, LD = 32 puts them all in one.
template <int LD>
__global__ void transpose_kernel(const float* in, float* out) {
  __shared__ float tile[32 * LD];
  const int x = threadIdx.x, y = threadIdx.y;
  tile[y * LD + x] = in[y * 32 + x];
  __syncthreads();
  out[y * 32 + x] = tile[x * LD + y];
}

// One warp, kMmas m16n16k16 products of 16 x 16 fp16 tiles held in shared memory.
constexpr int kMmas = 3;
__global__ void mma_kernel(float* out) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) __half a[16 * 16];
  __shared__ __align__(128) float c[16 * 16];
  for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) a[i] = __float2half_rn(1.f);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, a, 16);
  for (int i = 0; i < kMmas; ++i) wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) out[i] = c[i];
}

at::Tensor ramp(int64_t n) { return at::arange(n, at::kFloat); }

at::Tensor copy(void (*kernel)(const float*, float*), int stride) {
  const at::Tensor in = ramp(int64_t(kCopyElements) * stride);
  at::Tensor out = at::empty({kCopyElements}, at::kFloat);
  launch_kernel(kernel, kCopyBlocks, kCopyThreads, 0, nullptr, in.data_ptr<float>(),
                out.data_ptr<float>());
  return out;
}

template <int LD>
at::Tensor transpose() {
  const at::Tensor in = ramp(32 * 32);
  at::Tensor out = at::empty({32, 32}, at::kFloat);
  launch_kernel(transpose_kernel<LD>, 1, dim3(32, 32), 0, nullptr, in.data_ptr<float>(),
                out.data_ptr<float>());
  return out;
}

}  // namespace
}  // namespace emu_profile

namespace emu {
namespace {

template <typename Kernel>
c10::optional<at::Tensor> run(Kernel kernel, dim3 block = dim3(kThreads), size_t smem = 0) {
  at::Tensor out = output();
  launch_kernel(kernel, 1, block, smem, nullptr, out.data_ptr<float>());
  return c10::nullopt;
}

struct Selftest {
  const char* name;
  bool checked_only;
  std::function<c10::optional<at::Tensor>()> run;
};

const std::vector<Selftest>& selftests() {
  static const std::vector<Selftest> tests = {
      {"ok", false, [] { return run(ok_kernel); }},
      {"barrier_divergent_sites", false, [] { return run(barrier_divergent_sites_kernel); }},
      {"barrier_after_return", false, [] { return run(barrier_after_return_kernel); }},
      {"deadlock", false, [] { return run(deadlock_kernel); }},
      {"shuffle_missing_lanes", false, [] { return run(shuffle_missing_lanes_kernel); }},
      {"ballot_missing_lanes", false, [] { return run(ballot_missing_lanes_kernel); }},
      {"wmma_missing_lanes", false, [] { return run(wmma_load_kernel<0, 32, 31>); }},
      {"wmma_misaligned_pointer", false, [] { return run(wmma_load_kernel<8, 32, 32>); }},
      {"wmma_bad_ldm", false, [] { return run(wmma_load_kernel<0, 20, 32>); }},
      {"too_many_threads", false, [] { return run(plain_kernel, dim3(32, 33)); }},
      {"dynamic_smem_no_optin", false,
       [] { return run(dynamic_smem_kernel, dim3(kThreads), 64 * 1024); }},
      {"dynamic_smem_over_optin", false,
       [] {
         const size_t bytes = device_properties()->sharedMemPerBlockOptin + 1024;
         C10_CUDA_CHECK(cudaFuncSetAttribute(dynamic_smem_kernel,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(bytes)));
         return run(dynamic_smem_kernel, dim3(kThreads), bytes);
       }},
      {"device_assert", false, [] { return run(device_assert_kernel); }},
      {"race_write_write", true, [] { return run(race_write_write_kernel); }},
      {"race_read_write", true, [] { return run(race_read_write_kernel); }},
      {"race_write_read", true, [] { return run(race_write_read_kernel); }},
      {"uninitialized_smem_read", true, [] { return run(uninitialized_smem_read_kernel); }},
      {"misaligned_access", true, [] { return run(misaligned_access_kernel); }},
      {"profile_coalesced_copy", true,
       [] { return emu_profile::copy(emu_profile::coalesced_copy_kernel, 1); }},
      {"profile_strided_copy", true,
       [] { return emu_profile::copy(emu_profile::strided_copy_kernel, 2); }},
      {"profile_bank_conflict", true,
       []() -> c10::optional<at::Tensor> {
         at::Tensor out = at::empty({32}, at::kFloat);
         launch_kernel(emu_profile::bank_conflict_kernel, 1, 32, 0, nullptr, out.data_ptr<float>());
         return out;
       }},
      {"profile_transpose_padded", true, [] { return emu_profile::transpose<33>(); }},
      {"profile_transpose_unpadded", true, [] { return emu_profile::transpose<32>(); }},
      {"profile_mma", true,
       []() -> c10::optional<at::Tensor> {
         at::Tensor out = at::empty({16, 16}, at::kFloat);
         launch_kernel(emu_profile::mma_kernel, 1, 32, 0, nullptr, out.data_ptr<float>());
         return out;
       }},
      {"schedule_dependent", false,
       []() -> c10::optional<at::Tensor> {
         at::Tensor out = output(at::kInt);
         launch_kernel(schedule_dependent_kernel, 1, kThreads, 0, nullptr, out.data_ptr<int>());
         return out;
       }},
  };
  return tests;
}

#ifdef LINFUSION_OPS_EMU_CHECKED
constexpr bool kChecked = true;
#else
constexpr bool kChecked = false;
#endif

}  // namespace

std::vector<std::string> selftest_names() {
  std::vector<std::string> names;
  for (const Selftest& t : selftests()) {
    if (!t.checked_only || kChecked) names.emplace_back(t.name);
  }
  return names;
}

c10::optional<at::Tensor> run_selftest(const std::string& name) {
  for (const Selftest& t : selftests()) {
    if (name != t.name) continue;
    TORCH_CHECK(!t.checked_only || kChecked, "linfusion_ops emulator: selftest '", name,
                "' needs the checked flavour (build with LINFUSION_OPS_CUDA_EMU=checked)");
    return t.run();
  }
  TORCH_CHECK(false, "linfusion_ops emulator: no selftest named '", name, "'");
}

}  // namespace emu
}  // namespace linfusion_ops
