"""Real data for edsam-online: built-in domain-shift shapes, webdataset shards, CSV files."""

from .domains import DOMAINS, SOURCE_DOMAIN, TARGET_DOMAINS
from .records import RealRecord, RealSample
from .shapes import CLASSES, COLORS, render_sample
from .sources import (DataCounters, RealDataConfig, RealSourceNode, decode_record, decoded_samples,
                      iter_real_samples)

__all__ = [
    "CLASSES", "COLORS", "DOMAINS", "SOURCE_DOMAIN", "TARGET_DOMAINS",
    "DataCounters", "RealDataConfig", "RealRecord", "RealSample", "RealSourceNode",
    "decode_record", "decoded_samples", "iter_real_samples", "render_sample",
]
