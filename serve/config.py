"""The server's settings: the one definition of each ``atmoe-reg serve`` option (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from atmoe.config import option
from atmoe.errors import UsageError


@dataclass
class ServeConfig:
    """How ``atmoe-reg serve`` listens, batches and bounds its work."""

    host: str = option("--host", "Address to listen on (127.0.0.1: this machine only).", default="127.0.0.1")
    port: int = option("--port", "TCP port to listen on.", default=8000)
    api_key: str | None = option(None, "Bearer key every /v1 and /atmoe request must carry (None: open).", default=None)
    max_batch: int = option("--max-batch", "Most rows one model decodes together.", default=16)
    max_wait_ms: float = option(
        "--max-wait-ms",
        "How long an idle model waits for more requests to batch with the first (ms).",
        default=5.0,
    )
    max_models: int = option(
        "--max-models",
        "Most compositions loaded on demand at once (those named at start stay loaded); the least recently "
        "used one is unloaded for a new one.",
        default=2,
    )
    max_queue: int = option("--max-queue", "Most rows waiting per model; more are refused with 429.", default=256)
    max_tokens: int = option("--max-tokens", "The largest max_tokens a request may ask for.", default=2048)
    max_body_bytes: int = option("--max-body-bytes", "Largest request body; larger ones get 413.", default=1 << 20)
    drain_seconds: float = option(
        "--drain-seconds", "On Ctrl-C, how long running requests may take to finish.", default=30.0
    )
    device: str = option("--device", "Where the models run: cpu, cuda, cuda:1...", default="cpu")
    threads: int | None = option(
        "--threads",
        "torch's intra-op CPU threads (default: half the cores, at least 1; the batch is the parallelism, and "
        "threads that outnumber idle cores stall each other at every small operation).",
        default=None,
    )

    def __post_init__(self) -> None:
        checks = (
            ("--port", 0 <= self.port <= 65535),
            ("--max-batch", self.max_batch >= 1),
            ("--max-wait-ms", self.max_wait_ms >= 0),
            ("--max-models", self.max_models >= 1),
            ("--max-queue", self.max_queue >= 1),
            ("--max-tokens", self.max_tokens >= 1),
            ("--max-body-bytes", self.max_body_bytes >= 1024),
            ("--drain-seconds", self.drain_seconds >= 0),
            ("--threads", self.threads is None or self.threads >= 1),
        )
        for flag, ok in checks:
            if not ok:
                raise UsageError(f"{flag} {getattr(self, flag[2:].replace('-', '_'))} is out of range")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty")

    @property
    def cpu_threads(self) -> int:
        """The intra-op thread count to use: ``threads``, else half the cores (at least 1)."""
        import os

        return self.threads if self.threads is not None else max(1, (os.cpu_count() or 2) // 2)
