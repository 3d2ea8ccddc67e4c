"""What run_IISAN_Versa.py runs at each grid point: cached training, building the cache first when asked."""

from __future__ import annotations

from ..config import Config
from ..data.cache import cache_file
from ..model.build import modalities
from ..model.caching import build_cache_from_config
from ..train.trainer import train


def train_cached(cfg: Config, build_cache: bool = False) -> dict:
    """Train ``cfg``; with ``build_cache``, first build its cache when a tower's file is missing (the
    build resumes an interrupted one)."""
    if build_cache and not all(cache_file(cfg.cache_dir, m).is_file() for m in modalities(cfg)):
        build_cache_from_config(cfg)
    return train(cfg)
