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
        pybind11::arg("multiprocessor_count") = 0, pybind11::arg("registers_per_thread") = 0);
  m.def("set_schedule", &emu::set_schedule, pybind11::arg("order"), pybind11::arg("seed") = 0);
  m.def("current_settings", [] {
    const emu::Settings s = emu::current_settings();
    pybind11::dict d;
    d["device"] = s.device;
    d["multiprocessor_count"] = s.multiprocessor_count;
    d["registers_per_thread"] = s.registers_per_thread;
    d["schedule"] = s.schedule;
    d["seed"] = s.seed;
    return d;
  });
  m.def("device_names", &emu::device_names);
  m.def("launch_log", &emu::launch_log);
  m.def("clear_launch_log", &emu::clear_launch_log);
  m.def("selftest_names", &emu::selftest_names);
  m.def("run_selftest", &emu::run_selftest, pybind11::arg("name"));
  m.def("set_profiling", &emu::set_profiling, pybind11::arg("on"));
  m.def("take_profile", [] {
    auto counters = [](const emu::ProfileCounters& c) {
      pybind11::dict d;
      d["requests"] = c.requests;
      d["bytes"] = c.bytes;
      d["units"] = c.units;
      d["ideal"] = c.ideal;
      return d;
    };
    auto dims = [](const dim3& v) { return pybind11::make_tuple(v.x, v.y, v.z); };
    pybind11::list records;
    for (const emu::ProfileRecord& r : emu::take_profile()) {
      pybind11::dict d;
      d["kernel"] = r.kernel;
      d["grid"] = dims(r.grid);
      d["block"] = dims(r.block);
      d["dynamic_smem"] = r.dynamic_smem;
      d["static_smem"] = r.static_smem;
      d["blocks"] = r.blocks;
      d["barriers"] = r.barriers;
      d["mma"] = r.mma;
      d["global_load"] = counters(r.global_load);
      d["global_store"] = counters(r.global_store);
      d["shared_load"] = counters(r.shared_load);
      d["shared_store"] = counters(r.shared_store);
      d["load_sectors"] = r.load_sectors;
      d["store_sectors"] = r.store_sectors;
      d["block_load_sectors"] = r.block_load_sectors;
      d["block_store_sectors"] = r.block_store_sectors;
      pybind11::list sites;
      for (const emu::ProfileSite& s : r.sites) {
        pybind11::dict site = counters(s.counters);
        site["where"] = s.where;
        site["space"] = s.shared ? "shared" : "global";
        site["op"] = s.write ? "store" : "load";
        sites.append(site);
      }
      d["sites"] = sites;
      records.append(d);
    }
    return records;
  });
}
