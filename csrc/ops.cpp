// The linfusion_ops library's schemas (schemas.h), and the Python module's helpers.
// Kernels live in csrc/cpu/*.cpp and csrc/cuda/*.cu and only add TORCH_LIBRARY_IMPL blocks.

#include <torch/extension.h>

#include <sstream>
#include <string>
#include <vector>

#include "schemas.h"

#ifdef LINFUSION_OPS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef LINFUSION_OPS_VERSION
#define LINFUSION_OPS_VERSION "0.0.0+unknown"
#endif
#ifndef LINFUSION_OPS_CUDA_ARCHS
#define LINFUSION_OPS_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(linfusion_ops, m) { linfusion_ops::define_schemas(m); }

namespace {

std::vector<std::string> split_archs(const std::string& list) {
  std::vector<std::string> archs;
  std::stringstream stream(list);
  std::string item;
  while (std::getline(stream, item, ';')) {
    if (!item.empty()) archs.push_back(item);
  }
  return archs;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = LINFUSION_OPS_VERSION;
  info["torch"] = TORCH_VERSION;
#ifdef LINFUSION_OPS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["archs"] = split_archs(LINFUSION_OPS_CUDA_ARCHS);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "linfusion_ops compiled kernels (ops are registered under torch.ops.linfusion_ops)";
  m.def("build_info", &build_info,
        "Dict describing this build: version, torch, cuda (bool), cuda_version, archs.");
}
