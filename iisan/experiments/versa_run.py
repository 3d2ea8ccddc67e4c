"""What run_IISAN_Versa.py runs at each grid point: cached training, building the cache first when asked."""

from __future__ import annotations

from ..config import Config
from ..data.cache import cache_file
from ..distributed import launched
from ..errors import CacheError
from ..locks import when_free
from ..model.build import modalities
from ..model.caching import build_cache_from_config
from ..train.runfolder import reusable_results
from ..train.trainer import train


def build_missing(cfg: Config) -> None:
    """Build ``cfg``'s cache unless it is there; while another process builds it (the other tasks of a job
    array sharing one cache), wait for that build, said once, and use what it wrote."""
    when_free(lambda: build_cache_from_config(cfg, only_missing=True))


def train_cached(cfg: Config, build_cache: bool = False) -> dict:
    """Train ``cfg``; with ``build_cache``, first build the cache of each tower whose file is missing (the
    build resumes an interrupted one). A tower already cached is not encoded again, nor its encoder
    needed (an LLM's cache may be the only copy of its states here); a run that finished before needs no
    cache at all. Under torchrun the cache is not built (every rank would build it, locking the others out), and
    whether the run is finished is rank 0's look, for every rank (``trainer.train``)."""
    missing = [m for m in modalities(cfg) if not cache_file(cfg.cache_dir, m).is_file()]
    if missing and build_cache and not launched():
        if (done := reusable_results(cfg)) is not None:
            return done
        for m in missing:
            build_missing(cfg.replace(towers=m, modality="intra"))  # (inter: of both towers)
        return train(cfg, reuse=False)  # just asked; a run another task finished meanwhile is found once
        # the run folder is locked (``Run.setup``)
    try:
        return train(cfg)  # a run that finished before needs no cache
    except CacheError as err:
        if not missing:
            raise
        hint = ("under torchrun --build-cache builds no cache: build it first with this command without torchrun (or "
                "`iisan cache`), then launch") if launched() and build_cache else "--build-cache builds it first"
        raise CacheError(f"{err}; {hint}") from None
