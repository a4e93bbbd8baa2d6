// The emulation module (linfusion_ops._C_emu, or _C_emu_checked): the schemas of every op under
// its own namespace, whose CPU kernels are the emulated CUDA kernels of csrc/cuda, and the
// emulator's knobs for linfusion_ops.emulated.
#include <torch/extension.h>

#include "emu/runtime.h"
#include "schemas.h"

#ifndef LINFUSION_OPS_EMU_NAMESPACE
#error "LINFUSION_OPS_EMU_NAMESPACE names the op namespace of this emulation module"
#endif

#define LINFUSION_OPS_STRINGIFY_(x) #x
#define LINFUSION_OPS_STRINGIFY(x) LINFUSION_OPS_STRINGIFY_(x)

TORCH_LIBRARY(LINFUSION_OPS_EMU_NAMESPACE, m) { linfusion_ops::define_schemas(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace emu = linfusion_ops::emu;
  m.doc() = "linfusion_ops' CUDA kernels, emulated on CPU (ops under torch.ops." LINFUSION_OPS_STRINGIFY(
      LINFUSION_OPS_EMU_NAMESPACE) ")";
  m.attr("namespace") = LINFUSION_OPS_STRINGIFY(LINFUSION_OPS_EMU_NAMESPACE);
#ifdef LINFUSION_OPS_EMU_CHECKED
  m.attr("flavour") = "checked";
#else
  m.attr("flavour") = "fast";
#endif
  m.def("set_device", &emu::set_device, pybind11::arg("name"),
        pybind11::arg("multiprocessor_count") = 0);
  m.def("set_schedule", &emu::set_schedule, pybind11::arg("order"), pybind11::arg("seed") = 0);
  m.def("current_settings", [] {
    const emu::Settings s = emu::current_settings();
    pybind11::dict d;
    d["device"] = s.device;
    d["multiprocessor_count"] = s.multiprocessor_count;
    d["schedule"] = s.schedule;
    d["seed"] = s.seed;
    return d;
  });
  m.def("device_names", &emu::device_names);
  m.def("launch_log", &emu::launch_log);
  m.def("clear_launch_log", &emu::clear_launch_log);
  m.def("selftest_names", &emu::selftest_names);
  m.def("run_selftest", &emu::run_selftest, pybind11::arg("name"));
}
