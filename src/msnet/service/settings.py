"""The service's limits and options (``msnet serve`` flags), shared by the app and the upload code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and options of the service (``msnet serve`` flags).

    >>> ServiceSettings(workers=2).capacity
    18
    """

    api_key: str | None = None
    max_upload_mb: float = 1024.0  # request body
    workers: int = 1  # inferences running at once
    queue_size: int = 16  # requests waiting for a worker; more answer 503
    timeout_s: float = 300.0  # whole request: upload + queue + inference; 504 past it
    max_unzipped_mb: float = 4096.0  # total uncompressed size of a zip
    max_files: int = 10000  # files in a zip or in one upload
    max_ratio: float = 200.0  # uncompressed / compressed size of a zip
    top_k: int = 5  # key slices returned
    viewer_studies: int = 8  # finished studies kept for the page's viewer (0: no viewer)
    viewer_mb: float = 512.0  # memory for them in all; least recently used go first
    viewer_ttl_s: float = 1800.0  # each is dropped this long after its prediction
    device: str = "auto"
    tmp_dir: str | None = None  # where per-request temp dirs go (default: the system temp dir)
    header_timeout_s: float = 10.0  # a connection's request headers must arrive within this; 408 past it
    read_timeout_s: float = 30.0  # longest pause inside an upload; 408 past it
    max_connections: int = 64  # open connections; over it the slowest idle one is closed (503)
    max_slice_pixels: int | None = None  # read limits (None: MSNET_MAX_* or msnet.io's defaults); 413 over them
    max_voxels: int | None = None
    max_compression_ratio: float | None = None

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))
