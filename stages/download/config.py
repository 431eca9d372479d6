"""Config of the download stage: where each dataset's metadata lives and how images are fetched."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from stages.download.urls import check_scheme

# Dataset and role names become directory and file names of the download output (metadata/<dataset>/).
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]


class DatasetSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # role -> URL of a metadata file; "<archive url>#<member path>" selects a file inside a .zip/.tar.gz
    files: dict[Name, str]
    # Datasets whose metadata names files rather than URLs (Flickr30k) fetch <image_base_url><filename>.
    image_base_url: str | None = None

    # Every URL is checked when the config loads: a file:// base URL would otherwise only show up as
    # every image of the dataset failing (bad_scheme), and a typo in a file spec mid-download.
    @field_validator("files")
    @classmethod
    def _http_files(cls, files: dict[str, str]) -> dict[str, str]:
        for role, spec in files.items():
            try:
                check_scheme(spec.partition("#")[0])
            except ValueError as err:
                raise ValueError(f"files.{role}: {err}") from None
        return files

    @field_validator("image_base_url")
    @classmethod
    def _http_base(cls, url: str | None) -> str | None:
        if url is not None:
            check_scheme(url)
        return url


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "world": fetch from the synthetic world, which the pipeline serves on a loopback mirror (the
    # embedded default); "web": fetch the configured URLs as they are (or through mirror_url).
    source: Literal["world", "web"] = "world"
    # Web mode: every URL http(s)://host/path is fetched as <mirror_url>/host/path. (World mode fetches
    # through the world's mirror the same way; the pipeline hands the stage its URL.)
    mirror_url: str | None = None
    datasets: dict[Name, DatasetSource] = Field(default_factory=dict)
    shard_size: int = Field(128, gt=0)  # images per shard: the unit of parallelism and of resume
    threads_per_task: int = Field(16, gt=0)  # concurrent requests inside one Ray shard task
    max_tasks_in_flight: int = Field(4, gt=0)
    # A run with at most this many images left to fetch runs its shards as threads of the stage's own
    # process instead of Ray tasks (same shards, same files): starting Ray and its workers costs more than
    # their extra cores bring; on 2 cores a fresh process fetched 30,000 images in-process in 21 s, as
    # Ray tasks in 31 s (benchmarks/download_throughput.py --cold). 0 sends every shard to Ray.
    in_process_max_images: int = Field(30_000, ge=0)
    timeout_s: float = Field(5.0, gt=0)  # per request (connect + each read)
    retries: int = Field(3, ge=0)  # extra attempts on transient errors (5xx, timeout, connection)
    backoff_s: float = Field(0.2, ge=0)  # first retry delay, doubled each attempt
    max_bytes: int = Field(16_000_000, gt=0)  # body size cap
    max_pixels: int = Field(40_000_000, gt=0)  # decompression-bomb cap (width * height)
    max_redirects: int = Field(5, ge=0)
    # Metadata caps (the largest real file, VG's region descriptions, is ~0.7 GB unpacked): bytes of one
    # downloaded file or archive, bytes of one extracted member, and an extracted member's size as a
    # multiple of its archive's (real JSON packs ~10x; a zip bomb packs 1000x).
    metadata_max_bytes: int = Field(4_000_000_000, gt=0)
    member_max_bytes: int = Field(8_000_000_000, gt=0)
    member_max_ratio: float = Field(100.0, gt=1)

    @field_validator("mirror_url")
    @classmethod
    def _http_mirror(cls, url: str | None) -> str | None:
        if url is not None:
            check_scheme(url)  # BadScheme is a ValueError: reported as this field's validation error
        return url
