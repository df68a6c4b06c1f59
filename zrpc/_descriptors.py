"""Protobuf descriptor helpers shared by clients, workers, the broker and the CLI."""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor

_IDEMPOTENT_LEVELS = (
    descriptor_pb2.MethodOptions.IDEMPOTENT,
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
)


def is_idempotent(method: MethodDescriptor) -> bool:
    """True when the method declares protobuf's standard ``idempotency_level`` option."""
    return method.GetOptions().idempotency_level in _IDEMPOTENT_LEVELS


def file_descriptor_set(services: list[ServiceDescriptor]) -> bytes:
    """Serialize the files defining ``services`` and all their dependencies, dependencies first."""
    fds = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        fds.file.append(proto)

    for service in services:
        add(service.file)
    return fds.SerializeToString()


def pool_from_file_descriptor_set(raw: bytes) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding every file of a serialized FileDescriptorSet (order-independent)."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(raw)
    pool = descriptor_pool.DescriptorPool()
    pending = list(fds.file)
    # Add files whose dependencies are already in the pool, until none is left (or none fits).
    while pending:
        added = []
        for proto in pending:
            if all(_has_file(pool, dep) for dep in proto.dependency):
                pool.Add(proto)
                added.append(proto)
        if not added:
            missing = sorted({d for p in pending for d in p.dependency if not _has_file(pool, d)})
            raise ValueError(f"file descriptor set is missing dependencies: {', '.join(missing)}")
        pending = [p for p in pending if p not in added]
    return pool


def _has_file(pool: descriptor_pool.DescriptorPool, name: str) -> bool:
    try:
        pool.FindFileByName(name)
        return True
    except KeyError:
        return False


def service_definitions(raw_fds: bytes) -> dict[str, tuple[bytes, frozenset[str]]]:
    """Each service in a serialized FileDescriptorSet: (the file that defines it, serialized,
    and its method names). Two workers define a service alike when that file is the same,
    whatever other services they serve. Raises on bytes that are no FileDescriptorSet."""
    services = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(raw_fds).file:
        if not file.service:
            continue
        raw_file = file.SerializeToString(deterministic=True)
        for svc in file.service:
            full = f"{file.package}.{svc.name}" if file.package else svc.name
            services[full] = (raw_file, frozenset(m.name for m in svc.method))
    return services


def method_names(raw_fds: bytes, service: str) -> list[str]:
    """The method names of ``service`` in a serialized FileDescriptorSet (empty when absent)."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(raw_fds)
    for file in fds.file:
        for svc in file.service:
            full = f"{file.package}.{svc.name}" if file.package else svc.name
            if full == service:
                return [m.name for m in svc.method]
    return []


def message_class(descriptor):
    """The generated-style message class for a message descriptor."""
    return message_factory.GetMessageClass(descriptor)
