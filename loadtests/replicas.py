"""Replica churn on one machine: several `convoy serve` replicas, one client channel over
all of them, steady load, and the three things a Kubernetes Deployment does to its pods.

    python -m loadtests.replicas                       # about 40 s on 2 cores
    python -m loadtests.replicas --max-connection-age-ms 0   # control: no rebalancing

Replicas listen on loopback addresses 127.0.0.2, .3, ... all on one port, as pods do on
their own IPs. Discovery is modelled as Kubernetes does it for a headless Service: an
in-process DNS server answers `convoy-headless.test` with the addresses of the replicas
that are "ready", and the client's single channel targets it through gRPC's own DNS
resolver (`dns://127.0.0.1:PORT/convoy-headless.test:GRPC_PORT`) with round_robin and a
retry policy for UNAVAILABLE in its service config. A new replica is published in DNS when
it is ready; the channel only learns of it when it re-resolves, which gRPC does when a
connection closes: the server's --max-connection-age-ms closing every connection is what
brings traffic onto the new replica, exactly as in a cluster. A static `ipv4:` target
could not show that: its address list never changes.

Sequence (each step waits on the previous one):
  1. three replicas start, all published; load starts (closed loop, --clients callers).
  2. drain: replica 1 is unpublished, then after --pre-stop seconds gets SIGTERM (the pod's
     endpoint removal and preStop hook); it drains. Expected: zero failed requests. With
     --pre-stop 0 (SIGTERM while connections still carry calls) some runs see a few
     CANCELLED: calls the gRPC server had received but not started when it stopped.
  3. scale-up: replica 4 starts and is published; the time to its first request is
     measured. Expected: within the connection age (plus one DNS re-resolution).
  4. crash: replica 2 gets SIGKILL and is unpublished a second later (the endpoint
     controller noticing). Calls in flight on it fail with UNAVAILABLE and are retried on
     the other replicas by the channel's retry policy. Expected: zero failed requests.
  5. load stops; every request is accounted for: client outcomes, and per-replica counts
     from each server's ModelStatistics (polled; a killed server's last reading stands).

Loopback only; bounded by --max-requests and the step timings; servers are always stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from convoy.pb import grpc_service_pb2 as pb
from convoy.pb import grpc_service_pb2_grpc as pb_grpc
from loadtests.launch import ConvoyProcess, start_convoy

HOSTNAME = "convoy-headless.test"
_SUCCESS = re.compile(r'^convoy_request_success_total\{[^}]*model="tiny"[^}]*\} (\S+)$', re.M)
MODEL = "tiny"
INFER = "/inference.GRPCInferenceService/ModelInfer"

# The client's service config: per-request round_robin over every resolved address, and
# retries of UNAVAILABLE (a draining or dead replica) on another address. Inference on a
# stateless model is safe to repeat.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # gRPC waits 30 s between DNS resolutions by default; a new pod would wait that long.
    ("grpc.dns_min_time_between_resolutions_ms", 500),
]


class FakeDns(threading.Thread):
    """A UDP DNS server for one name: A records of the published addresses, TTL 0;
    NOERROR and no answer for other types of that name, NXDOMAIN for other names."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self._addresses: list[str] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.queries = 0

    def publish(self, addresses: list[str]) -> None:
        with self._lock:
            self._addresses = list(addresses)

    def run(self) -> None:
        while not self._done.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            reply = self._answer(query)
            if reply:
                self.sock.sendto(reply, peer)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=2)
        self.sock.close()

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        qid, flags = struct.unpack(">HH", query[:4])
        labels, pos = [], 12
        while pos < len(query) and query[pos] != 0:
            length = query[pos]
            labels.append(query[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
            pos += 1 + length
        pos += 1
        if pos + 4 > len(query):
            return None
        qtype = struct.unpack(">H", query[pos : pos + 2])[0]
        question = query[12 : pos + 4]
        name = ".".join(labels).lower().rstrip(".")
        with self._lock:
            addresses = list(self._addresses)
        answers = b""
        rcode = 0 if name == HOSTNAME else 3
        if rcode == 0 and qtype == 1:  # A
            self.queries += 1
            for address in addresses:
                # Name as a pointer to the question (0xC00C), type A, class IN, TTL 0.
                answers += struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4)
                answers += socket.inet_aton(address)
        count = len(addresses) if answers else 0
        reply_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
        header = struct.pack(">HHHHHH", qid, reply_flags, 1, count, 0, 0)
        return header + question + answers


@dataclass
class Replica:
    name: str
    address: str
    process: ConvoyProcess | None = None
    count: int = 0  # requests its ModelStatistics last reported
    # convoy_request_success from /metrics: the HTTP endpoint outlives the gRPC server's
    # drain, so a SIGTERMed replica's final count is read there.
    answered: int = 0
    first_seen: float | None = None  # when the poller first saw it serve a request
    alive: bool = True
    stats: grpc.Channel | None = None


@dataclass
class Outcome:
    start: float
    end: float
    code: str
    details: str = ""


@dataclass
class Run:
    t0: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    buckets: dict[int, Counter[str]] = field(default_factory=dict)  # second -> counts
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        self.events.append((self.now(), text))
        print(f"  [{self.now():6.2f}s] {text}", flush=True)


def infer_request() -> bytes:
    rows = np.arange(16, dtype=np.float32).reshape(1, 16)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(rows.tobytes())
    return bytes(request.SerializeToString())


def client_loop(channel: grpc.Channel, run: Run, stop: threading.Event, budget: list[int]) -> None:
    call = channel.unary_unary(INFER)  # raw bytes both ways: the client stays cheap
    payload = infer_request()
    while not stop.is_set():
        with run.lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        start = time.monotonic()
        code, details = "OK", ""
        try:
            call(payload, timeout=10)
        except grpc.RpcError as exc:
            code, details = exc.code().name, str(exc.details())
        outcome = Outcome(start - run.t0, time.monotonic() - run.t0, code, details)
        with run.lock:
            run.outcomes.append(outcome)
            run.buckets.setdefault(int(outcome.end), Counter())[code] += 1


def poll_statistics(replicas: list[Replica], run: Run, stop: threading.Event) -> None:
    """Each replica's own count of the requests it served, read over its own channel."""
    while not stop.is_set():
        for replica in replicas:
            if not replica.alive or replica.stats is None:
                continue
            replica.answered = max(replica.answered, scrape_successes(replica))
            stub = pb_grpc.GRPCInferenceServiceStub(replica.stats)
            try:
                reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=1)
            except grpc.RpcError:
                continue  # draining or dead: its last reading stands
            count = sum(s.inference_count for s in reply.model_stats)
            if count > replica.count and replica.first_seen is None:
                replica.first_seen = run.now()
            replica.count = max(replica.count, count)
            key = f"@{replica.name}"
            with run.lock:
                run.buckets.setdefault(int(run.now()), Counter())[key] = replica.count
        stop.wait(0.2)


def scrape_successes(replica: Replica) -> int:
    """Sum of convoy_request_success_total for the model; 0 when the scrape fails."""
    assert replica.process is not None
    url = f"http://{replica.address}:{replica.process.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            text = reply.read().decode()
    except OSError:
        return 0
    return int(sum(float(v) for v in _SUCCESS.findall(text)))


def start_replica(replica: Replica, repository: Path, port: int, age_ms: int) -> None:
    replica.process = start_convoy(
        repository,
        "--host", replica.address, "--grpc-port", str(port), "--metrics-port", "0",
        "--grace-period", "10", "--max-connection-age-ms", str(age_ms),
    )  # fmt: skip
    replica.stats = grpc.insecure_channel(f"ipv4:{replica.address}:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def tiny_repository() -> Iterator[Path]:
    from convoy.repository.examples import build_tiny

    with tempfile.TemporaryDirectory(prefix="convoy-replicas-") as tmp:
        build_tiny(Path(tmp) / MODEL)
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-connection-age-ms", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8, help="closed-loop callers")
    parser.add_argument(
        "--pre-stop",
        type=float,
        default=None,
        help="seconds from unpublishing to SIGTERM (default: the chart's rule, 1.1 x the "
        "connection age, +0.3 s here for the DNS's TTL of 0; 0 shows the SIGTERM race)",
    )
    parser.add_argument("--steady", type=float, default=4.0, help="seconds between steps")
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    age_s = args.max_connection_age_ms / 1000
    pre_stop = args.pre_stop if args.pre_stop is not None else 1.1 * age_s + 0.3

    port = free_port()  # every replica uses it on its own loopback address
    replicas = [Replica(f"r{i}", f"127.0.0.{i + 1}") for i in range(1, 5)]
    dns = FakeDns()
    dns.start()
    run = Run()
    stop_load, stop_poll = threading.Event(), threading.Event()
    budget = [args.max_requests]
    threads: list[threading.Thread] = []
    published: list[str] = []
    new_replica_delay: float | None = None

    def publish(address: str, on: bool) -> None:
        if on:
            published.append(address)
        else:
            published.remove(address)
        dns.publish(published)
        run.event(f"DNS now {', '.join(published) or '(empty)'}")

    print(f"convoy replica churn: {HOSTNAME}:{port}, age {args.max_connection_age_ms} ms")
    try:
        with tiny_repository() as repository:
            starters = [
                threading.Thread(
                    target=start_replica, args=(r, repository, port, args.max_connection_age_ms)
                )
                for r in replicas[:3]
            ]
            for t in starters:
                t.start()
            for t in starters:
                t.join()
            run = Run()
            for r in replicas[:3]:
                publish(r.address, True)
            target = f"dns://127.0.0.1:{dns.port}/{HOSTNAME}:{port}"
            channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            grpc.channel_ready_future(channel).result(timeout=10)
            run.event(f"load starts: {args.clients} callers on one channel to {target}")
            threads = [
                threading.Thread(target=client_loop, args=(channel, run, stop_load, budget))
                for _ in range(args.clients)
            ]
            threads.append(
                threading.Thread(target=poll_statistics, args=(replicas, run, stop_poll))
            )
            for t in threads:
                t.start()
            time.sleep(args.steady)

            # 2. Drain: endpoint removed and preStop, then SIGTERM; wait for the exit.
            r1 = replicas[0]
            assert r1.process is not None
            run.event(f"r1: terminating (unpublished, preStop {pre_stop:.1f} s)")
            publish(r1.address, False)
            time.sleep(pre_stop)
            run.event("r1: SIGTERM")
            r1.process.proc.send_signal(signal.SIGTERM)
            give_up = time.monotonic() + 30  # its --grace-period is 10 s
            while r1.process.proc.poll() is None and time.monotonic() < give_up:
                r1.answered = max(r1.answered, scrape_successes(r1))  # read to the end
                time.sleep(0.05)
            code = r1.process.stop(signal.SIGKILL, timeout=10)  # a no-op once it has exited
            r1.alive = False
            run.event(f"r1: exited with {code}")
            time.sleep(args.steady / 2)

            # 3. Scale-up: a new replica, published once ready.
            r4 = replicas[3]
            run.event("r4: starting")
            start_replica(r4, repository, port, args.max_connection_age_ms)
            publish(r4.address, True)
            ready_at = run.now()
            deadline = time.monotonic() + max(3 * age_s, 10)
            while r4.first_seen is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if r4.first_seen is not None:
                new_replica_delay = r4.first_seen - ready_at
                run.event(f"r4: first traffic {new_replica_delay:.2f} s after it was published")
            else:
                run.event(f"r4: no traffic within {max(3 * age_s, 10):.0f} s")
            time.sleep(args.steady)

            # 4. Crash: SIGKILL, endpoint removed a second later.
            r2 = replicas[1]
            assert r2.process is not None
            # Closed loop: every caller has one call out, some of them on r2.
            run.event(f"r2: SIGKILL ({args.clients} calls in flight on the channel)")
            killed_at = run.now()
            r2.process.stop(signal.SIGKILL, timeout=10)
            r2.alive = False
            time.sleep(1.0)
            publish(r2.address, False)
            time.sleep(args.steady)
            run.event("load stops")
            stop_load.set()
            for t in threads[:-1]:
                t.join(timeout=15)
            time.sleep(0.5)  # one more statistics reading
            stop_poll.set()
            threads[-1].join(timeout=5)
            channel.close()
            report(run, replicas, killed_at, new_replica_delay, age_s)
            failed = sum(1 for o in run.outcomes if o.code != "OK")
            stuck = age_s > 0 and new_replica_delay is None  # the age should have moved it
            return 0 if failed == 0 and not stuck else 1
    finally:
        stop_load.set()
        stop_poll.set()
        for r in replicas:
            if r.process is not None and r.process.proc.poll() is None:
                r.process.stop(signal.SIGKILL, timeout=10)
            if r.stats is not None:
                r.stats.close()
        dns.stop()


def report(
    run: Run,
    replicas: list[Replica],
    killed_at: float,
    new_replica_delay: float | None,
    age_s: float,
) -> None:
    names = [r.name for r in replicas]
    print("\ntimeline (per second: client outcomes; each replica's requests served that second)")
    print(f"{'t':>4} {'ok':>6} {'failed':>6}  " + " ".join(f"{n:>6}" for n in names) + "  events")
    last: dict[str, int] = dict.fromkeys(names, 0)
    events = list(run.events)
    for second in range(int(max(run.buckets, default=0)) + 1):
        bucket = run.buckets.get(second, Counter())
        served = []
        for n in names:
            now = bucket.get(f"@{n}", last[n])
            served.append(now - last[n])
            last[n] = now
        failed = sum(v for k, v in bucket.items() if not k.startswith("@") and k != "OK")
        notes = [text for t, text in events if int(t) == second]
        print(
            f"{second:>4} {bucket.get('OK', 0):>6} {failed:>6}  "
            + " ".join(f"{s:>6}" for s in served)
            + ("  " + "; ".join(notes) if notes else "")
        )
    codes = Counter(o.code for o in run.outcomes)
    total = len(run.outcomes)
    served_total = sum(r.count for r in replicas)
    # Calls that started before the kill and ended after it: those in flight on the killed
    # replica are among them, retried by the channel.
    straddled = [o for o in run.outcomes if o.start <= killed_at <= o.end]
    slowest = max((o.end - o.start for o in straddled), default=0.0)
    print("\nper replica: ModelStatistics inference_count and /metrics convoy_request_success,")
    print("last readings (a SIGKILLed replica's counters die with it)")
    for r in replicas:
        print(f"  {r.name} {r.address:<10} {r.count:>7} {r.answered:>7}")
    answered_total = sum(r.answered for r in replicas)
    print(f"\nclient: {total} requests = " + " + ".join(f"{v} {k}" for k, v in codes.items()))
    for o in run.outcomes:
        if o.code != "OK":
            print(f"  {o.code} at {o.start:.3f}-{o.end:.3f} s: {o.details}")
    ok = codes.get("OK", 0)
    print(
        f"servers: statistics {served_total} ({served_total - ok:+d}), metrics "
        f"{answered_total} ({answered_total - ok:+d}) against the client's OK; the "
        "difference is the SIGKILLed replica's answers after its last reading, less calls "
        "it ran whose answers were lost and which were retried elsewhere"
    )
    print(f"calls spanning the SIGKILL: {len(straddled)}, slowest {slowest * 1000:.0f} ms")
    if new_replica_delay is not None:
        print(f"new replica's first request: {new_replica_delay:.2f} s after publication "
              f"(connection age {age_s:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
