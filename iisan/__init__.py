"""IISAN: decoupled parameter-efficient adaptation of multimodal foundation models for sequential
recommendation (SIGIR 2024), and IISAN-Versa (TKDE)."""

__version__ = "0.1.0"
