// Tensor-core linear-attention kernels for at::BFloat16 inputs (see linear_attention_kernels.cuh).
#include "cuda/linear_attention_tc_launch.cuh"

namespace linfusion_ops {
namespace la_cuda {

template void launch_state_partial_tc<at::BFloat16>(const PartialArgs<at::BFloat16, float>&, FeatureMap,
                                             int, cudaStream_t);
template void launch_apply_tc<at::BFloat16>(const TokenArgs<at::BFloat16, float>&, FeatureMap, int,
                                     cudaStream_t);
template void launch_apply_backward_tc<at::BFloat16>(const TokenArgs<at::BFloat16, float>&, float*, float*,
                                              FeatureMap, int, cudaStream_t);
template int tc_blocks_per_sm<at::BFloat16>(TcKernel, FeatureMap, int);
template void launch_state_backward_tc<at::BFloat16>(const TokenArgs<at::BFloat16, float>&, FeatureMap, int,
                                              cudaStream_t);

}  // namespace la_cuda
}  // namespace linfusion_ops
