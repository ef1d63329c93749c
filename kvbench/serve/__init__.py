"""kvbench.serve: a discrete-event serving simulator (simpy) with a vLLM-like baseline and four serving systems.

Layers, lowest first: ``arch`` / ``hardware`` (what is served on what) -> ``cost`` (iteration times from operators)
-> ``workload`` (requests) -> ``memory`` (KV allocators) -> ``core`` (the replica's event loop) -> the systems
(``vllm``, ``fastswitch``, ``vattention``, ``epd``, ``expertflow``) -> ``run`` (run directories) -> ``report``.
Real mechanisms live beside them: ``vmem`` (demand-paged KV), ``copybench`` (scattered vs grouped copies),
``moe`` (routing traces from router hooks), ``calibrate`` (the embedded model's measured costs, the cpu profile),
``gpubench`` (operator rates on a GPU), ``kvsource`` (a kvbench run directory as the KV policy).
Documentation: ``docs/serving.md``.
"""
