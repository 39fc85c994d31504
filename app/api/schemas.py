"""Wire models of /encode (API.md). Unknown fields are refused, so typos fail loudly."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.imaging.sizing import DEFAULT_MAX_TILES, MAX_TILES_LIMIT, Strategy


class ImageObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="base64 or a data: URI")
    url: str | None = Field(None, description="http(s) URL; only when the server allows URLs")
    token_budget: int | None = Field(None, ge=1)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> ImageObject:
        if (self.data is None) == (self.url is None):
            raise ValueError("an image object needs exactly one of 'data' or 'url'")
        return self


class EncodeParams(BaseModel):
    """The per-request fields; also the form fields and query parameters of the other forms."""

    model_config = ConfigDict(extra="forbid")

    token_budget: int | None = Field(None, ge=1, description="most patch tokens per image")
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    strategy: Strategy = Strategy.NAFLEX
    max_tiles: int = Field(DEFAULT_MAX_TILES, ge=1, le=MAX_TILES_LIMIT, description="anyres only")
    normalize: bool = True
    return_patch_embeddings: bool = False
    encoding_format: Literal["float", "base64"] = "float"


class EncodeRequest(EncodeParams):
    images: list[str | ImageObject] = Field(..., min_length=1)


class ImageEmbedding(BaseModel):
    index: int
    embedding: list[float] | str
    tokens: int
    grid: tuple[int, int] = Field(description="[rows, cols] in patches (anyres: of one tile)")
    size: tuple[int, int] = Field(description="[height, width] after resizing")
    original_size: tuple[int, int]
    tiles: tuple[int, int] | None = None
    tile_embeddings: list[list[float] | str] | None = None
    patch_embeddings: list[list[float]] | str | None = None


class Usage(BaseModel):
    images: int
    tokens: int


class Timings(BaseModel):
    queue: float
    preprocess: float
    compute: float
    total: float


class EncodeResponse(BaseModel):
    model: str
    data: list[ImageEmbedding]
    usage: Usage
    timings_ms: Timings


class ErrorDetail(BaseModel):
    type: str
    message: str
    index: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
