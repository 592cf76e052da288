"""The one typed settings object.

Read, in order of precedence: keyword arguments, ``IMGFLOW_*`` environment variables
(nested with ``__``, e.g. ``IMGFLOW_KAFKA__BOOTSTRAP``), then an optional TOML file
(``IMGFLOW_CONFIG`` or ``./imgflow.toml``), then the defaults below.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "imgflow"


def default_models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "imgflow" / "models"


class _Section(BaseModel):
    # A misspelt key in imgflow.toml is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(_Section):
    bootstrap: str = "127.0.0.1:19092"
    # Consumer groups and transactional ids start with this (imgflow-vision, imgflow-sink,
    # imgflow-vision.<topic>.<partition> ...): two pipelines sharing a cluster need different ones.
    group_prefix: str = Field("imgflow", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    # A command started against a cluster that does not answer within this exits 2 naming
    # kafka.bootstrap (a refused password or certificate: at once).
    connect_timeout_s: float = Field(60.0, gt=0.0)
    # tansu takes about half of session.timeout.ms to let a member join a group: kept short.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    transaction_timeout_ms: int = Field(60000, ge=1000)
    # A transaction step hanging longer than this makes the stage exit, so that a restart
    # reconnects; 0 disables. Seen on tansu right after a broker restart, and on a Kafka
    # cluster once when a group coordinator's broker was killed (send_offsets_to_transaction
    # ignoring its timeout, as librdkafka issues #5456/#5511 describe). A commit across a
    # failover took at most ~18 s (benchmarks/kafka_failover.py): 60 s leaves room.
    transaction_stall_s: float = Field(60.0, ge=0.0)
    # A stage's transactional producers: how long a partition's records may wait to be sent
    # together. A transaction's commit sends what waits at once, so a long linger costs no
    # latency and makes one produce request per partition and batch (each request is
    # storage writes on the broker: on tansu, objects in SeaweedFS).
    txn_linger_ms: int = Field(100, ge=0, le=60000)
    # -- security, for every client (producers, consumers, admin, lag reader, watchers,
    # notifications); README "Kafka security". Secrets are SecretStr: never logged.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = ""
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    ssl_ca_location: str = ""  # CA file (PEM) that signed the brokers' certificates; "": the system's
    ssl_certificate_location: str = ""  # client certificate (PEM), for brokers that ask for one
    ssl_key_location: str = ""  # its private key (PEM)
    ssl_key_password: SecretStr = SecretStr("")
    # Check that a broker's certificate names the host dialled (https); "none" turns it off.
    ssl_endpoint_identification: Literal["https", "none"] = "https"

    @field_validator("sasl_mechanism")
    @classmethod
    def _mechanism_needs_sasl(cls, value: str, info) -> str:
        protocol = info.data.get("security_protocol", "PLAINTEXT")
        if value and not protocol.startswith("SASL_"):
            raise ValueError(f"kafka.sasl_mechanism={value} needs kafka.security_protocol SASL_PLAINTEXT or SASL_SSL (it is {protocol})")
        if protocol.startswith("SASL_") and not value:
            raise ValueError(f"kafka.security_protocol={protocol} needs kafka.sasl_mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        return value


class BrokerSettings(_Section):
    # The local broker `imgflow run` and `imgflow broker` start: tansu (on a local SeaweedFS;
    # no Java) or kafka (Apache Kafka in KRaft mode from its Maven Central jars; Java 17+,
    # Maven for the first start). README "Brokers".
    engine: Literal["tansu", "kafka"] = "tansu"


class TopicSettings(_Section):
    new: str = "images.new"
    new_high: str = "images.new.high"
    vision: str = "images.vision"
    enriched: str = "images.enriched"
    dlq: str = "images.dlq"
    partitions: int = Field(3, ge=1, le=256)
    # Replication of every topic the pipeline creates (images, schemas, registries); -1: the
    # broker's default.replication.factor. min_insync_replicas 0: the broker's default.
    replication_factor: int = Field(-1, ge=-1, le=32)
    min_insync_replicas: int = Field(0, ge=0, le=32)
    # Topic configs of the image topics (new, new_high, vision, enriched, dlq), e.g.
    # {"retention.ms": "1209600000"}: replay by time reaches only as far back as they keep.
    config: dict[str, str] = {}
    # Per topic name, on top of `config` (any topic the pipeline creates).
    topic_config: dict[str, dict[str, str]] = {}


class StageSettings(_Section):
    batch_size: int = Field(8, ge=1, le=1024)
    max_wait_s: float = Field(0.5, ge=0.0)
    max_attempts: int = Field(3, ge=1, le=100)
    retry_backoff_s: float = Field(0.5, ge=0.0)
    instance: str = "0"


class ModelSettings(_Section):
    profile: Literal["embedded", "gpu"] = "embedded"
    image_max_size: int = Field(384, ge=32, le=8192)
    image_max_bytes: int = Field(200 * 1024 * 1024, ge=1)  # bigger files/objects are refused unread
    # Pixels an image may have to be decoded in full (a JPEG counts at the 1/2..1/8 scale it is
    # decoded at); bigger ones are error rows, refused from their header before any decoding.
    # Decoding costs ~4 bytes a pixel: 120 MP (over every stills camera's full resolution,
    # under Pillow's own 179 MP bomb limit) is at most ~0.5 GB for one image.
    image_max_pixels: int = Field(120_000_000, ge=1)
    # The original script had MODEL_CACHE_SIZE = 3; the embedded vision stage alone holds 6
    # entries at once (image net, face detector, OCR and its word list, sentence model, word
    # vectors), so fewer would reload some every batch (the cache warns when that happens).
    cache_size: int = Field(8, ge=1)
    cache_ttl_s: float = Field(0.0, ge=0.0)  # 0: never unload for idleness
    models_dir: Path = Field(default_factory=default_models_dir)
    # Per-job overrides; empty means "the profile's default". See README "Models".
    describe: str = ""
    read_text: str = ""
    embed_image: str = ""
    embed_text: str = ""
    word_vectors: str = ""
    llm: str = ""
    # 0: half the cores (the other half for the vision stage), and every core while the other
    # processes leave them idle (re-checked every 0.5 s); a number: exactly that many.
    llm_threads: int = Field(0, ge=0)
    llm_ctx: int = Field(2048, ge=256)  # tokens per sequence (prompt + answer)
    # Items the enrich stage's LLM decodes at once (one llama_decode per token for all of
    # them; a finished item's slot takes the next at once); 1: one at a time. Outputs at > 1
    # can differ in rounding from one at a time (llama.cpp on CPU). See README "Performance".
    llm_batch: int = Field(16, ge=1, le=64)
    llm_max_tokens: int = Field(256, ge=16)
    # Who writes the short `description`: "llm" (the LLM's caption, kept only when it passes
    # the grounding rules), "facts" (a sentence composed from what the models found; the LLM
    # then only picks the category and keywords), "auto": llm for a user's GGUF (the
    # production Llama), facts for the shipped small models (README "Output quality").
    llm_description: Literal["auto", "llm", "facts"] = "auto"
    # Faces (embedded profile; MTCNN, shipped in facenet-pytorch): a face scoring at least
    # face_min_score and at least face_min_height of the image's height makes "person" the
    # first label (ImageNet-1k has no person class). Chosen on the quality set's tune split
    # (README "Output quality"); faces = false turns the detector off.
    faces: bool = True
    face_min_score: float = Field(0.98, ge=0.0, le=1.0)
    face_min_height: float = Field(0.06, gt=0.0, le=1.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # -- production (GPU-profile) models: where they load from. Setting one of these picks
    # the production implementation of its job(s) in any profile (README "Models:
    # production (GPU) profile"); ``word_vectors`` and ``llm`` above take a path the same way.
    vlm: str = ""  # Qwen2-VL transformers folder: describe + read_text
    clip: str = ""  # "<open_clip model name or config .json>:<weights file>": embed_image
    sentence: str = ""  # SentenceTransformer folder: embed_text
    vlm_attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    vlm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    vlm_max_new_tokens: int = Field(256, ge=1)  # description
    vlm_text_max_new_tokens: int = Field(128, ge=1)  # text read in the image
    llm_device: Literal["cpu", "cuda"] = "cpu"  # the enrich stage runs on CPU by default
    memory_clear_threshold_gb: float = Field(2.0, ge=0.0)  # empty the CUDA cache under this free
    cuda_alloc_conf: str = "expandable_segments:True"  # PYTORCH_CUDA_ALLOC_CONF unless set


class WatchSettings(_Section):
    poll_interval_s: float = Field(1.0, gt=0.0)
    settle_s: float = Field(1.0, ge=0.0)  # a file must be unchanged this long before it is published
    # Names that say "image": each becomes a row, an error row where the models cannot take the
    # format (HEIC, RAW, SVG ... are listed so they are reported, not silently skipped).
    extensions: list[str] = [
        ".jpg",
        ".jpeg",
        ".png",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".webp",
        ".heic",
        ".heif",
        ".avif",
        ".jxl",
        ".jp2",
        ".ico",
        ".psd",
        ".svg",
        ".dng",
        ".cr2",
        ".nef",
        ".arw",
    ]
    # S3 watcher (watchers/s3.py): a full listing compares every ETag this often (catches keys
    # sorting before the cursor and overwrites); between them only keys after the cursor.
    s3_full_scan_s: float = Field(60.0, ge=0.0)
    # Bucket notifications on a Kafka topic, on top of polling: "" (off) | seaweedfs | minio.
    s3_notify: Literal["", "seaweedfs", "minio"] = ""
    s3_notify_topic: str = "imgflow.s3-events"
    s3_notify_bootstrap: str = ""  # the store's Kafka; empty: kafka.bootstrap


class SinkSettings(_Section):
    # A local folder (a Path) or an "s3://BUCKET/PREFIX/" URI (kept a str: Path would eat "//").
    out_dir: Path | str = Path("out")
    csv: bool = True
    avro: bool = True
    # The Avro files' codec. deflate (zlib 6) saves ~7 % on rows of model vectors (float32
    # compresses poorly) and costs ~1-3 ms of CPU a row, more than the rest of the broker
    # path together (benchmarks/broker_path.py); "null" writes them uncompressed.
    avro_codec: Literal["deflate", "null"] = "deflate"
    # Event_ids of the last N offsets of each partition are kept for dedupe (the records of
    # aborted transactions that some brokers deliver): see consumers/sink.py.
    dedupe_window: int = Field(10_000, ge=0)
    # On S3, the sink's lease on its prefix (one sink per prefix): renewed every third of this,
    # taken over by another sink this long after its holder stopped renewing (a killed sink).
    lease_ttl_s: float = Field(30.0, ge=3.0)

    @field_validator("out_dir", mode="before")
    @classmethod
    def _local_or_s3(cls, value: object) -> Path | str:
        text = str(value)
        return text if text.startswith("s3://") else Path(text)


class S3Settings(_Section):
    """Where S3 lives. Empty values fall back to boto3's own chain (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE, ~/.aws)."""

    endpoint_url: str = ""
    access_key_id: SecretStr = SecretStr("")
    secret_access_key: SecretStr = SecretStr("")
    region: str = ""
    profile: str = ""
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    timeout_s: float = Field(10.0, gt=0.0)
    max_attempts: int = Field(3, ge=1, le=20)  # boto3's own retries per request
    # Objects may only be read below these s3://BUCKET/PREFIX locations (as allowed_roots for
    # folders); `imgflow run s3://...` sets it to the watched prefix.
    allowed_prefixes: list[str] = []
    # The vision stage waits this long for a store that is down (connection refused, 5xx)
    # before the read counts as a failed attempt: an outage must not turn images into errors.
    outage_retry_s: float = Field(120.0, ge=0.0)


class SearchSettings(_Section):
    """The search index over a sink output (imgflow/search/; README "Search")."""

    # Where the index lives; "" = DATA_DIR/search/<the output, made a folder name>. Derived
    # data: deleting it loses nothing (``imgflow index --rebuild`` makes it again).
    index_dir: str = ""
    # Below this many rows a run's vectors are searched exactly (flat scan: fast enough and
    # recall 1); at and above it an approximate index is built (benchmarks/search_index.py).
    ann_min_rows: int = Field(50_000, ge=256)
    # IVF_HNSW_SQ or IVF_PQ (LanceDB's index kinds); the partitions probed per query, and how
    # many candidates per hit are re-ranked on the full vectors. 4 and 5: at a million 384-d
    # or 1280-d vectors recall@10 0.97-0.99 in 5-6 ms p50, 38-42 ms with a category filter;
    # 20 and 10 reach recall 1.0 but take 62-71 ms filtered (benchmarks/results/search_index-1m.md).
    ann_index_type: Literal["IVF_HNSW_SQ", "IVF_PQ"] = "IVF_HNSW_SQ"
    ann_nprobes: int = Field(4, ge=1)
    ann_refine_factor: int = Field(5, ge=1)
    # New rows are searchable at once (searched flat until the next optimize folds them into
    # the indexes); optimize after this many rows were added since the last one.
    optimize_every_rows: int = Field(10_000, ge=1)
    # ``imgflow serve`` re-reads the output this often to take in new rows.
    sync_interval_s: float = Field(5.0, gt=0.0)
    # Rows longer than this in a query are refused (a query is a phrase, not a document).
    max_query_chars: int = Field(1000, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGFLOW_", env_nested_delimiter="__", extra="forbid", validate_default=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    # Images may only be read from below these folders (no path traversal through events).
    allowed_roots: list[Path] = []
    run_id: str = "live"
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_port: int = Field(0, ge=0, le=65535)  # 0: no metrics endpoint
    metrics_addr: str = "127.0.0.1"  # address /metrics listens on (containers: 0.0.0.0)

    kafka: KafkaSettings = KafkaSettings()
    broker: BrokerSettings = BrokerSettings()
    topics: TopicSettings = TopicSettings()
    stage: StageSettings = StageSettings()
    models: ModelSettings = ModelSettings()
    watch: WatchSettings = WatchSettings()
    sink: SinkSettings = SinkSettings()
    s3: S3Settings = S3Settings()
    search: SearchSettings = SearchSettings()

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, config_file()))


def config_file() -> Path:
    return Path(os.environ.get("IMGFLOW_CONFIG", "imgflow.toml"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
