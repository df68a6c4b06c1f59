"""The built-in ``zrpc.Broker`` service (spec §13), answered by the broker itself."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import broker_service_pb2 as pb
from .._descriptors import file_descriptor_set
from .._status import StatusCode

if TYPE_CHECKING:
    from ._engine import BrokerEngine

SERVICE = "zrpc.Broker"
_OWN_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["Broker"]
_OWN_FDS = file_descriptor_set([_OWN_DESCRIPTOR])


# The detail of a NOT_FOUND from DescribeService in the broker's start-up grace: the seconds of it
# left, during which a worker may still register the service (calls to it wait meanwhile, §10).
GRACE_DETAIL = "zrpc-registration-grace"


def handle(engine: "BrokerEngine", method: str, payload: bytes, now: float, peer_key: str | None = None
           ) -> tuple[StatusCode, str, bytes, dict[str, str] | None]:
    """Run one built-in method for the client with ``peer_key`` (its CURVE key, or None);
    returns (code, message, reply payload, details).

    Under access rules a client learns nothing of the services it may not call: ListServices
    leaves them out (and their workers), DescribeService and Health answer PERMISSION_DENIED, as
    a call would. A tester's key denied every service still listed them all, workers included.
    """
    entry = _METHODS.get(method)
    if entry is None:
        return (StatusCode.UNIMPLEMENTED,
                f"service {SERVICE!r} has no method {method!r}; it has: {', '.join(sorted(_METHODS))}", b"", None)
    request_type, function = entry
    request = request_type()
    try:
        request.ParseFromString(payload)
    except Exception:
        return StatusCode.INVALID_ARGUMENT, f"payload is not a valid {request_type.DESCRIPTOR.full_name}", b"", None
    if method != "ListServices" and request.service and request.service != SERVICE:
        denied = _denied(engine, peer_key, request.service)
        if denied:
            engine.counters["permission_denied"] += 1
            return StatusCode.PERMISSION_DENIED, denied, b"", None
    return function(engine, request, now, peer_key)


def _denied(engine: "BrokerEngine", peer_key: str | None, service: str) -> str:
    """Why the client may not call ``service`` under the broker's access rules ("" if it may)."""
    return "" if engine.policy is None else engine.policy.call_refusal(peer_key, service)


def _list_services(engine: "BrokerEngine", request: pb.ListServicesRequest, now: float, peer_key: str | None):
    reply = pb.ListServicesReply(draining=engine.draining)
    # Served by the broker itself: no workers, no capacity (a tester read the 1 and 1 this
    # said as a worker of it somewhere).
    reply.services.add(name=SERVICE, methods=sorted(_METHODS))
    for name in sorted(engine.services):
        service = engine.services[name]
        if not service.offered or _denied(engine, peer_key, name):
            continue
        info = reply.services.add(
            name=name, methods=sorted(service.methods), live_workers=service.live_workers(),
            queue_depth=len(service.queue), in_flight=service.dispatched,
            capacity=sum(w.capacity for w in service.workers.values() if not w.draining),
            held_by_answered=sum(w.held_by_answered for w in service.workers.values()),
        )
        if engine.stats is not None:  # CallStats, installed by the Broker (zrpc status reads these)
            info.calls_total, info.errors_total, info.p99_ms = engine.stats.service_summary(name, now)
        for worker in service.workers.values():
            info.workers.add(name=worker.name, capacity=worker.capacity, in_flight=len(worker.in_flight),
                             last_seen_ms=int((now - worker.last_seen) * 1000), draining=worker.draining)
    return StatusCode.OK, "", reply.SerializeToString(), None


def _describe_service(engine: "BrokerEngine", request: pb.DescribeServiceRequest, now: float, peer_key: str | None):
    if not request.service:  # a tester's '{}' was told "no worker has offered service ''"
        return (StatusCode.INVALID_ARGUMENT, "DescribeService needs the name of a service (ListServices lists them)",
                b"", None)
    if request.service == SERVICE:
        fds = _OWN_FDS
    else:
        service = engine.services.get(request.service)
        if service is None or not service.offered:
            left = engine.config.unknown_service_grace - (now - engine.started_at)
            return (StatusCode.NOT_FOUND, f"no worker has offered service {request.service!r}", b"",
                    {GRACE_DETAIL: f"{left:.3f}"} if left > 0 else None)
        fds = service.file_descriptor_set
    reply = pb.DescribeServiceReply(service=request.service, file_descriptor_set=fds)
    return StatusCode.OK, "", reply.SerializeToString(), None


def _health(engine: "BrokerEngine", request: pb.HealthRequest, now: float, peer_key: str | None):
    status = pb.HealthReply
    if engine.draining:  # shutting down: send new calls elsewhere
        return StatusCode.OK, "", status(status=status.NOT_SERVING).SerializeToString(), None
    if not request.service or request.service == SERVICE:
        return StatusCode.OK, "", status(status=status.SERVING).SerializeToString(), None
    service = engine.services.get(request.service)
    if service is None or not service.offered:
        return StatusCode.OK, "", status(status=status.SERVICE_UNKNOWN).SerializeToString(), None
    live = service.live_workers()
    reply = status(status=status.SERVING if live else status.NOT_SERVING,
                   live_workers=live, queue_depth=len(service.queue))
    return StatusCode.OK, "", reply.SerializeToString(), None


_METHODS = {
    "ListServices": (pb.ListServicesRequest, _list_services),
    "DescribeService": (pb.DescribeServiceRequest, _describe_service),
    "Health": (pb.HealthRequest, _health),
}
