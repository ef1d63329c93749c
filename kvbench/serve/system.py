"""What every serving system shares: the simulation context, the result, and driving requests into replicas."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import simpy

from kvbench.errors import UsageError
from kvbench.serve.arch import Arch
from kvbench.serve.core import Replica, ServerConfig
from kvbench.serve.hardware import Hardware
from kvbench.serve.metrics import SLO, SLORule, request_rows, summarize
from kvbench.serve.workload import Request, all_turns

GiB = 2**30


@dataclass
class SimContext:
    """Everything a system needs besides its own parameters."""

    arch: Arch
    hw: Hardware
    server: ServerConfig
    workload: Any  # the workload's config node
    seed: int = 0
    slo: SLO | None = None  # absolute bounds; a derived one is set by kvbench.serve.slo.resolve before the runs
    slo_rule: SLORule | None = None  # how to derive it (slo.scale)
    out_dir: Any = None  # the run directory (systems may write their own files there)

    def kv_bytes(self) -> float:
        """KV memory of one device: ``server.kv_gb`` or what the weights leave of ``mem_bytes * mem_util``."""
        if self.server.kv_gb is not None:
            return self.server.kv_gb * GiB
        free = self.hw.mem_bytes * self.hw.mem_util - self.arch.weight_bytes
        if free <= 0:
            raise UsageError(f"{self.arch.name} ({self.arch.weight_bytes / GiB:.1f} GiB of weights) does not fit "
                             f"in {self.hw.name}'s memory; pick a larger hardware profile or set server.kv_gb")
        return free

    def max_seqs(self) -> int:
        return min(self.server.max_seqs, self.hw.batch_limit) if self.hw.batch_limit else self.server.max_seqs


@dataclass
class SimResult:
    metrics: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[tuple] = field(default_factory=list)
    digest: str = ""


@dataclass
class System(ABC):
    """A serving system: ``simulate`` requests on a context; ``baselines`` it is compared with.

    ``name`` names the run directory and the system in tables (a variant is the same class with another name)."""

    name: str = "system"
    headline: ClassVar[tuple[str, ...]] = ("throughput_tok_s", "ttft_s_p99", "tbt_s_p99")  # comparison.png

    @abstractmethod
    def simulate(self, requests: list[Request], ctx: SimContext) -> SimResult:
        """Serve ``requests`` on the context's simulated hardware; the per-request timings and counters."""

    def baselines(self) -> dict[str, System]:
        return {}

    def measurements(self, ctx: SimContext) -> dict[str, Any]:
        """Real measurements of the system's mechanism on this machine (stored as ``real_cpu``)."""
        return {}


def drive(env: simpy.Environment, replica: Replica, requests: list[Request]) -> None:
    """Submit every first request at its arrival time (later turns follow their previous turn)."""

    def arrivals() -> Any:
        for r in requests:
            yield env.timeout(max(r.arrival - env.now, 0.0))
            replica.submit(r)

    env.process(arrivals())


def check_conservation(requests: list[Request], finished: list[Any], rejected: list[Request] = ()) -> None:
    """Every request (every turn) finished exactly once with exactly its output tokens, or was rejected."""
    out = {r.id for r in rejected}
    want = {r.id: r.output for r in all_turns(requests) if r.id not in out}
    got = {s.req.id: len(s.token_times) for s in finished}
    if len(finished) != len(got) or got != want:
        missing = sorted(set(want) - set(got))[:5]
        raise RuntimeError(f"simulation lost requests or tokens (missing {missing}, {len(finished)} finished)")


def replica_result(rep: Replica, requests: list[Request], ctx: SimContext, **extra: Any) -> SimResult:
    check_conservation(requests, rep.done, rep.rejected)
    n = rep.n
    metrics = summarize(rep.done, ctx.slo) | {"rejected": len(rep.rejected),
        "preemptions": n.preemptions, "swap_out": n.swap_out, "swap_in": n.swap_in, "swap_bytes": n.swap_bytes,
        "copy_calls": n.copy_calls, "swap_stall_s": n.swap_stall_s, "copy_busy_s": n.copy_busy_s,
        "recomputed_tokens": n.recomputed_tokens, "reused_tokens": n.reused_tokens, "iterations": n.iterations,
        "max_batch": n.max_batch, "peak_kv_bytes": n.peak_kv_bytes,
        "decode_tok_s": n.decode_tokens / n.decode_s if n.decode_s else None,
        "fragmentation": n.frag_sum / n.iterations if n.iterations else None, "kv_capacity_bytes": rep.space.capacity,
        "min_free_kv_bytes": n.min_free_bytes, "busy_s": n.busy_s, "server": asdict(rep.cfg), **extra}
    return SimResult(metrics, request_rows(rep.done), rep.log, rep.trace_digest())
