"""What the engine does about a worker fault (DESIGN.md §5): replace the workers, or give up.

When a step fails with `WorkerFailed`, the engine drops the step and hands the fault here.
The executor repairs what failed and says what it replaced (a `Repair`). A dead or stalled
worker is repaired alone (cluster/worker_repair.py): for an expert worker every KV cache is
kept, nothing is requeued, and the engine's next step re-runs the one that failed (the
scheduler only advances a sequence when a step's results come back). A new attention worker
has lost its KV cache: its running sequences, and only those, go back to the waiting queue and
prefill again from prompt + generated ids, so a greedy continuation is the one it would have
been; a whole-group restart does that for every attention worker. Streams pause meanwhile.
When the recovery policy refuses, or the recovery itself fails, every request ends with an
explicit error and the engine turns unhealthy for good: new requests get the same error at once.

The engine reaches its requests through two callables (`requeue_running`, `fail_all`) and
its executor through the `Executor` protocol; this module holds the decision, the counters
and the listeners (metrics, tests) that hear of every outcome as a `RecoveryEvent`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cluster.executor import Executor
from cluster.listeners import notify
from cluster.recovery_event import RecoveryEvent
from cluster.recovery_policy import RecoveryPolicy
from cluster.worker_fault import WorkerFault

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, policy: RecoveryPolicy | None = None) -> None:
        self.policy = policy or RecoveryPolicy()
        self.listeners: list[Callable[[RecoveryEvent], None]] = []
        self.num_worker_faults = 0  # since start: steps that failed because of a worker
        self.num_recoveries = 0  # since start: faults recovered from
        self.unhealthy_reason: str | None = None  # set once, when recovery gives up
        self._attempt_times: list[float] = []  # time.monotonic() of each recovery attempt

    @property
    def healthy(self) -> bool:
        """False once a worker fault could not be recovered."""
        return self.unhealthy_reason is None

    async def recover(self, fault: WorkerFault, executor: Executor, *,
                      requeue_running: Callable[[tuple[int, ...] | None], int],
                      fail_all: Callable[[str], None]) -> None:
        """Have the executor replace its failed worker(s) and requeue what lost its KV cache, or give up.

        `requeue_running(ranks)` sends the running sequences of those attention ranks (None: all)
        back to waiting and says how many; `fail_all(message)` ends every request in flight with
        that error.
        """
        t0 = time.perf_counter()
        now = time.monotonic()
        self.num_worker_faults += 1
        log.error("engine step failed: %s", fault.describe())
        if not self.policy.may_recover(self._attempt_times, now):
            why = (f"{self.policy.max_recoveries} recoveries within {self.policy.window_s:g}s "
                   f"already; not trying again")
            num_requeued = requeue_running(None)
            self._give_up(fault, why, fail_all)
            self._emit(RecoveryEvent(fault, "refused", time.perf_counter() - t0, (), num_requeued, why))
            return
        self._attempt_times.append(now)
        log.warning("recovering from a fault of %s worker rank %s", fault.kind, fault.rank)
        try:
            repair = await executor.recover(fault, self.policy.timeout_s)
        except Exception as exc:  # no resources, a worker that cannot start, a timeout
            why = f"recovery failed: {type(exc).__name__}: {exc}"
            log.exception("engine recovery failed")
            num_requeued = requeue_running(None)
            self._give_up(fault, why, fail_all)
            self._emit(RecoveryEvent(fault, "failed", time.perf_counter() - t0, (), num_requeued, why))
            return
        # Only a restarted attention worker loses its KV cache; the step that failed simply runs
        # again on the others (it rewrites the same KV slots, and sampled nothing).
        num_requeued = requeue_running(repair.lost_kv_ranks) if repair.lost_kv_ranks else 0
        self.num_recoveries += 1
        seconds = time.perf_counter() - t0
        kinds = repair.restarted_kinds
        log.warning("recovered in %.2fs by a %s repair (%d workers new: %s; %d sequences prefill again) "
                    "from: %s", seconds, repair.kind.replace("_", " "), len(kinds),
                    ", ".join(kinds) or "none", num_requeued, fault.describe())
        self._emit(RecoveryEvent(fault, "recovered", seconds, kinds, num_requeued, repair=repair.kind))

    def _give_up(self, fault: WorkerFault, why: str, fail_all: Callable[[str], None]) -> None:
        self.unhealthy_reason = f"engine unavailable: {fault.describe()}; {why}"
        log.error("%s", self.unhealthy_reason)
        fail_all(self.unhealthy_reason)

    def _emit(self, event: RecoveryEvent) -> None:
        notify(self.listeners, event, "recovery")

