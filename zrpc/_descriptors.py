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
    whatever other services they serve, and wherever protoc found it: the file's path and those
    of its imports are left out (types are named in full; a tester generated one .proto with
    -I. and with -Imysvc and was warned of "another definition"). Raises on bytes that are no
    FileDescriptorSet."""
    services = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(raw_fds).file:
        if not file.service:
            continue
        for paths in ("name", "dependency", "public_dependency", "weak_dependency"):
            file.ClearField(paths)
        raw_file = file.SerializeToString(deterministic=True)
        for svc in file.service:
            full = f"{file.package}.{svc.name}" if file.package else svc.name
            services[full] = (raw_file, frozenset(m.name for m in svc.method))
    return services


# Field types protobuf reads each as the other (its "Updating a message type" rules); any
# other change of a field's type makes old and new read each other's messages wrongly.
_T = descriptor_pb2.FieldDescriptorProto
_WIRE_ALIKE = [
    {_T.TYPE_INT32, _T.TYPE_UINT32, _T.TYPE_INT64, _T.TYPE_UINT64, _T.TYPE_BOOL, _T.TYPE_ENUM},
    {_T.TYPE_SINT32, _T.TYPE_SINT64},
    {_T.TYPE_FIXED32, _T.TYPE_SFIXED32},
    {_T.TYPE_FIXED64, _T.TYPE_SFIXED64},
    {_T.TYPE_STRING, _T.TYPE_BYTES},
    {_T.TYPE_BYTES, _T.TYPE_MESSAGE},  # a message field reads as its encoding, and back
]
_NUMBERS = {_T.TYPE_INT32, _T.TYPE_UINT32, _T.TYPE_INT64, _T.TYPE_UINT64, _T.TYPE_BOOL, _T.TYPE_ENUM,
            _T.TYPE_SINT32, _T.TYPE_SINT64, _T.TYPE_FIXED32, _T.TYPE_SFIXED32, _T.TYPE_FIXED64,
            _T.TYPE_SFIXED64, _T.TYPE_FLOAT, _T.TYPE_DOUBLE}


def incompatibility(new_file: bytes, old_file: bytes) -> str | None:
    """How two versions of one serialized FileDescriptorProto disagree on the wire, or None:
    a field number, in a message both define, whose type changed to one protobuf does not read
    as the other (int32 to string, say), or a number field that became repeated or stopped
    being so. Names (of fields and of message and enum types), new fields and removed fields
    are compatible; a message type that was renamed or moved is not compared field by field."""
    old_messages = dict(_messages(descriptor_pb2.FileDescriptorProto.FromString(old_file)))
    for name, message in _messages(descriptor_pb2.FileDescriptorProto.FromString(new_file)):
        before = old_messages.get(name)
        if before is None:
            continue
        was_by_number = {field.number: field for field in before.field}
        for field in message.field:
            was = was_by_number.get(field.number)
            if was is not None and not _reads_as(was, field):
                return (f"field {field.number} of {name} is {_type_name(field)} {field.name}, where the "
                        f"live workers' is {_type_name(was)} {was.name}")
    return None


def _messages(file):
    """(full name, DescriptorProto) of every message in a FileDescriptorProto, nested ones too."""
    stack = [(file.package, message) for message in file.message_type]
    while stack:
        scope, message = stack.pop()
        full = f"{scope}.{message.name}" if scope else message.name
        yield full, message
        stack.extend((full, nested) for nested in message.nested_type)


def _reads_as(was, field) -> bool:
    # Numbers change encoding between one and several (proto3 packs repeated ones): [7] reads as 0.
    if (was.label == _T.LABEL_REPEATED) != (field.label == _T.LABEL_REPEATED) and was.type in _NUMBERS:
        return False
    if was.type == field.type:  # a message or enum type of another name (renamed, moved) reads alike
        return True
    return any(was.type in alike and field.type in alike for alike in _WIRE_ALIKE)


def _type_name(field) -> str:
    name = field.type_name.lstrip(".") or _T.Type.Name(field.type)[len("TYPE_"):].lower()
    return f"repeated {name}" if field.label == _T.LABEL_REPEATED else name


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
