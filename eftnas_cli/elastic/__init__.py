"""Elastic BERT-family encoders: subnets and search spaces, importance reordering, super-network
widths, dense subnet extraction and cost (MACs/params) accounting."""

from .adapters import ADAPTERS, EncoderDims, FamilyAdapter, adapter_for, encoder_dims, encoder_layers
from .core import activate, active_subnet, make_elastic, reorder
from .cost import MacsReport, ParamsReport, count_params, macs
from .extract import extract, restructure
from .modules import BiasOnly, ElasticLinear, SkippedAttention
from .space import SearchSpace
from .subnet import LayerWidth, Subnet, exported_subnet, full_subnet, validate_subnet

__all__ = [
    "ADAPTERS",
    "BiasOnly",
    "ElasticLinear",
    "EncoderDims",
    "FamilyAdapter",
    "LayerWidth",
    "MacsReport",
    "ParamsReport",
    "SearchSpace",
    "SkippedAttention",
    "Subnet",
    "activate",
    "active_subnet",
    "adapter_for",
    "count_params",
    "encoder_dims",
    "encoder_layers",
    "exported_subnet",
    "extract",
    "full_subnet",
    "macs",
    "make_elastic",
    "reorder",
    "restructure",
    "validate_subnet",
]
