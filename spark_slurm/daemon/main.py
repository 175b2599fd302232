"""`sparkd`: wires the parts together, reconciles, serves, and shuts down cleanly.

Start order matters: the policy must load (or the daemon refuses to start), the
ledger opens, GPUs are reconciled against it, the journal and spool are
ingested, and only then does the socket appear. SIGTERM/SIGINT stop in reverse;
SIGHUP reloads the policy and keeps the last good one when the new file is bad.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from spark_slurm import __version__
from spark_slurm.daemon.actuation import Actuator
from spark_slurm.daemon.automations import Monitor
from spark_slurm.daemon.config import DaemonConfig, load_config
from spark_slurm.daemon.connections import ConnectionGate
from spark_slurm.daemon.contracts import PolicyLike, ReceiptLike
from spark_slurm.daemon.diskspace import DiskWatch, is_disk_full
from spark_slurm.daemon.executor_intents import PendingIntents
from spark_slurm.daemon.executors import ExecutorGate
from spark_slurm.daemon.facility import FacilityFollower
from spark_slurm.daemon.filemodes import FileModes, secure_files, secure_spool
from spark_slurm.daemon.ingest import Ingestor
from spark_slurm.daemon.metrics import DaemonMetrics
from spark_slurm.daemon.peers import Authority, uid_of
from spark_slurm.daemon.pipeline import Pipeline, Refusal
from spark_slurm.daemon.ratelimit import RefusalLimiter
from spark_slurm.daemon.recovery import NodeRecovery
from spark_slurm.daemon.reserve import Reserve
from spark_slurm.daemon.server import SocketServer, raise_fd_limit
from spark_slurm.daemon.service import Service, pid_rss_kib
from spark_slurm.daemon.startup import reconcile_at_start, record_policy
from spark_slurm.daemon.state import IntentStore, NodeState, last_action
from spark_slurm.daemon.upkeep import Upkeep
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.errors import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    InputError,
    KarmanError,
    LedgerKeyError,
    SparkError,
)
from spark_slurm.gpu import TelemetrySampler, open_backend
from spark_slurm.gpu.mapping import gres_conf_devices, slurm_device_map
from spark_slurm.karman import KarmanSubscriber
from spark_slurm.karman.subscriber import COUNTERS
from spark_slurm.ledger.keys import load_hmac_key
from spark_slurm.ledger.rotation import open_rotating, rotate
from spark_slurm.policy import Policy
from spark_slurm.slurm.context import open_context_source
from spark_slurm.slurm.runner import SubprocessRunner

log = logging.getLogger("sparkd")
_BLIND_STREAM: dict[str, int] = dict.fromkeys(COUNTERS, 0)


class Daemon:
    """One running sparkd; `start()` then `wait()`, or `stop()` from another thread."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._stop = threading.Event()
        self._policy_lock = threading.Lock()
        self.started_ns = time.time_ns()
        self.head: ReceiptLike | None = None
        self.metrics_port = 0
        self.karman_error: str | None = None
        self._policy: PolicyLike
        self.writer: LedgerWriter
        self._parts: list[Any] = []
        self.executors: ExecutorGate | None = None

    # -- policy ----------------------------------------------------------------
    def policy(self) -> PolicyLike:
        return self._policy

    def _load_policy(self) -> PolicyLike:
        return Policy.load(self.config.policy_path)

    def reload_policy(self) -> bool:
        """SIGHUP: swap in the new policy, or keep the last good one and say why."""
        try:
            new = self._load_policy()
        except SparkError as exc:
            log.error("policy reload refused, keeping %s: %s", self._policy.sha256[:16], exc)
            return False
        with self._policy_lock:
            if new.sha256 != self._policy.sha256:
                self.writer.commit("policy", {"v": 1, "sha256": new.sha256, "text": new.text,
                                              "path": str(self.config.policy_path)})
            self._policy = new
        log.info("policy reloaded: %s", new.sha256[:16])
        return True

    def authority(self) -> Authority:
        slurm_uid = uid_of(self.config.slurm_user) if self.config.slurm_user else None
        group = getattr(self._policy.settings, "admin_group", None)
        return Authority(slurm_uid=slurm_uid, admin_group=group)

    def _scheduler_uid(self, uid: int) -> bool:
        """Root or the SlurmUser, from the uid alone (the accept loop asks per connection,
        so the SlurmUser's uid is looked up once, at start)."""
        return uid == 0 or (self._slurm_uid is not None and uid == self._slurm_uid)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        self._policy = self._load_policy()  # a bad policy stops us before anything runs
        hmac_key = initial_hmac_key(cfg.hmac_key, cfg.ledger_path)  # and a missing key
        self.modes = FileModes.for_group(cfg.files_group)
        self._slurm_uid = uid_of(cfg.slurm_user) if cfg.slurm_user else None
        raise_fd_limit()
        self.reserve = Reserve(cfg.journal_path, cfg.journal_reserve_bytes, self.modes)
        secure_files(cfg, self.modes, self.reserve, self._slurm_uid)
        self.disk = DiskWatch([cfg.ledger_path.parent, cfg.state_dir, cfg.journal_path.parent],
                              cfg.disk_min_free_bytes)
        self.disk.check()
        cfg.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self.modes.ledger(cfg.ledger_path)  # -wal and -shm take the database file's mode
        # settles a signing-key rotation that a crash interrupted, then opens
        self.ledger = open_rotating(cfg.ledger_path, hmac_key, cfg.signing_key,
                                    node=cfg.node, cluster=cfg.cluster,
                                    checkpoint_interval_s=cfg.checkpoint_interval_s)
        self._parts.append(self.ledger)
        self.modes.ledger(cfg.ledger_path)
        if cfg.hmac_key is not None and hmac_key is None:
            if self.ledger.hmac_key_id is None:
                log.warning("keys.hmac is set but %s was created without HMAC: its records "
                            "carry no MAC (remove keys.hmac, or start a new ledger)",
                            cfg.ledger_path)
            else:
                log.info("HMAC key %s is not on this node (docs/admin-guide.md: keep it off "
                         "the node once the ledger exists); MACs go on with the ledger's "
                         "own evolved epoch key (key id %s)", cfg.hmac_key,
                         self.ledger.hmac_key_id)
        self.gpu = open_backend(cfg.gpu_backend, state_dir=cfg.gpu_state_dir)
        self.sampler = TelemetrySampler(self.gpu, rate_hz=cfg.sampler_hz,
                                        seconds=cfg.sampler_seconds)
        self.source = None
        if cfg.job_context_source:
            self.source = open_context_source(cfg.job_context_source,
                                              **cfg.job_context_options)
        self.stream = self._open_stream()
        karman_stats = self.stream.stats if self.stream else None
        if self.stream is None and cfg.karman_endpoint:
            karman_stats = _BLIND_STREAM.copy  # a broken stream reads as a blind one
        self.limiter = RefusalLimiter(cfg.refusal_rate_per_s, cfg.refusal_burst)
        self.gate = ConnectionGate(cfg.connections, self._scheduler_uid)
        self.metrics = DaemonMetrics(cfg.node, karman_stats,
                                     rate_limited=lambda: self.limiter.suppressed_total)
        record_policy(self.ledger, self._policy, str(cfg.policy_path))
        self.state = NodeState()
        # NVML calls are ctypes calls that drop the GIL, so a job's GPUs go in parallel;
        # the sim's calls are Python work under the GIL, where threads only add overhead.
        self.actuator = Actuator(self.gpu, self.sampler,
                                 parallel=1 if cfg.gpu_backend == "sim" else 8,
                                 slurm_map=self._slurm_map(),
                                 readback_tolerance_mw=cfg.gpu_readback_tolerance_mw)
        self.actuator.check_persistence(enable=cfg.gpu_persistence == "enable")
        intents = IntentStore(cfg.state_dir)
        unknown = [g for g in cfg.executors.validate_gpus if not self.actuator.known(g)]
        if unknown:
            raise ConfigError(f"executors.validate_only: GPU {unknown[0]} does not exist on "
                              f"node {cfg.node} (GPUs: {sorted(self.actuator.devices)})")
        self.startup = reconcile_at_start(node=cfg.node, ledger=self.ledger,
                                          actuator=self.actuator, intents=intents,
                                          state=self.state, source=self.source,
                                          external=cfg.executors.validate_only)
        self.head = self.ledger.head()
        self.writer = LedgerWriter(self.ledger, maintain_period_s=cfg.maintain_period_s,
                                   on_commit=self._committed)
        self.writer.start()
        self.sampler.start()
        if self.stream is not None:
            try:
                self.stream.start()
            except KarmanError as exc:
                self._stream_failed(exc)
        self.facility = FacilityFollower(
            node=cfg.node, writer=self.writer, policy=self.policy, stream=self.stream,
            telemetry=self.sampler, index_of=self.actuator.index,
            unavailable_reason=self.karman_error or "no Karman endpoint configured",
            count=lambda verdict: None)
        self.facility.start()
        self.pipeline = Pipeline(
            node=cfg.node, actuator=self.actuator, writer=self.writer, policy=self.policy,
            state=self.state, intents=intents, authority=self.authority,
            context_source=self.source, follow_up=self.facility.schedule,
            last_action=lambda job_id: last_action(self.ledger, job_id))
        if cfg.executors.enabled:  # validate-only mode on some or all GPUs
            self.executors = ExecutorGate(self.pipeline, cfg.executors,
                                          PendingIntents(cfg.state_dir), count=self.metrics.count)
            self.executors.resume(self.ledger)
            self.pipeline.executors = self.executors
        self.recovery = NodeRecovery(node=cfg.node, runner=SubprocessRunner(),
                                     commit=self.writer.commit, healthy=self.disk_healthy,
                                     prefix=cfg.drain_reason_prefix) \
            if cfg.resume_nodes else None
        hook_failed = self.recovery.note_failure if self.recovery is not None else None
        self.service = Service(self.pipeline, status=self.status, ingest=self.ingest,
                               observe=self.metrics.observe_latency,
                               limiter=self.limiter,
                               rotate_key=self.rotate_key if cfg.signing_key else None,
                               disk=self.disk, tallies=(self.gate.tally,),
                               hook_failed=hook_failed,
                               intent=self.executors.announce if self.executors else None)
        self.metrics.watch(self.disk, self.gate, self.service)
        self.ingestor = Ingestor(node=cfg.node, ledger=self.ledger, writer=self.writer,
                                 handle=self.service.handle, state_dir=cfg.state_dir,
                                 journal_path=cfg.journal_path, spool_path=cfg.spool_path,
                                 reserve=self.reserve, hook_failed=hook_failed,
                                 save_cursor=self.modes.apply)
        self.ingest()
        self.upkeep = Upkeep(disk=self.disk, ingest=self.ingest, ingestor=self.ingestor,
                             service=self.service, reserve=self.reserve,
                             recovery=self.recovery,
                             watched=(cfg.spool_path, cfg.journal_path, self.reserve.path),
                             settle_s=cfg.ingest_period_s)
        if self.recovery is not None:
            self.recovery.schedule()
        self.monitor = Monitor(self.pipeline, self.policy, period_s=cfg.monitor_period_s,
                               count=self.metrics.count, on_sample=self._sampled,
                               executors=self.executors)
        self.monitor.start()
        self.server = SocketServer(cfg.socket_path, self.service, mode=cfg.socket_mode,
                                   max_request_bytes=cfg.max_request_bytes, gate=self.gate,
                                   scheduler_path=cfg.scheduler_socket,
                                   scheduler_owner=self._slurm_uid)
        # /metrics first: the socket answering means ready, and its status names the port
        self.metrics_port = self.metrics.serve(cfg.metrics_address, cfg.metrics_port)
        self.server.start()
        log.info("sparkd ready on %s (node %s, %d GPUs, ledger head %s, metrics port %s)",
                 cfg.socket_path, cfg.node, len(self.actuator.devices),
                 self.head.seq if self.head else None, self.metrics_port or "off")

    def _slurm_map(self) -> dict[int, int]:
        """Slurm GPU index -> backend device, from gres.conf when configured."""
        gres = None
        if self.config.gpu_gres_conf is not None:
            try:
                text = self.config.gpu_gres_conf.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"gpu.gres_conf: cannot read: {exc.strerror}",
                                  str(self.config.gpu_gres_conf)) from None
            gres = gres_conf_devices(text, self.config.node)
        for problem in getattr(self.gpu, "unavailable", []):
            log.warning("GPU left out at start: NVML device %s: %s", *problem)
        mapping, missing = slurm_device_map(self.gpu.devices(), gres)
        for problem in missing:
            log.warning("not governed: %s", problem)
        return mapping

    def _open_stream(self) -> KarmanSubscriber | None:
        """The Karman subscriber, or None without an endpoint or when it cannot be used.

        Missing or unusable protobuf bindings (or a bad endpoint) take away the
        facility path, not the node: sparkd goes on governing GPUs, and every
        follow-up PER records `unavailable` with the reason (docs/daemon-api.md).
        """
        cfg = self.config
        if not cfg.karman_endpoint:
            return None
        try:
            return KarmanSubscriber(cfg.karman_endpoint, cfg.karman_topic,
                                    phases=cfg.karman_phases)
        except KarmanError as exc:
            self._stream_failed(exc)
            return None

    def _stream_failed(self, exc: KarmanError) -> None:
        self.stream = None
        self.karman_error = f"Karman stream {self.config.karman_endpoint} unusable: {exc.message}"
        log.error("%s; running without the facility path (follow-ups record `unavailable`)",
                  self.karman_error)

    def _committed(self, kind: str, body: Any, receipt: ReceiptLike) -> None:
        self.head = receipt
        self.metrics.observe_commit(kind, body, receipt.seq)

    def _sampled(self, gpu: int, sample: Any) -> None:
        self.metrics.observe_sample(gpu, sample, self.state.governed.get(gpu))
        if gpu == min(self.actuator.devices):
            self.metrics.refresh_karman()
            self.metrics.jobs.labels(self.config.node).set(len(self.state.jobs))

    def rotate_key(self) -> dict[str, Any]:
        """A new signing key for the ledger and its key file (root's `rotate-key`)."""
        assert self.config.signing_key is not None
        try:
            done = rotate(self.ledger, self.config.signing_key)
        except LedgerKeyError as exc:  # e.g. a read-only key directory: recorded, refused
            raise Refusal("key-error", exc.message) from None
        log.info("signing key rotated: %s -> %s (PER seq %d); install %s on the head node",
                 done.prev_key_id, done.key_id, done.seq, done.public_key)
        return {"prev_key_id": done.prev_key_id, "key_id": done.key_id, "seq": done.seq,
                "checkpoint_size": done.checkpoint_size, "public_key": str(done.public_key)}

    def ingest(self) -> dict[str, Any]:
        with self._policy_lock:
            if self.config.spool_path is not None:
                secure_spool(self.config.spool_path, self.modes, self._slurm_uid)
            try:
                counts = self.ingestor.run()
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self.disk.mark_full(str(exc))
                log.error("ingest stopped: %s; it goes on once space is back", exc)
                return {"ingested": {}, "stopped": f"disk full: {exc}"}
        return {"ingested": counts}

    def disk_healthy(self) -> bool:
        return self.disk.healthy

    def status(self) -> dict[str, Any]:
        gpus = []
        for minor in sorted(self.actuator.devices):
            row: dict[str, Any] = {"index": minor, "uuid": self.actuator.devices[minor].uuid,
                                   "persistence": self.actuator.persistence.get(minor),
                                   "governed_mw": self.state.governed.get(minor),
                                   "job": self.state.owner_of(minor),
                                   "throttled": minor in self.state.throttled,
                                   "fault": minor in self.state.faults}
            latest = self.sampler.latest(self.actuator.index(minor))
            if latest is not None:
                row.update(power_mw=latest.power_mw, enforced_mw=latest.enforced_mw,
                           temp_mc=latest.temp_mc)
            gpus.append(row)
        jobs = [{"job_id": j.job_id, "user": j.user, "uid": j.uid, "gpus": j.gpus,
                 "granted_mw": j.granted_mw} for j in self.state.jobs.values()]
        head = self.ledger.head()  # includes records the ledger writes itself (seals)
        problems = self.disk.problems()
        out: dict[str, Any] = {
            "node": self.config.node, "pid": os.getpid(), "healthy": not problems,
            "problems": problems,
            "time_ns": time.time_ns(),  # this daemon's clock: the head estimates skew from it
            "disk": self.disk.report(),
            "connections": {"open": self.gate.open, "refused": self.gate.refused(),
                            "timed_out": self.gate.timed_out},
            "unrecorded": {"kept": len(self.service.backlog),
                           "dropped": self.service.backlog.dropped},
            "uptime_s": (time.time_ns() - self.started_ns) // 1_000_000_000,
            "rss_kib": pid_rss_kib(),
            "policy": {"sha256": self._policy.sha256, "path": str(self.config.policy_path)},
            "ledger": {"path": str(self.config.ledger_path),
                       "seq": head.seq if head else None, "hash": head.hash if head else None},
            "gpus": gpus, "jobs": jobs, "facility_pending": self.facility.pending(),
            "metrics_port": self.metrics_port,
            "writer": {"commits": self.writer.batches, "pers": self.writer.committed},
            "startup": {"orphans": self.startup.orphans, "kept": self.startup.kept,
                        "reconciled": self.startup.reconciled}}
        if self.stream is not None:
            out["karman"] = {k: v for k, v in self.stream.stats().items()
                             if isinstance(v, (int, str))}
        elif self.karman_error is not None:
            out["karman"] = {"endpoint": self.config.karman_endpoint, "error": self.karman_error}
        if self.executors is not None:
            out["executors"] = self.executors.status()
        return out

    def stop(self) -> None:
        self._stop.set()

    def flush_refusals(self) -> None:
        """Record the requests the limits counted since the last flush."""
        upkeep = getattr(self, "upkeep", None)
        if upkeep is not None:
            upkeep.flush()

    def maintain(self) -> None:
        self.upkeep.turn()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        started = getattr(self, "server", None) is not None
        if started:
            log.info("sparkd stopping")
        for part in ("server", "monitor"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop()
        self.flush_refusals()  # after the server stops, before the writer does
        if getattr(self, "facility", None) is not None:
            self.facility.stop()
        if getattr(self, "writer", None) is not None:
            self.writer.stop()
        for part in ("sampler", "stream"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.intents.close()
        gate: ExecutorGate | None = getattr(self, "executors", None)
        if gate is not None:
            gate.book.close()
        if getattr(self, "ledger", None) is not None:
            self.ledger.close()
        if getattr(self, "gpu", None) is not None:
            self.gpu.close()
        if started:
            log.info("sparkd stopped")




def initial_hmac_key(path: Path | None, ledger: Path) -> bytes | None:
    """K[0] from `keys.hmac`, when sparkd needs it.

    It is needed to create the ledger; once the ledger exists it holds the evolved
    epoch key itself, so the admin guide says to move hmac.key off the node (with
    whoever audits). A file that is still there is read and checked against the
    ledger (a wrong key is refused); a file that is gone is not an error then.
    """
    if path is None:
        return None
    if not path.exists() and ledger.is_file() and ledger.stat().st_size > 0:
        return None
    try:
        return load_hmac_key(path)
    except LedgerKeyError as exc:
        if path.exists():
            raise
        raise ConfigError(f"keys.hmac: {exc.message}; it is needed to create the ledger "
                          f"{ledger} (or remove keys.hmac to create one without HMAC)") \
            from None


def run_daemon(config_path: Path) -> int:
    """Load the config, run until signalled; the library entry of `sparkd`."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="sparkd[%(process)d] %(levelname)s %(name)s: %(message)s")
    config = load_config(config_path)
    daemon = Daemon(config)
    hup = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    try:
        daemon.start()
    except BaseException:
        daemon.shutdown()
        raise
    flushed = time.monotonic()
    while not daemon._stop.wait(0.2):
        if hup.is_set():
            hup.clear()
            daemon.reload_policy()
        flush = time.monotonic() - flushed >= config.maintain_period_s
        if flush:
            flushed = time.monotonic()
        turn(daemon, flush)
    daemon.shutdown()
    return EXIT_OK


def turn(daemon: Daemon, flush: bool) -> None:
    """One turn of the main loop. It must outlive a bad turn: an error escaping here
    would end sparkd (and its metrics endpoint) while jobs run; it is logged instead,
    and the counts a failed flush held are tried again at the next one."""
    try:
        daemon.maintain()
    except Exception:
        log.exception("maintenance turn failed")
    if flush:
        try:
            daemon.flush_refusals()
        except Exception:
            log.exception("recording counted requests failed")


def main(argv: list[str] | None = None) -> int:
    """Console script `sparkd --config FILE`.

    Exit 2 only when the files it was given are wrong (config, policy, keys, a ledger
    that is not ours): systemd does not restart those (RestartPreventExitStatus=2),
    an admin must fix them. Anything else that stops it (a GPU driver not up yet,
    a socket or disk problem) exits 1, which systemd retries.
    """
    parser = argparse.ArgumentParser(prog="sparkd", description="spark-slurm node daemon")
    parser.add_argument("--config", default="/etc/spark/sparkd.yaml", type=Path,
                        help="sparkd.yaml (default /etc/spark/sparkd.yaml)")
    parser.add_argument("--version", action="version", version=f"sparkd {__version__}")
    args = parser.parse_args(argv)
    try:
        return run_daemon(args.config)
    except Exception as exc:
        if is_disk_full(exc):
            # exit 1, not 2: systemd restarts sparkd (Restart=on-failure) until space is
            # back; meanwhile the hook journals into its reserve and the health check drains
            print(f"sparkd: cannot record anything, the disk is full: {exc}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        if isinstance(exc, InputError):
            print(f"sparkd: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, SparkError):
            print(f"sparkd: {exc.message}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        if isinstance(exc, OSError):
            print(f"sparkd: {exc}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
