"""benchmarks/gpu_vs_model.py's reading of Nsight Compute's CSV (no GPU needed)."""

import pytest

from benchmarks.gpu_vs_model import ncu_summary, parse_ncu_csv

# ncu --csv output as recorded on an H200 (commit 4de0116): the first line was cut off mid-row
# (the run kept only the end of ncu's stdout), then one whole launch of 12 metrics.
SAMPLE = """\
512, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","268,459,008"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","8,529,664"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","0"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","9,280"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum","","0"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum","","0"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum","","66,560"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","l1tex__t_requests_pipe_lsu_mem_global_op_st.sum","","2,080"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum","sector","266,240"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum","sector","8,320"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","sm__warps_active.avg.pct_of_peak_sustained_active","%","23.65"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","smsp__inst_executed_op_shared_ld.sum","inst","0"
"4","1107","python3.12","127.0.0.1","void linear_attention_reduce_partials_kernel<float>(const T1 *, const T1 *, T1 *, T1 *, const long *, long, long, int, int, int, int, long, bool, long)","1","7","(256, 1, 1)","(272, 1, 1)","0","9.0","Command line profiler metrics","smsp__inst_executed_op_shared_st.sum","inst","0"
"""


def test_parse_ncu_csv_skips_a_cut_line_and_reads_one_launch():
    launches = parse_ncu_csv("==PROF== Connected to process 1107\n" + SAMPLE)
    assert [launch["id"] for launch in launches] == [4]
    launch = launches[0]
    assert launch["kernel"] == "linear_attention_reduce_partials_kernel<float>"
    assert launch["grid"] == "(272, 1, 1)" and launch["block"] == "(256, 1, 1)"
    assert len(launch["metrics"]) == 12
    assert launch["metrics"]["gpu__time_duration.sum"] == 9280.0
    assert launch["metrics"]["dram__bytes_read.sum"] == 8529664.0
    summary = ncu_summary(launch["metrics"])
    assert summary["us"] == 9.28
    assert summary["dram_mb"] == 8.53
    assert summary["load_sectors_per_request"] == 4.0
    assert summary["store_sectors_per_request"] == 4.0
    assert summary["warps_active_pct"] == 23.65
    assert summary["dram_gbps"] == pytest.approx(8529664 / 9.28e-6 / 1e9, abs=0.1)


def test_parse_ncu_csv_with_its_header_uses_the_header():
    header = ",".join(f'"{c}"' for c in ["ID", "Kernel Name", "Grid Size", "Block Size", "Metric Name",
                                         "Metric Unit", "Metric Value"])
    row = '"0","void k(int)","(2, 1, 1)","(32, 1, 1)","gpu__time_duration.sum","ns","1,500"'
    (launch,) = parse_ncu_csv(header + "\n" + row + "\n")
    assert launch["kernel"] == "k" and launch["metrics"] == {"gpu__time_duration.sum": 1500.0}
    assert ncu_summary(launch["metrics"])["dram_gbps"] == 0.0
