"""The replica: continuous batching on a simpy event loop (vLLM v0's scheduler, with the hooks the systems change).

Every iteration is either a prefill batch (sequences admitted in rank order while the KV space allows, up to
``max_batched_tokens``) or a decode batch (one token for every running sequence). When a decoding sequence cannot
grow, the lowest-ranked running sequence is preempted, by recompute (its KV is dropped and later re-prefilled over
prompt + generated tokens) or by swap (its blocks are copied to host memory: ``calls * copy_call_s + bytes / pcie``
with ``calls = 2 * layers * contiguous runs``). Ranks are FCFS (arrival) or, with ``scheduler=priority``,
VTC-style fairness (the client with the fewest served tokens first, input tokens weighted 1 and output tokens 2),
re-ranked every ``rerank_every`` iterations, preempting running sequences that fall out of the top set.

Swaps are synchronous (the iteration stalls) unless ``async_swap``: then they run on one copy stream (a simpy
resource) overlapping compute, and a sequence joins a batch only when its copy is done. ``reuse_kv`` keeps host
copies valid: a later swap-out writes only blocks added since, and the next turn of a conversation swaps its
history in instead of recomputing it (FastSwitch). Times are simulated seconds; nothing here sleeps.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import simpy

from kvbench.serve.cost import Batch, CostModel
from kvbench.serve.workload import Request


@dataclass
class ServerConfig:
    block_tokens: int = 16
    max_seqs: int = 256
    max_batched_tokens: int = 8192
    preemption: str = "recompute"  # recompute | swap
    scheduler: str = "fcfs"  # fcfs | priority
    rerank_every: int = 1
    watermark: float = 0.01  # share of KV blocks kept free when admitting (vLLM)
    swap_gb: float = 4.0  # host memory for swapped KV
    kv_gb: float | None = None  # KV memory of the device; null: mem_bytes * mem_util - weights
    async_swap: bool = False
    reuse_kv: bool = False
    kv_ratio: float = 1.0  # share of prefilled tokens whose KV is kept (a compression method's kept fraction)
    compress_frac: float = 0.0  # the method's compression time / its prefill time (added to prefill iterations)


@dataclass
class Seq:
    req: Request
    cached: int = 0  # tokens whose KV is held on the device
    pending: int = 0  # tokens to prefill before the next token
    generated: int = 0
    state: str = "waiting"  # waiting | running | out (copy to host) | swapped | in (copy to device) | done
    host: int = 0  # tokens with a valid host copy
    host_bytes: int = 0  # host memory that copy holds
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0
    finish_after_out: bool = False

    @property
    def sid(self) -> int:
        return self.req.id


@dataclass
class Counters:
    preemptions: int = 0
    swap_out: int = 0
    swap_in: int = 0
    swap_bytes: float = 0.0
    copy_calls: int = 0
    swap_stall_s: float = 0.0  # iteration time spent waiting for synchronous copies
    copy_busy_s: float = 0.0  # time the copy stream was busy (async)
    recomputed_tokens: int = 0
    reused_tokens: int = 0  # history tokens swapped in instead of recomputed
    peak_kv_bytes: int = 0
    min_free_bytes: float = math.inf
    max_batch: int = 0
    iterations: int = 0
    busy_s: float = 0.0
    decode_s: float = 0.0  # time in decode iterations
    decode_tokens: int = 0
    frag_sum: float = 0.0  # sum over iterations of 1 - (bytes of held tokens) / (bytes allocated)


class Replica:
    """One serving instance. ``space`` is a KV allocator of :mod:`kvbench.serve.memory`."""

    def __init__(self, env: simpy.Environment, cost: CostModel, space: Any, cfg: ServerConfig,
                 host_bytes: float) -> None:
        self.env, self.cost, self.space, self.cfg = env, cost, space, cfg
        self.host_bytes, self.host_used = host_bytes, 0.0
        self.host_copies: OrderedDict[int, tuple[int, float]] = OrderedDict()  # conv -> (tokens, bytes), LRU
        self.seqs: dict[int, Seq] = {}
        self.done: list[Seq] = []
        self.rejected: list[Request] = []
        self.capacity_units = space.capacity // space.unit_bytes
        self.served: dict[int, float] = {}  # client -> VTC counter
        self.n = Counters()
        self.log: list[tuple] = []  # one row per iteration: the deterministic trace
        self.link = simpy.Resource(env, capacity=1)
        self.wake = env.event()
        self.stall = 0.0
        self.extra_s = 0.0  # system-specific time added to the current iteration (e.g. page mapping)
        self.iteration = 0
        self.handoff: Any = None  # prefill-only instance: called with each sequence after its first token
        env.process(self.loop())

    # -- arrivals ---------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """A new request; one that could never fit, even alone, is rejected with its later turns (as vLLM
        ignores prompts longer than its KV capacity)."""
        if self.space.units_for(req.prompt + req.output) + self.reserve_units() > self.capacity_units:
            r: Request | None = req
            while r is not None:
                self.rejected.append(r)
                r = r.next
            return
        s = Seq(req, pending=req.prompt)
        self.seqs[req.id] = s
        self.served.setdefault(self.client(s), 0.0)
        self.kick()

    def kick(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()

    def client(self, s: Seq) -> int:
        return s.req.conv if s.req.conv >= 0 else -1 - s.req.id

    def rank(self, s: Seq) -> tuple:
        if self.cfg.scheduler == "priority":
            return (self.served[self.client(s)], s.req.arrival, s.sid)
        return (s.req.arrival, s.sid)

    def in_state(self, *states: str) -> list[Seq]:
        return sorted((s for s in self.seqs.values() if s.state in states), key=self.rank)

    # -- the event loop ---------------------------------------------------------------------------------------
    def loop(self) -> Any:
        while True:
            batch, members = self.plan()
            if not members:
                self.wake = self.env.event()
                yield self.wake
                continue
            t = self.cost.iteration_s(batch) + self.stall + self.extra_s
            t += self.cfg.compress_frac * self.cost.iteration_s(Batch(prefill=batch.prefill))
            self.n.swap_stall_s += self.stall
            self.record(batch, t)
            yield self.env.timeout(t)
            self.n.busy_s += t
            self.finish_iteration(members)

    def record(self, batch: Batch, t: float) -> None:
        self.n.iterations += 1
        self.n.max_batch = max(self.n.max_batch, batch.n_seqs)
        used = self.space.used
        if batch.decode:
            self.n.decode_s += t
            self.n.decode_tokens += len(batch.decode)
        if used:
            held = sum(s.cached for s in self.seqs.values() if s.state in ("running", "out", "in"))
            self.n.frag_sum += 1 - held * self.cost.arch.kv_bytes_per_token / used
        self.n.peak_kv_bytes = max(self.n.peak_kv_bytes, used)
        self.n.min_free_bytes = min(self.n.min_free_bytes, self.space.capacity - used)
        self.log.append((round(self.env.now, 9), len(batch.prefill), len(batch.decode), batch.tokens, used,
                         round(t, 12)))

    def plan(self) -> tuple[Batch, list[Seq]]:
        """Decide this iteration's batch (and the preemptions and swaps it needs)."""
        self.stall, self.extra_s = 0.0, 0.0
        self.iteration += 1
        if self.cfg.scheduler == "priority" and self.iteration % max(self.cfg.rerank_every, 1) == 0:
            self.rerank()
        prefills = self.admit()
        if prefills:
            return Batch(prefill=[(s.pending, s.cached) for s in prefills]), prefills
        decodes = self.reserve_decodes()
        return Batch(decode=[s.cached for s in decodes]), decodes

    # -- admission ----------------------------------------------------------------------------------------------
    def reserve_units(self) -> int:
        return int(self.cfg.watermark * self.space.capacity / self.space.unit_bytes)

    def kv_after_prefill(self, s: Seq) -> int:
        return s.cached + max(math.ceil(self.cfg.kv_ratio * s.pending), 1)

    def admit(self) -> list[Seq]:
        """Prefill batch: ready sequences, then waiting / swapped ones in rank order, stopping at the first that
        does not fit (FCFS head-of-line, as vLLM)."""
        batch = [s for s in self.in_state("running") if s.pending > 0]
        tokens = sum(s.pending for s in batch)
        n_running = len(self.in_state("running", "in"))
        for s in self.in_state("waiting", "swapped"):
            if n_running >= self.cfg.max_seqs:
                break
            if s.state == "swapped":
                if not self.swap_in(s):
                    break
                n_running += 1
                continue
            if s.pending == 0:  # arrived prefilled (disaggregated decode): joins the decode batch
                if not self.space.fits(s.sid, s.cached + 1, self.reserve_units()):
                    break
                self.space.grow(s.sid, s.cached + 1)
                s.state = "running"
                n_running += 1
                continue
            hist = self.reusable(s)
            need = hist + max(math.ceil(self.cfg.kv_ratio * (s.pending - hist)), 1)
            if not self.space.fits(s.sid, need, self.reserve_units()):
                break
            if batch and tokens + s.pending - hist > self.cfg.max_batched_tokens:
                break
            self.space.grow(s.sid, need)
            n_running += 1
            if hist:
                self.bring_history(s, hist)
                continue
            s.state = "running"
            batch.append(s)
            tokens += s.pending
        return [s for s in batch if s.state == "running"]

    def reserve_decodes(self) -> list[Seq]:
        """Every running sequence gets room for one more token; the lowest-ranked are preempted when it runs out."""
        running = [s for s in self.in_state("running") if s.pending == 0]
        kept: list[Seq] = []
        while running:
            s = running.pop(0)
            while not self.space.grow(s.sid, s.cached + 1):
                victim = running.pop() if running else s
                self.preempt(victim)
                if victim is s:
                    break
            else:
                kept.append(s)
        return kept

    def rerank(self) -> None:
        """Priority scheduling: the top-ranked sequences that fit should run; preempt running ones that do not."""
        live = self.in_state("running", "swapped", "waiting")
        budget = self.space.capacity // self.space.unit_bytes - self.reserve_units()
        top: set[int] = set()
        for s in live:
            units = self.space.units_for((s.cached if s.state != "waiting" else s.pending) + 1)
            if units > budget or len(top) >= self.cfg.max_seqs:
                break
            budget -= units
            top.add(s.sid)
        if any(s.state != "running" for s in live if s.sid in top):
            for s in live:
                if s.state == "running" and s.sid not in top:
                    self.preempt(s)

    # -- preemption and swaps -----------------------------------------------------------------------------------
    def preempt(self, s: Seq) -> None:
        self.n.preemptions += 1
        s.preemptions += 1
        if self.cfg.preemption == "swap" and s.pending == 0 and self.swap_out(s):
            return
        self.space.release(s.sid)
        self.drop_host(s)
        self.n.recomputed_tokens += s.cached
        s.pending, s.cached, s.state = s.req.prompt + s.generated, 0, "waiting"

    def copy(self, nbytes: float, calls: int, then: Any) -> None:
        """A copy of ``nbytes`` in ``calls`` calls: an iteration stall, or a job on the async copy stream."""
        t = self.cost.copy_s(nbytes, calls)
        self.n.swap_bytes += nbytes
        self.n.copy_calls += calls
        if not self.cfg.async_swap:
            self.stall += t
            then()
            return

        def job() -> Any:
            with self.link.request() as slot:
                yield slot
                yield self.env.timeout(t)
                self.n.copy_busy_s += t
            then()
            self.kick()

        self.env.process(job())

    def host_room(self, nbytes: float) -> bool:
        """Make room in host memory by dropping copies that are only a saving: least recently used conversation
        histories first, then the still-valid copies of sequences running on the device. False if impossible."""
        while self.host_used + nbytes > self.host_bytes and self.host_copies:
            _, (_, b) = self.host_copies.popitem(last=False)
            self.host_used -= b
        for s in self.in_state("running")[::-1]:  # lowest-ranked first
            if self.host_used + nbytes <= self.host_bytes:
                break
            self.drop_host(s)
        return self.host_used + nbytes <= self.host_bytes

    def drop_host(self, s: Seq) -> None:
        self.host_used -= s.host_bytes
        s.host, s.host_bytes = 0, 0

    def swap_out(self, s: Seq) -> bool:
        """Copy the sequence's blocks to the host (with ``reuse_kv`` only those past its valid host copy)."""
        total = self.space.units_for(s.cached) * self.space.unit_bytes
        start = s.host if self.cfg.reuse_kv else 0
        if not self.cfg.reuse_kv:
            self.drop_host(s)
        first = start // self.space.block_tokens  # first block not already on the host
        nbytes = total - first * self.space.unit_bytes
        if not self.host_room(nbytes):
            return False
        calls = 2 * self.cost.arch.layers * self.space.runs(s.sid, first * self.space.block_tokens)
        self.host_used += nbytes
        s.host_bytes += nbytes
        self.n.swap_out += 1
        s.state = "out"

        def done() -> None:
            self.space.release(s.sid)
            s.host = s.cached
            if s.finish_after_out:
                s.state = "done"
                self.keep_history(s)
            else:
                s.state = "swapped"

        self.copy(nbytes, calls, done)
        return True

    def swap_in(self, s: Seq) -> bool:
        if not self.space.fits(s.sid, s.cached + 1, self.reserve_units()):
            return False
        self.space.grow(s.sid, s.cached + 1)
        self.n.swap_in += 1
        s.state = "in"
        nbytes = self.space.units_for(s.cached) * self.space.unit_bytes
        calls = 2 * self.cost.arch.layers * self.space.runs(s.sid)
        if not self.cfg.reuse_kv:
            self.drop_host(s)

        def done() -> None:
            s.state = "running"

        self.copy(nbytes, calls, done)
        return True

    # -- conversations ------------------------------------------------------------------------------------------
    def reusable(self, s: Seq) -> int:
        """History tokens of this turn with a host copy (FastSwitch's KV reuse across turns)."""
        if not self.cfg.reuse_kv or s.req.conv < 0 or s.cached or s.req.conv not in self.host_copies:
            return 0
        return min(self.host_copies[s.req.conv][0], s.req.history)

    def bring_history(self, s: Seq, hist: int) -> None:
        """Swap a conversation's history in; the turn then prefills only its new tokens. The host copy stays
        valid (it now belongs to this turn), so the turn's own swap-outs write only what it adds."""
        _, nbytes = self.host_copies.pop(s.req.conv)
        s.host, s.host_bytes = hist, nbytes
        s.cached, s.pending, s.state = hist, s.pending - hist, "in"
        self.n.swap_in += 1
        self.n.reused_tokens += hist

        def done() -> None:
            s.state = "running"

        self.copy(self.space.units_for(hist) * self.space.unit_bytes,
                  2 * self.cost.arch.layers * self.space.runs(s.sid), done)

    def keep_history(self, s: Seq) -> None:
        """A finished turn's host copy becomes its conversation's (for the next turn), or is dropped."""
        if s.req.next is not None:
            self.host_copies[s.req.conv] = (s.host, s.host_bytes)
            s.host, s.host_bytes = 0, 0
        else:
            self.drop_host(s)

    # -- end of an iteration ------------------------------------------------------------------------------------
    def finish_iteration(self, members: list[Seq]) -> None:
        now = self.env.now
        for s in members:
            if s.state != "running":  # preempted by a later decision of the same plan
                continue
            if s.pending:
                s.cached = self.kv_after_prefill(s)
                self.served[self.client(s)] += s.pending
                s.pending = 0
            else:
                s.cached += 1
            s.generated += 1
            self.served[self.client(s)] += 2
            s.token_times.append(now)
            if s.first_token is None:
                s.first_token = now
            if s.generated >= s.req.output:
                self.complete(s)
            elif self.handoff is not None and s.generated == 1:
                self.space.release(s.sid)
                s.state = "moved"
                del self.seqs[s.sid]
                self.handoff(s)

    def submit_prefilled(self, s: Seq) -> None:
        """A sequence prefilled elsewhere (its KV arrived): decoded here from its second token on."""
        self.seqs[s.req.id] = Seq(s.req, cached=s.cached, generated=s.generated, token_times=list(s.token_times),
                                  first_token=s.first_token)
        self.served.setdefault(self.client(s), 0.0)
        self.kick()

    def complete(self, s: Seq) -> None:
        self.done.append(s)
        if self.cfg.reuse_kv and s.req.next is not None and self.cfg.preemption == "swap":
            s.finish_after_out = True
            if self.swap_out(s):
                self.follow_up(s)
                return
        self.space.release(s.sid)
        self.drop_host(s)
        s.state = "done"
        self.follow_up(s)

    def follow_up(self, s: Seq) -> None:
        nxt = s.req.next
        if nxt is None:
            return

        def later() -> Any:
            yield self.env.timeout(nxt.think_s)
            nxt.arrival = self.env.now
            self.submit(nxt)

        self.env.process(later())

    def trace_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.log).encode()).hexdigest()[:16]
