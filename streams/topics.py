"""The pipeline's topics and their idempotent creation."""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from emofleet.core.config import KafkaSettings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicStatus:
    name: str
    partitions: int
    outcome: str  # "created" | "exists"


def pipeline_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Audio in, emotions out, dead letters, alerts and window aggregates; all with the configured layout."""
    names = (kafka.audio_topic, kafka.results_topic, kafka.dead_letter_topic, kafka.alerts_topic,
             kafka.aggregates_topic)
    return [TopicSpec(name, kafka.partitions, kafka.replication_factor) for name in names]


def ensure_topics(admin: AdminClient, specs: list[TopicSpec], timeout: float = 10.0) -> list[TopicStatus]:
    """Create the topics that are missing; existing ones are left as they are and reported."""
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor,
                  config=s.config) for s in specs],
        operation_timeout=timeout, request_timeout=timeout)
    outcomes: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result()
            outcomes[name] = "created"
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            outcomes[name] = "exists"
    partitions = partition_counts(admin, [s.name for s in specs], timeout)
    return [TopicStatus(s.name, partitions.get(s.name, 0), outcomes[s.name]) for s in specs]


def partition_counts(admin: AdminClient, names: list[str], timeout: float = 10.0) -> dict[str, int]:
    """Partition count per topic, read from cluster metadata (all topics, so nothing is auto-created)."""
    metadata = admin.list_topics(timeout=timeout)
    return {name: len(metadata.topics[name].partitions) for name in names if name in metadata.topics}


NO_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"  # Kafka's zero Uuid, base64: "no id" from brokers that keep none


def topic_ids(admin: AdminClient, names: list[str], timeout: float = 10.0) -> dict[str, str]:
    """Kafka's id of each topic's current incarnation (new when a topic is recreated, or a memory-backed
    broker restarts); ``""`` where the broker reports none or the topic does not exist."""
    from confluent_kafka import TopicCollection

    try:
        futures = admin.describe_topics(TopicCollection(names), request_timeout=timeout)
    except KafkaException:
        return dict.fromkeys(names, "")
    ids: dict[str, str] = {}
    for name, future in futures.items():
        try:
            topic_id = str(future.result().topic_id)
        except KafkaException:
            topic_id = ""
        ids[name] = "" if topic_id == NO_TOPIC_ID else topic_id
    return ids
