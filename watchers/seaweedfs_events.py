"""SeaweedFS filer notifications (``notification.toml`` ``[notification.kafka]``): protobuf
``filer_pb.EventNotification`` values, keyed by the entry's full path.

Only the fields the S3 watcher needs are declared (protobuf skips the others): which entry was
created or updated, where, and whether it is a folder. Field numbers as in SeaweedFS's
``weed/pb/filer.proto``.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def message_classes():
    """(EventNotification, Entry) message classes, built from a descriptor in code."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="imgflow/seaweedfs_filer_subset.proto", package="filer_pb", syntax="proto3")
    entry = proto.message_type.add(name="Entry")
    entry.field.add(name="name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="is_directory", number=2, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    event = proto.message_type.add(name="EventNotification")
    event.field.add(name="old_entry", number=1, type=F.TYPE_MESSAGE, type_name=".filer_pb.Entry", label=F.LABEL_OPTIONAL)
    event.field.add(name="new_entry", number=2, type=F.TYPE_MESSAGE, type_name=".filer_pb.Entry", label=F.LABEL_OPTIONAL)
    event.field.add(name="delete_chunks", number=3, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    event.field.add(name="new_parent_path", number=4, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("filer_pb.EventNotification")), get(pool.FindMessageTypeByName("filer_pb.Entry")))


def created_path(value: bytes) -> str | None:
    """The full filer path of the file a notification says was created, updated or renamed
    to (``/buckets/<bucket>/<key>``); None for deletions and folders."""
    event_cls, _ = message_classes()
    event = event_cls.FromString(value)
    if not event.HasField("new_entry") or event.new_entry.is_directory or not event.new_parent_path:
        return None
    return f"{event.new_parent_path.rstrip('/')}/{event.new_entry.name}"
